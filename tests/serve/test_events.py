"""Live progress over HTTP on the shared offline app (two ingress replicas, one job store):
the SSE stream of a running generation from its first event to its final status, several
streams at once (served by either replica, whichever runs the job), a reconnection with
Last-Event-ID that gets exactly the rest, a replay after the end, 404 for another user, and
the caller's list of generations."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from tests.serve.conftest import auth, wait_done

pytestmark = pytest.mark.serve

REQUEST = {"prompt": "A cozy winter cabin getaway with hot chocolate", "target_duration": 9,
           "advanced_image_num_variations": 2, "advanced_image_max_enhancement_iterations": 2}
USER = "evelyn"
STREAMS = 5  # with two replicas, some streams are served by the replica that does not run the job


def read_stream(base: str, generation_id: str, headers: dict, *, stop_after: int | None = None) -> list[dict]:
    """The stream's events as {id, event, data}, read as they arrive; closes after `stop_after`."""
    events: list[dict] = []
    fields: dict[str, str] = {}
    url = f"{base}/api/generations/{generation_id}/events"
    with httpx.stream("GET", url, headers=headers, timeout=httpx.Timeout(30, read=120)) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line == "":
                if "id" in fields:
                    events.append({"id": int(fields["id"]), "event": fields["event"], "data": json.loads(fields["data"])})
                    if stop_after is not None and len(events) >= stop_after:
                        return events
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = value
    return events


@pytest.fixture(scope="module")
def live(offline_app):
    """One generation, followed live by several streams from its submission on; one of them
    drops after a few events and reconnects with Last-Event-ID."""
    headers = auth(USER)
    reply = httpx.post(f"{offline_app}/api/generate", json=REQUEST, headers=headers, timeout=30)
    assert reply.status_code == 202, reply.text
    generation_id = reply.json()["generation_id"]
    results: dict[str, list] = {}

    def follow(name: str) -> None:
        try:
            results[name] = read_stream(offline_app, generation_id, headers)
        except Exception as exc:  # reported by the test, not lost in a thread
            results[name] = exc

    def reconnecting() -> None:
        try:
            first = read_stream(offline_app, generation_id, headers, stop_after=3)
            rest = read_stream(offline_app, generation_id, {**headers, "Last-Event-ID": str(first[-1]["id"])})
            results["reconnected"] = (first, rest)
        except Exception as exc:
            results["reconnected"] = exc

    threads = [threading.Thread(target=follow, args=(f"stream-{i}",)) for i in range(STREAMS)]
    threads.append(threading.Thread(target=reconnecting))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    status = wait_done(offline_app, generation_id, headers)
    return {"id": generation_id, "results": results, "status": status, "headers": headers}


def test_every_stream_sees_the_whole_generation_in_order(live):
    streams = [live["results"][f"stream-{i}"] for i in range(STREAMS)]
    for events in streams:
        assert not isinstance(events, Exception), events
        assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    assert all(s == streams[0] for s in streams)  # whichever replica served it
    events = streams[0]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "queued" and kinds[-1] == "status" and "planned" in kinds
    assert events[-1]["data"]["data"]["status"] == live["status"]["status"] == "completed"
    scenes = live["status"]["storyboard_plan"]["scenes"]
    for scene in scenes:
        n = scene["scene_number"]
        mine = [e for e in events if e["data"]["scene"] == n]
        assert [e["event"] for e in mine if e["event"] == "iteration"], f"scene {n} has no iteration event"
        received = sorted(e["data"]["data"]["variation"] for e in mine if e["event"] == "variation")
        assert received == [1, 2]
        scored = next(e for e in mine if e["event"] == "scored")["data"]["data"]["variations"]
        assert max(v["overall"] for v in scored) == pytest.approx(scene["quality_score"])
        selected = next(e for e in mine if e["event"] == "selected")["data"]["data"]
        assert selected["overall"] == pytest.approx(scene["quality_score"])


def test_a_reconnection_with_last_event_id_gets_exactly_the_rest(live):
    result = live["results"]["reconnected"]
    assert not isinstance(result, Exception), result
    first, rest = result
    assert len(first) == 3
    assert first + rest == live["results"]["stream-0"]


def test_a_finished_generation_replays_then_has_nothing_more(offline_app, live):
    replay = read_stream(offline_app, live["id"], live["headers"])
    assert replay == live["results"]["stream-0"]
    after = httpx.get(f"{offline_app}/api/generations/{live['id']}/events",
                      headers={**live["headers"], "Last-Event-ID": str(replay[-1]["id"])}, timeout=30)
    assert after.status_code == 204
    partial = httpx.get(f"{offline_app}/api/generations/{live['id']}/events?after={replay[-3]['id']}",
                        headers=live["headers"], timeout=30)
    assert [int(line[4:]) for line in partial.text.splitlines() if line.startswith("id: ")] == [
        e["id"] for e in replay[-2:]]


def test_another_user_gets_404(offline_app, live):
    for headers in (auth("mallory"), live["headers"]):
        gid = live["id"] if headers is not live["headers"] else "0" * 32
        reply = httpx.get(f"{offline_app}/api/generations/{gid}/events", headers=headers, timeout=30)
        assert reply.status_code == 404, reply.text


def test_the_list_holds_the_callers_own_generations(offline_app, live):
    mine = httpx.get(f"{offline_app}/api/generations?limit=5", headers=live["headers"], timeout=30).json()
    top = mine["generations"][0]
    assert top["generation_id"] == live["id"] and top["status"] == "completed" and top["progress"] == 100
    assert top["prompt"] == REQUEST["prompt"]
    assert top["scene_count"] == top["scenes_completed"] == len(live["status"]["storyboard_plan"]["scenes"])
    others = httpx.get(f"{offline_app}/api/generations", headers=auth("mallory"), timeout=30).json()
    assert live["id"] not in [g["generation_id"] for g in others["generations"]]
