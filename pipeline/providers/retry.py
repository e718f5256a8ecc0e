"""One explicit retry policy for every provider call.

The openai client's built-in retries are switched off (max_retries=0) so that what is retried,
how long we wait and how many attempts were made is decided here, logged, and recorded in
metadata, the same way for chat and image calls.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TypeVar

import openai

from pipeline.providers.base import ProviderError
from pipeline.settings import RetrySettings
from pipeline.telemetry import hooks

logger = logging.getLogger("sceneref.providers")

T = TypeVar("T")

# 408 request timeout and 409 lock conflicts are transient too (the openai client retries them).
RETRYABLE_STATUS = frozenset({408, 409, 429})


@dataclass(frozen=True)
class Failure:
    """What went wrong on one attempt, in provider-neutral terms."""

    retryable: bool
    message: str
    status_code: int | None = None
    retry_after_s: float | None = None


def parse_retry_after(headers: object) -> float | None:
    """Seconds to wait from `retry-after-ms` or `Retry-After` (seconds or an HTTP date)."""
    get = getattr(headers, "get", None)
    if get is None:
        return None
    millis = get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _server_message(error: openai.APIStatusError) -> str:
    body = error.body
    if isinstance(body, dict) and isinstance(body.get("message"), str) and body["message"]:
        return body["message"]
    return error.message


def classify(error: BaseException) -> Failure | None:
    """Map a client exception to a Failure; None for exceptions that are bugs, not provider
    failures, so they propagate unchanged."""
    if isinstance(error, ProviderError):
        return Failure(error.retryable, str(error), error.status_code)
    if isinstance(error, openai.APITimeoutError):
        return Failure(True, "request timed out")
    if isinstance(error, openai.APIConnectionError):
        return Failure(True, f"connection error: {error.message}")
    if isinstance(error, openai.APIStatusError):
        status = error.status_code
        retryable = status in RETRYABLE_STATUS or status >= 500
        retry_after = parse_retry_after(error.response.headers) if retryable else None
        return Failure(retryable, _server_message(error), status, retry_after)
    return None


def failure_kind(failure: Failure) -> str:
    """A bounded label for a failure (metrics): never its message, which may quote a prompt."""
    code = failure.status_code
    if code == 429:
        return "rate_limited"
    if code is not None:
        return "server_error" if code >= 500 else f"http_{code}" if code in (408, 409) else "client_error"
    text = failure.message.lower()
    if "timed out" in text or "timeout" in text:
        return "timeout"
    if "connection" in text:
        return "connection"
    if "no replica" in text:
        return "replica_unavailable"
    return "retryable" if failure.retryable else "other"


def call_kind(what: str) -> str:
    """The metrics label of a call from its description: chat, image, model_check or other."""
    first = what.split(" ", 1)[0].lower()
    return {"chat": "chat", "image": "image", "model": "model_check"}.get(first, "other")


def backoff_delay(attempt: int, retry: RetrySettings, retry_after_s: float | None = None) -> float:
    """Delay after failed attempt `attempt` (1-based): the server's Retry-After when given,
    else exponential backoff; both capped at `max_delay_s`."""
    if retry_after_s is not None:
        return min(retry_after_s, retry.max_delay_s)
    return min(retry.initial_delay_s * retry.multiplier ** (attempt - 1), retry.max_delay_s)


async def with_retries(
    call: Callable[[], Awaitable[T]],
    retry: RetrySettings,
    *,
    what: str,
    classify_error: Callable[[BaseException], Failure | None] | None = None,
    kind: str | None = None,
) -> T:
    """Run `call` until it succeeds, retrying transient failures up to `retry.max_attempts`.
    `classify_error` (default: `classify`, provider errors) says what is transient; the Serve
    layer passes its own for replicas that went away.

    Non-retryable failures (e.g. 400/401/403/404/422) raise ProviderError at once with the
    server's message and status. Exhausted retries raise ProviderError(retryable=True) that
    names `what` and the number of attempts.

    Every attempt is reported to the telemetry hooks under `kind` (default: from `what`):
    retries by reason, and each call's outcome once it ends.
    """
    kind = kind or call_kind(what)
    attempt = 0
    while True:
        attempt += 1
        try:
            result = await call()
        except Exception as error:
            failure = (classify_error or classify)(error)
            if failure is None:
                hooks().provider_call(kind, "error", "bug")
                raise
            status = f"HTTP {failure.status_code}: " if failure.status_code else ""
            if not failure.retryable or attempt >= retry.max_attempts:
                hooks().provider_call(kind, "error", failure_kind(failure))
            else:
                hooks().provider_retry(kind, failure_kind(failure))
            if not failure.retryable:
                if isinstance(error, ProviderError):
                    raise
                raise ProviderError(
                    f"{what} failed ({status}{failure.message}); not retryable",
                    retryable=False,
                    status_code=failure.status_code,
                ) from error
            if attempt >= retry.max_attempts:
                raise ProviderError(
                    f"{what} failed after {attempt} attempt{'s' if attempt > 1 else ''} "
                    f"({status}{failure.message})",
                    retryable=True,
                    status_code=failure.status_code,
                ) from error
            delay = backoff_delay(attempt, retry, failure.retry_after_s)
            logger.warning(
                "%s: attempt %d/%d failed (%s%s); retrying in %.2fs%s",
                what,
                attempt,
                retry.max_attempts,
                status,
                failure.message,
                delay,
                " (Retry-After)" if failure.retry_after_s is not None else "",
            )
            await asyncio.sleep(delay)
        else:
            hooks().provider_call(kind, "ok")
            return result
