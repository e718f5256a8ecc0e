"""The live-progress routes (deployments/events_api.py) on a plain FastAPI app over a real
SQLite job store, no Ray: the owner check, a finished generation replayed and ended, resuming
with Last-Event-ID or ?after=, 204 after the end, refusals of bad values, the list of a user's
own generations page by page, and both routes in the OpenAPI document."""

from __future__ import annotations

import asyncio
import functools
import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from deployments.api import create_api
from deployments.auth import Authenticator, AuthSettings
from deployments.events_api import EventRoutes
from pipeline.jobs.store import JobStore
from pipeline.jobs.records import event_row
from pipeline.tokens import mint_token
from tests.test_jobs import REQUEST

SECRET = "s" * 40


class Server(EventRoutes):
    events_poll_s = 0.01

    def __init__(self, store: JobStore):
        self.store = store

    async def _api(self, fn, *args, **kwargs):
        return await asyncio.to_thread(functools.partial(fn, *args, **kwargs))


@pytest.fixture
def store(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path}/jobs.db")
    yield store
    store.close()


@pytest.fixture
def client(store, monkeypatch):
    monkeypatch.setenv("SCENEREF_JWT_SECRET", SECRET)
    return TestClient(create_api(Server(store), authenticator=Authenticator(AuthSettings()), upload_limit_bytes=1024))


def auth(sub: str = "alice") -> dict:
    return {"Authorization": f"Bearer {mint_token(SECRET, sub)}"}


def finished_job(store: JobStore, gid: str = "gen-1", owner: str = "alice") -> None:
    store.create(gid, owner, REQUEST, offline=True)
    lease = store.claim("runner", 30, generation_id=gid)
    store.append_events(gid, [event_row("planning", "planning", 0), event_row("planned", "planning", 5,
                                                                             data={"scenes": []})], lease)
    store.finish(lease, "completed")


def frames(text: str) -> list[dict]:
    out = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n") if line and not line.startswith(":") and ": " in line)
        if "id" in fields:
            out.append({"id": int(fields["id"]), "event": fields["event"], "data": json.loads(fields["data"])})
    return out


def test_a_finished_generation_replays_and_ends(client, store):
    finished_job(store)
    response = client.get("/api/generations/gen-1/events", headers=auth())
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    got = frames(response.text)
    assert [(f["id"], f["event"]) for f in got] == [(1, "queued"), (2, "planning"), (3, "planned"), (4, "status")]
    assert got[-1]["data"]["data"]["status"] == "completed" and got[-1]["data"]["seq"] == 4


def test_last_event_id_and_after_resume_exactly_after_it(client, store):
    finished_job(store)
    by_header = frames(client.get("/api/generations/gen-1/events", headers={**auth(), "Last-Event-ID": "2"}).text)
    by_query = frames(client.get("/api/generations/gen-1/events?after=2", headers=auth()).text)
    assert [f["id"] for f in by_header] == [f["id"] for f in by_query] == [3, 4]
    # The header wins: it is what EventSource sends when it reconnects.
    both = frames(client.get("/api/generations/gen-1/events?after=1", headers={**auth(), "Last-Event-ID": "3"}).text)
    assert [f["id"] for f in both] == [4]
    done = client.get("/api/generations/gen-1/events", headers={**auth(), "Last-Event-ID": "4"})
    assert done.status_code == 204 and done.content == b""


def test_a_running_generation_streams_until_its_final_status(client, store):
    store.create("gen-1", "alice", REQUEST, offline=True)
    lease = store.claim("runner", 30)

    def finish_later():  # while the stream is open and waiting
        time.sleep(0.3)
        store.append_events("gen-1", [event_row("selected", "scene_completed", 60, scene=1, data={"variation": 2})],
                            lease, progress=60)
        store.finish(lease, "failed", error="scene 2: scoring failed")

    worker = threading.Thread(target=finish_later)
    worker.start()
    with client.stream("GET", "/api/generations/gen-1/events", headers=auth()) as response:
        text = "".join(response.iter_text())
    worker.join()
    got = frames(text)
    assert [f["event"] for f in got] == ["queued", "selected", "status"]
    assert got[-1]["data"]["data"] == {"status": "failed", "progress": 60, "error": "scene 2: scoring failed"}


def test_others_and_unknown_ids_get_404_and_bad_values_422(client, store):
    finished_job(store)
    assert client.get("/api/generations/gen-1/events", headers=auth("mallory")).status_code == 404
    assert client.get("/api/generations/nope/events", headers=auth()).status_code == 404
    assert client.get("/api/generations/gen-1/events").status_code == 401
    for headers, query in (({"Last-Event-ID": "abc"}, ""), ({}, "?after=-1"), ({"Last-Event-ID": "-5"}, "")):
        response = client.get(f"/api/generations/gen-1/events{query}", headers={**auth(), **headers})
        assert response.status_code == 422 and response.json()["detail"].startswith("invalid request")


def test_the_list_shows_only_the_callers_generations_newest_first(client, store):
    for i in range(5):
        store.create(f"gen-{i}", "alice", {**REQUEST, "prompt": f"prompt {i}"}, offline=True)
    store.create("gen-bob", "bob", REQUEST, offline=True)
    first = client.get("/api/generations?limit=2", headers=auth()).json()
    assert [g["generation_id"] for g in first["generations"]] == ["gen-4", "gen-3"]
    one = first["generations"][0]
    assert (one["status"], one["prompt"], one["progress"], one["scene_count"], one["scenes_completed"]) == (
        "queued", "prompt 4", 0, None, 0)
    assert one["created_at"] and one["finished_at"] is None
    ids = [g["generation_id"] for g in first["generations"]]
    cursor = first["next_cursor"]
    while cursor:
        page = client.get("/api/generations", params={"limit": 2, "cursor": cursor}, headers=auth()).json()
        ids += [g["generation_id"] for g in page["generations"]]
        cursor = page["next_cursor"]
    assert ids == ["gen-4", "gen-3", "gen-2", "gen-1", "gen-0"]
    assert client.get("/api/generations", headers=auth("bob")).json() == {
        "generations": [client.get("/api/generations", headers=auth("bob")).json()["generations"][0]],
        "next_cursor": None,
    }
    assert client.get("/api/generations", headers=auth("carol")).json() == {"generations": [], "next_cursor": None}
    bad = client.get("/api/generations?cursor=garbage", headers=auth())
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "cursor"
    assert client.get("/api/generations?limit=0", headers=auth()).status_code == 422


def test_both_routes_are_in_the_openapi_document(client):
    paths = client.get("/openapi.json").json()["paths"]
    events = paths["/api/generations/{generation_id}/events"]["get"]
    assert "text/event-stream" in events["responses"]["200"]["content"]
    assert {"204", "401", "404", "422", "503"} <= set(events["responses"])
    assert {p["name"] for p in events["parameters"]} == {"generation_id", "after", "Last-Event-ID"}
    listing = paths["/api/generations"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert listing["$ref"].endswith("/GenerationList")


def test_error_answers_of_the_stream_are_declared_as_problems(client):
    document = client.get("/openapi.json").json()
    responses = document["paths"]["/api/generations/{generation_id}/events"]["get"]["responses"]
    for code in ("401", "404", "422", "503"):
        (media,) = responses[code]["content"]
        assert media == "application/problem+json"  # not the route's own text/event-stream
        name = responses[code]["content"][media]["schema"]["$ref"].rsplit("/", 1)[1]
        assert name in document["components"]["schemas"]
    assert list(responses["200"]["content"]) == ["text/event-stream"]
