"""A generation's progress as server-sent events, read from the job store's event log.

The stream is built here, free of any web framework, so it is tested without a server: the
ingress wraps it in a streaming response. Why it looks like this:
- Events come from the shared store, never from one process's memory, so any replica streams
  any generation, wherever it runs. The stream polls the store (`poll_s`); between events a
  comment line every `keepalive_s` keeps proxies from closing an idle connection.
- Each event carries `id: <seq>`, so a client that reconnects (EventSource does it by itself,
  sending `Last-Event-ID`) gets exactly the events after the last one it saw.
- It ends after the final status event: the job's status is read before its events, and the
  store writes the final status event with the final status, so a finished status means the
  page holds every event there will be.
- It is bounded (`max_s`): a replica is never held by one client forever; the client
  reconnects with its Last-Event-ID and goes on where it was.
- A job store that cannot be reached mid-stream does not break it: the stream says so in a
  comment line and polls on until the store is back (or `max_s`), so the client misses nothing.
- The log has no silent gaps: events a runner could not store are announced in their place by
  a `gap` event (`data.lost`: how many), streamed like any other.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta, timezone

from sqlalchemy.exc import InterfaceError, OperationalError

from pipeline.jobs.tables import FINISHED
from pipeline.jobs.records import EventPage, EventRecord

PAGE = 100  # events per read
RETRY_MS = 2000  # how soon EventSource reconnects after the stream ends (the `retry:` field)


def sse_frame(event: EventRecord) -> str:
    """One event in the text/event-stream format; the data is one line of JSON."""
    payload = json.dumps(event.model_dump(mode="json"), separators=(",", ":"), ensure_ascii=False)
    return f"id: {event.seq}\nevent: {event.kind}\ndata: {payload}\n\n"


def finished(page: EventPage) -> bool:
    return page.status in FINISHED


async def event_stream(
    read: Callable[[int], Awaitable[EventPage | None]],
    after: int,
    *,
    first: EventPage | None = None,
    poll_s: float = 1.0,
    keepalive_s: float = 15.0,
    max_s: float = 300.0,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncIterator[str]:
    """Frames of the events after seq `after` until the final status (or `max_s`).

    `read(after_seq)` answers a page of at most PAGE events after that seq and the job's status
    (None once the generation is gone); `first` is a page the caller already read (it checked
    the generation exists). The first frame sets the client's reconnection delay.
    """
    start = last_sent = clock()
    yield f"retry: {RETRY_MS}\n\n"
    page = first
    while True:
        if page is None:
            try:
                page = await read(after)
            except (OperationalError, InterfaceError):  # the store is away: wait for it, keep the stream
                if clock() - start >= max_s:
                    yield ": stream time limit reached; reconnect with Last-Event-ID\n\n"
                    return
                yield ": the job store cannot be reached; waiting for it\n\n"
                last_sent = clock()
                await asyncio.sleep(poll_s)
                continue
            if page is None:  # deleted meanwhile (retention): nothing more will come
                return
        for event in page.events:
            yield sse_frame(event)
            after = event.seq
            last_sent = clock()
        if finished(page) and len(page.events) < PAGE:
            return  # the status was final before these events were read: they were the last
        if len(page.events) < PAGE:  # caught up: wait for more
            now = clock()
            if now - start >= max_s:
                yield ": stream time limit reached; reconnect with Last-Event-ID\n\n"
                return
            if now - last_sent >= keepalive_s:
                yield ": keepalive\n\n"
                last_sent = now
            await asyncio.sleep(poll_s)
        page = None


def ended_before(page: EventPage) -> bool:
    """Nothing after the client's last event, and the job is finished: the stream has no more
    to say (HTTP 204, which also tells EventSource to stop reconnecting)."""
    return finished(page) and not page.events


# --- the list's cursor ---------------------------------------------------------------------


CURSOR_PATTERN = r"^[0-9]{1,16}\.[A-Za-z0-9_-]{1,64}$"
"""`<microseconds since the epoch>.<generation id>`: every string of this form is a position in
the list (up to the year 2286), so the OpenAPI document can say exactly which cursors exist."""
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def encode_cursor(created_at: datetime, generation_id: str) -> str:
    """Where the next page of a user's list starts: the last row's creation time and id."""
    if created_at.tzinfo is None:
        created_at = created_at.replace(tzinfo=timezone.utc)
    return f"{(created_at - _EPOCH) // timedelta(microseconds=1)}.{generation_id}"


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The (created_at, generation_id) a cursor names; ValueError for anything else."""
    if not re.fullmatch(CURSOR_PATTERN, cursor):
        raise ValueError("not a cursor of this list")
    micros, generation_id = cursor.split(".", 1)
    return _EPOCH + timedelta(microseconds=int(micros)), generation_id
