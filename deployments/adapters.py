"""The only place where the pipeline meets Serve: its provider and scoring protocols
implemented over deployment handles.

A call whose replica went away (died mid-call, not started yet, a deployment that is being
redeployed, a handle queue that is full) is transient: Serve starts a new replica and the same
call then succeeds. Those errors are retried here, with backoff, under one policy
(`HandleRetry`); real errors of a provider or a scorer are not. A provider call that still finds
no replica ends as `ProviderError(retryable=True)`, a scoring call as `ScorerUnavailable`
(retryable), so the runner marks the generation as worth resuming.

An image is put into Ray's object store once and its reference goes to the four scorer
deployments: Ray resolves a top-level ObjectRef argument to the bytes in each replica, and a
scorer node pulls the object once, however many scorer replicas on it read it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import ray
from pydantic import BaseModel, ConfigDict, Field
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from pipeline.aio import all_or_nothing  # one fails for good: the rest cancelled at Serve, waited for
from pipeline.costs import CallUsage
from pipeline.providers.base import GeneratedImage, ProviderError
from pipeline.providers.retry import Failure, backoff_delay, with_retries
from pipeline.schemas import ScorerResult
from pipeline.ranking import ScoringError
from pipeline.settings import RetrySettings
from pipeline.telemetry import account

log = logging.getLogger("sceneref.handles")



class NoReplicaAnswered(RuntimeError):
    """A call got no answer within its timeout: the deployment has no live replica (its node is
    gone and no replacement is placed yet), or none that can take it. Transient, like a dead one."""


_GONE = (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError, BackPressureError, NoReplicaAnswered)


Served = Callable[[str], Awaitable[bool]]
"""Whether a deployment (by name) has a live replica now: `deployments.readiness`, asked of
Serve's controller. A call past its timeout keeps waiting while this says yes: its deployment is
busy (a flood, replicas still scaling up), not gone."""


async def bounded(response, timeout_s: float, still_served: Callable[[], Awaitable[bool]] | None = None):
    """Await a DeploymentResponse in periods of `timeout_s`. After a period with no answer, keep
    waiting while `still_served()` says the deployment has a live replica; otherwise cancel the
    call at Serve (so it leaves the router's queue) and raise NoReplicaAnswered."""
    waiting = asyncio.ensure_future(_awaited(response))
    try:
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(waiting), timeout_s)
            except asyncio.TimeoutError:
                if still_served is not None and await still_served():
                    continue
                raise NoReplicaAnswered(f"no replica answered within {timeout_s:g} s") from None
    finally:
        if not waiting.done():
            waiting.cancel()
            cancel = getattr(response, "cancel", None)
            if cancel is not None:
                cancel()


class HandleRetry(BaseModel):
    """How the ingress retries calls whose replica went away (AppArgs: `handle_retry`)."""

    model_config = ConfigDict(extra="forbid")

    calls: RetrySettings = Field(
        RetrySettings(max_attempts=5, initial_delay_s=0.5, max_delay_s=10.0),
        description="chat and image calls: attempts and backoff when their replica went away",
    )
    scoring_budget_s: float = Field(
        120.0, gt=0, description="a scoring call whose replica died is retried until a replica answers, at most this long"
    )
    scoring_call_timeout_s: float = Field(
        60.0, gt=0,
        description="one scoring call's wait for an answer before Serve's controller is asked whether the scorer has a "
        "live replica: if it has (busy, e.g. a flood), the call keeps waiting; if not (Serve's router would wait "
        "forever), it counts as 'no replica answered' and is retried within scoring_budget_s",
    )
    provider_call_timeout_s: float = Field(
        900.0, gt=0,
        description="one chat or image call's wait, the provider's own retries included; past this it counts as "
        "'no replica answered' and is retried per `calls`",
    )


class ScorerUnavailable(ScoringError):
    """No replica of a scorer answered within the budget: transient, worth resuming."""

    retryable = True


