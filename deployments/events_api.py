"""Live progress routes, as a mixin the `Ingress` inherits: a generation's events as
server-sent events, and the caller's own list of generations.

Both read only the shared job store (`self.store`, through the replica's request thread pool
`self._api`), so any replica answers for any generation, wherever it runs. The stream's rules
(resumption, its end, keepalive, its time bound) are in `pipeline.jobs.events`; here are the HTTP
details: the owner check (404 for anyone else, so ids cannot be probed), `Last-Event-ID` or
`?after=`, 204 when there is nothing more to say, and the OpenAPI declaration.
"""

# No `from __future__ import annotations`: FastAPI must see the handlers' real parameter types.
from typing import Optional

from fastapi import Depends, Header, HTTPException, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, Field

from deployments.api import principal, route
from deployments.auth import Principal
from deployments.contract import AUTHED, JOB_STORE, check_generation_id, responses
from pipeline.jobs import events as sse
from pipeline.jobs.records import GenerationSummary

MAX_SEQ = 2**31 - 1  # the events.seq column is a 32-bit integer
MAX_PAGE = 100


class EventStream(StreamingResponse):
    media_type = "text/event-stream"


class GenerationList(BaseModel):
    """The caller's generations, newest first; `next_cursor` continues the list (absent at its end)."""

    generations: list[GenerationSummary]
    next_cursor: Optional[str] = Field(None, description="pass as ?cursor= for the next page; null at the end")


_STREAM_DOC = (
    "text/event-stream of the generation's progress events after `Last-Event-ID` (header) or "
    "`after`: each has `id: <seq>`, `event: <kind>` and `data: <json>` (seq, at, kind, stage, progress, "
    "scene, message, data). Comment lines keep an idle connection open. The stream ends after the "
    "`status` event (the final status); it also ends after a time limit, and the client reconnects "
    "with the last id it saw."
)


_SSE_EVENT = {
    "type": "object",
    "description": "one event of the stream, as an EventSource client parses it",
    "properties": {"id": {"type": "string"}, "event": {"type": "string"}, "data": {"type": "string"},
                   "retry": {"type": "integer"}},
}


class EventRoutes:
    """Routes for the `Ingress`: needs `self.store` (JobStore) and `self._api(fn, *args)`."""

    events_poll_s: float = 1.0
    events_keepalive_s: float = 15.0
    events_max_s: float = 300.0

    @route(
        "GET", "/api/generations/{generation_id}/events", response_class=EventStream,
        responses={
            200: {"content": {"text/event-stream": {"schema": _SSE_EVENT}}, "description": _STREAM_DOC},
            204: {"description": "the generation is finished and has no events after the given id: nothing to "
                                 "stream (EventSource stops reconnecting)"},
            **responses(*AUTHED, *JOB_STORE, 404, 422),
        },
    )
    async def generation_events(
        self,
        generation_id: str,
        # `int` with a None default, not Optional[int]: the document says an integer or nothing,
        # never a null (a header or query value cannot be one).
        after: int = Query(None, ge=0, le=MAX_SEQ, description="stream the events after this seq"),
        last_event_id: int = Header(None, alias="Last-Event-ID", ge=0, le=MAX_SEQ,
                                    description="set by EventSource on reconnection; wins over `after`"),
        principal: Principal = Depends(principal),
    ) -> Response:
        check_generation_id(generation_id)
        start = last_event_id if last_event_id is not None else (after or 0)
        owner = principal.subject

        async def read(after_seq: int):
            return await self._api(self.store.events_after, generation_id, owner, after_seq, sse.PAGE)

        first = await read(start)
        if first is None:  # also for another user's id
            raise HTTPException(404, detail=f"generation {generation_id} not found")
        if sse.ended_before(first):
            return Response(status_code=204)
        stream = sse.event_stream(
            read, start, first=first, poll_s=self.events_poll_s, keepalive_s=self.events_keepalive_s,
            max_s=self.events_max_s,
        )
        # No caching, no proxy buffering (nginx): each event reaches the client when it is sent.
        return EventStream(stream, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @route("GET", "/api/generations", response_model=GenerationList, responses=responses(*AUTHED, *JOB_STORE, 422))
    async def list_generations(
        self,
        limit: int = Query(20, ge=1, le=MAX_PAGE, description="generations per page"),
        cursor: str = Query(None, description="`next_cursor` of the previous page",
                            json_schema_extra={"pattern": sse.CURSOR_PATTERN}),
        principal: Principal = Depends(principal),
    ) -> dict:
        """The caller's own generations, newest first."""
        before = None
        if cursor is not None:
            try:
                before = sse.decode_cursor(cursor)
            except ValueError:
                raise RequestValidationError(
                    [{"loc": ("query", "cursor"), "msg": "not a cursor of this list", "type": "value_error"}]
                ) from None
        rows = await self._api(self.store.generations, principal.subject, limit=limit + 1, before=before)
        page = rows[:limit]
        more = len(rows) > limit
        return {
            "generations": [g.model_dump(mode="json") for g in page],
            "next_cursor": sse.encode_cursor(page[-1].created_at, page[-1].generation_id) if more else None,
        }
