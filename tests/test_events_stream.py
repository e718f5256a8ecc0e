"""The SSE stream of pipeline/jobs/events.py without a server: frames in the text/event-stream
format, resumption after a seq, the end after the final status, keepalive comments while
nothing happens, the time bound, and the list's cursor."""

from __future__ import annotations

from datetime import datetime, timezone

import json

import pytest

from pipeline.jobs import events as sse
from pipeline.jobs.records import EventPage, EventRecord

AT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def record(seq: int, kind: str = "variation", **data) -> EventRecord:
    return EventRecord(seq=seq, at=AT, kind=kind, stage="generating", progress=seq, scene=1, message=f"m{seq}", data=data)


class Log:
    """A job's log that grows as the stream reads it: `script[i]` is what the i-th read adds."""

    def __init__(self, script, status_after=None):
        self.events: list[EventRecord] = []
        self.script, self.reads, self.status_after = list(script), [], status_after

    async def read(self, after: int) -> EventPage:
        self.reads.append(after)
        if self.script:
            self.events.extend(self.script.pop(0))
        status = "completed" if self.status_after is not None and len(self.reads) >= self.status_after else "running"
        return EventPage(status, [e for e in self.events if e.seq > after][: sse.PAGE])


class Clock:
    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


async def collect(stream) -> list[str]:
    return [frame async for frame in stream]


def frames_of(chunks: list[str]) -> list[dict]:
    out = []
    for chunk in chunks:
        if chunk.startswith("id:"):
            lines = dict(line.split(": ", 1) for line in chunk.strip().split("\n"))
            out.append({"id": int(lines["id"]), "event": lines["event"], "data": json.loads(lines["data"])})
    return out


async def test_frames_follow_the_format_and_the_stream_ends_after_the_final_status():
    log = Log([[record(1, "queued"), record(2)], [], [record(3, "status", status="completed")]], status_after=3)
    chunks = await collect(sse.event_stream(log.read, 0, poll_s=0))
    assert chunks[0] == f"retry: {sse.RETRY_MS}\n\n"
    assert chunks[1] == 'id: 1\nevent: queued\ndata: {"seq":1,"at":"2026-01-02T03:04:05Z","kind":"queued",' \
        '"stage":"generating","progress":1,"scene":1,"message":"m1","data":{}}\n\n'
    frames = frames_of(chunks)
    assert [f["id"] for f in frames] == [1, 2, 3] and frames[-1]["event"] == "status"
    assert log.reads == [0, 2, 2]  # each read asks for what came after the last frame sent


async def test_resuming_after_a_seq_sends_exactly_the_rest():
    everything = [record(n) for n in range(1, 6)] + [record(6, "status", status="failed")]
    log = Log([everything], status_after=1)
    frames = frames_of(await collect(sse.event_stream(log.read, 4, poll_s=0)))
    assert [f["id"] for f in frames] == [5, 6]


async def test_a_long_log_is_read_page_by_page_before_it_ends():
    everything = [record(n) for n in range(1, 2 * sse.PAGE + 11)]
    log = Log([everything], status_after=1)  # finished from the first read on
    frames = frames_of(await collect(sse.event_stream(log.read, 0, poll_s=0)))
    assert [f["id"] for f in frames] == list(range(1, 2 * sse.PAGE + 11))
    assert log.reads == [0, sse.PAGE, 2 * sse.PAGE]


async def test_keepalive_comments_and_the_time_bound():
    log = Log([[record(1)]])  # never finishes
    chunks = await collect(sse.event_stream(log.read, 0, poll_s=0, keepalive_s=3, max_s=10, clock=Clock(1.0)))
    assert [f["id"] for f in frames_of(chunks)] == [1]
    assert ": keepalive\n\n" in chunks
    assert chunks[-1].startswith(": stream time limit reached")


async def test_a_generation_deleted_meanwhile_ends_the_stream():
    calls = []

    async def read(after):
        calls.append(after)
        return None

    assert await collect(sse.event_stream(read, 0, poll_s=0)) == [f"retry: {sse.RETRY_MS}\n\n"]
    assert calls == [0]


def test_ended_before_means_finished_with_nothing_new():
    assert sse.ended_before(EventPage("completed", []))
    assert not sse.ended_before(EventPage("completed", [record(1)]))
    assert not sse.ended_before(EventPage("running", []))


def test_cursor_round_trip_and_refusals():
    assert sse.decode_cursor(sse.encode_cursor(AT, "abc-123")) == (AT, "abc-123")
    for bad in ("", "x", "!!!", sse.encode_cursor(AT, "a")[:-3], "WzEsMl0", "1.a.b", "1" * 17 + ".a", "1.a\x00"):
        with pytest.raises(ValueError):
            sse.decode_cursor(bad)