def replica_gone(error: BaseException) -> str | None:
    """A short reason when `error` (or what it wraps) means the replica behind a handle went
    away or is not there yet; None for every other error."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, _GONE):
            return _short(error)
        cause = getattr(error, "cause", None) if isinstance(error, RayTaskError) else None
        error = cause if isinstance(cause, BaseException) else error.__cause__
    return None


def _short(error: BaseException) -> str:
    kind = {
        "ActorDiedError": "replica died",
        "ActorUnavailableError": "replica unavailable",
        "ReplicaUnavailableError": "replica unavailable",
        "DeploymentUnavailableError": "deployment unavailable",
        "BackPressureError": "handle queue full",
        "NoReplicaAnswered": "",
    }
    name = next((kind[c.__name__] for c in type(error).__mro__ if c.__name__ in kind), "replica error")
    text = getattr(error, "message", None) or str(error)
    first = (text.strip().splitlines() or [""])[0]
    if not name:
        return first[:120]
    return f"{name}: {first[:120]}" if first else name


def _replica_failure(error: BaseException) -> Failure | None:
    """Transient only when the replica behind the handle went away; a provider's own error
    (already retried by the provider) and real bugs are not retried here."""
    reason = replica_gone(error)
    return None if reason is None else Failure(True, f"no replica answered: {reason}")


async def _until_served(call, retry: RetrySettings, what: str):
    """`call()` again (backoff between tries) while its replica is gone, up to max_attempts."""
    return await with_retries(call, retry, what=what, classify_error=_replica_failure, kind="handle")


def _raise_if_error(result: dict) -> dict:
    if "error" in result:
        raise ProviderError(result["error"], retryable=result["retryable"], status_code=result["status_code"])
    return result


def _served(handle, name: str, served: Served | None):
    """`still_served` for one handle's calls (None: bounded by the timeout alone)."""
    if served is None:
        return None
    deployment = getattr(handle, "deployment_name", name)
    return lambda: served(deployment)


class HandleChat:
    def __init__(self, handle: DeploymentHandle, retry: HandleRetry | None = None, served: Served | None = None):
        self.handle, self.retry = handle, retry or HandleRetry()
        self.served = _served(handle, "PromptAgents", served)

    async def complete(self, messages, *, task) -> str:
        timeout = self.retry.provider_call_timeout_s
        call = lambda: bounded(self.handle.complete.remote(messages, task), timeout, self.served)  # noqa: E731
        result = await _until_served(call, self.retry.calls, f"{task} agent")
        for usage in result.get("usage", ()):  # the replica's accounting, into this task's ledgers
            account(CallUsage.model_validate(usage))
        return _raise_if_error(result)["text"]


class HandleImages:
    def __init__(self, handle: DeploymentHandle, retry: HandleRetry | None = None, served: Served | None = None):
        self.handle, self.retry = handle, retry or HandleRetry()
        self.served = _served(handle, "ImageGenerator", served)

    async def generate(self, prompt, *, reference, variation) -> GeneratedImage:
        timeout = self.retry.provider_call_timeout_s
        call = lambda: bounded(self.handle.generate.remote(prompt, reference, variation), timeout, self.served)  # noqa: E731
        result = _raise_if_error(await _until_served(call, self.retry.calls, f"image generation (variation {variation})"))
        return GeneratedImage(data=result["data"], metadata=result["metadata"])


@dataclass
class SentBytes:
    """What the ingress sent to the scorers: image bytes inside call arguments, image bytes put
    into the object store, and the number of scoring calls (for the serving benchmark)."""

    inline: int = 0
    put: int = 0
    calls: int = 0

    @property
    def total(self) -> int:
        return self.inline + self.put


class HandleScoring:
    """One request per image and scorer, all in flight at once: each scorer deployment's
    `@serve.batch` merges them with requests from other scenes and generations.

    `by_reference=False` sends the bytes inside each call (the behaviour before images went by reference, kept
    for the serving benchmark's before/after figure)."""

    def __init__(self, handles: dict[str, DeploymentHandle], retry: HandleRetry | None = None, *, by_reference: bool = True,
                 served: Served | None = None):
        self.handles, self.retry, self.by_reference = handles, retry or HandleRetry(), by_reference
        self.served = {name: _served(handle, name, served) for name, handle in handles.items()}
        self.sent = SentBytes()
        self.put = ray.put  # replaced in tests that run without Ray

    async def score(self, images: list[bytes], prompts: list[str]) -> list[dict[str, ScorerResult]]:
        names = list(self.handles)
        if self.by_reference:
            # Serialising into the object store copies the bytes: off the event loop.
            payloads = await asyncio.to_thread(lambda: [self.put(image) for image in images])
            self.sent.put += sum(len(image) for image in images)
        else:
            payloads = list(images)
            self.sent.inline += sum(len(image) for image in images) * len(names)
        self.sent.calls += len(images) * len(names)
        outputs = await all_or_nothing(
            self.score_one(name, payload, prompt) for payload, prompt in zip(payloads, prompts) for name in names
        )
        return [
            {name: ScorerResult(**out) for name, out in zip(names, outputs[i * len(names) : (i + 1) * len(names)])}
            for i in range(len(images))
        ]

    async def score_one(self, name: str, payload, prompt: str) -> dict:
        """One image (bytes or its ObjectRef) and its prompt, scored by scorer `name`."""
        return await self.call(name, "score_text", payload, prompt)

    async def call(self, name: str, method: str, *args) -> dict:
        """`handles[name].<method>(*args)`, bounded by the call timeout and retried while its
        replica is gone; a scorer's own error is a ScoringError naming the scorer."""
        handle = self.handles[name]
        try:
            return await bounded(getattr(handle, method).remote(*args), self.retry.scoring_call_timeout_s, self.served[name])
        except Exception as error:
            reason = replica_gone(error)
            if reason is None:
                raise _scorer_error(name, error) from error
        return await self._retry_until_live(name, getattr(handle, method), args, reason)

    async def _retry_until_live(self, name: str, method, args: tuple, reason: str) -> dict:
        """The replica died mid-call: try again (backoff between tries) until Serve has a live
        replica again, within `scoring_budget_s` from the first failure."""
        budget, retry = self.retry.scoring_budget_s, self.retry.calls
        deadline = time.monotonic() + budget
        attempt = 1
        while True:
            delay = min(backoff_delay(attempt, retry), max(0.0, deadline - time.monotonic()))
            log.warning("%s: %s; retrying in %.2fs", name, reason, delay)
            await asyncio.sleep(delay)
            left = deadline - time.monotonic()
            if left <= 0:
                break
            timeout = min(left, self.retry.scoring_call_timeout_s)
            try:
                return await bounded(method.remote(*args), timeout)
            except NoReplicaAnswered as error:
                if timeout < self.retry.scoring_call_timeout_s:  # the budget ran out while waiting
                    break
                reason, attempt = replica_gone(error), attempt + 1
            except Exception as error:
                again = replica_gone(error)
                if again is None:
                    raise _scorer_error(name, error) from error
                reason, attempt = again, attempt + 1
        raise ScorerUnavailable(f"{name}: no live replica after {budget:g} s ({reason})")


class HandleConsistency:
    """The consistency scorer (image against reference image) over its deployment:
    one request per pair, each image put into the object store once, the same retry policy as
    the four text-image scorers."""

    def __init__(self, handle: DeploymentHandle, retry: HandleRetry | None = None, served: Served | None = None, *,
                 colocated: bool = False):
        # colocated: the Scoring deployment holds the consistency model too and answers a pair
        # with {"consistency": result} (deployments/colocated.py).
        self.scoring = HandleScoring({"consistency": handle}, retry, served=served)
        self.colocated = colocated

    async def similarity(self, images: list[bytes], references: list[bytes]) -> list[ScorerResult]:
        put = self.scoring.put
        unique = {id(data): data for data in [*images, *references]}  # scene 1 is everyone's reference
        refs = await asyncio.to_thread(lambda: {key: put(data) for key, data in unique.items()})
        self.scoring.sent.put += sum(len(data) for data in unique.values())
        outputs = await all_or_nothing(
            self.scoring.call("consistency", "score_pair", refs[id(i)], refs[id(r)]) for i, r in zip(images, references)
        )
        if self.colocated:
            if any("consistency" not in out for out in outputs):
                raise ScoringError("the Scoring deployment gave no consistency score: it does not hold that model")
            outputs = [out["consistency"] for out in outputs]
        return [ScorerResult(**out) for out in outputs]


class HandleColocatedScoring:
    """The text-image scorers when one deployment holds them all (layout colocated): one
    request per image (put into the object store once) answers every model's score, with the
    same timeouts and retries as HandleScoring. `names` are the models the pipeline weighs; an
    answer that lacks one is an error, not a missing score."""

    def __init__(self, handle: DeploymentHandle, names: list[str], retry: HandleRetry | None = None, *,
                 served: Served | None = None):
        self.names = list(names)
        self.calls = HandleScoring({"scoring": handle}, retry, served=served)
        self.sent = self.calls.sent

    @property
    def put(self):
        return self.calls.put

    @put.setter
    def put(self, put) -> None:
        self.calls.put = put

    async def score(self, images: list[bytes], prompts: list[str]) -> list[dict[str, ScorerResult]]:
        refs = await asyncio.to_thread(lambda: [self.calls.put(image) for image in images])
        self.sent.put += sum(len(image) for image in images)
        self.sent.calls += len(images)
        outputs = await all_or_nothing(self.calls.score_one("scoring", ref, prompt) for ref, prompt in zip(refs, prompts))
        results = []
        for output in outputs:
            missing = [name for name in self.names if name not in output]
            if missing:
                raise ScoringError(f"the Scoring deployment gave no {', '.join(missing)} score: it does not hold "
                                   "that model (its weight was changed without redeploying?)")
            results.append({name: ScorerResult(**output[name]) for name in self.names})
        return results


@dataclass(frozen=True)
class ScorerHandles:
    """The scoring deployments the ingress calls, by role (built in `deployments.app`).

    `separate`: `per_model` holds one handle per text-image scorer (by scorer name) and
    `consistency` the image-image scorer's. `colocated`: `colocated` is the one Scoring
    deployment, which answers text-image scores and consistency pairs alike."""

    layout: str
    per_model: dict[str, DeploymentHandle] = field(default_factory=dict)
    colocated: DeploymentHandle | None = None
    consistency: DeploymentHandle | None = None

    def __post_init__(self) -> None:
        if self.layout == "colocated":
            if self.colocated is None or self.per_model or self.consistency is not None:
                raise ValueError("the colocated layout has one Scoring handle and nothing else")
        elif self.layout == "separate":
            if self.colocated is not None or self.consistency is None:
                raise ValueError("the separate layout has one handle per scorer, consistency included, and no Scoring")
        else:
            raise ValueError(f"unknown scoring layout {self.layout!r}: separate or colocated")

    def needed(self, active: list[str]) -> list[DeploymentHandle]:
        """The handles a generation with these weighed text-image scorers calls."""
        if self.colocated is not None:
            return [self.colocated]
        missing = [name for name in active if name not in self.per_model]
        if missing:
            raise ValueError(f"no scorer deployment for weighed scorer(s) {', '.join(missing)}")
        return [*(self.per_model[name] for name in active), self.consistency]

    def clients(self, active: list[str], retry: HandleRetry, served: Served | None):
        """The pipeline's scoring and consistency protocols over these handles."""
        if self.colocated is not None:
            return (HandleColocatedScoring(self.colocated, active, retry, served=served),
                    HandleConsistency(self.colocated, retry, served, colocated=True))
        self.needed(active)
        return (HandleScoring({name: self.per_model[name] for name in active}, retry, served=served),
                HandleConsistency(self.consistency, retry, served))


async def _awaited(response):
    return await response


def _scorer_error(name: str, error: BaseException) -> ScoringError:
    # A replica's error arrives wrapped with its traceback; the status shows its last line.
    reason = (str(error).strip().splitlines() or [type(error).__name__])[-1]
    return ScoringError(f"{name}: {reason}")
