"""The Serve adapters without a Ray cluster: fake handle objects raise the real Ray and Serve
exception classes, so the classification of "the replica went away" and the retry policy are
checked exactly, and quickly. (tests/serve/test_scorer_failover.py kills a real replica.)"""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
from ray.serve._private.common import DeploymentID
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RayServeException

from deployments.adapters import HandleChat, HandleImages, HandleRetry, HandleScoring, ScorerUnavailable, replica_gone
from pipeline.providers.base import ProviderError
from pipeline.runner import transient
from pipeline.ranking import ScoringError
from pipeline.settings import RetrySettings

FAST = HandleRetry(calls=RetrySettings(max_attempts=3, initial_delay_s=0.001, max_delay_s=0.01), scoring_budget_s=0.5)
LONG_DEATH = "The actor died unexpectedly before finishing this task.\n" + "\n".join(
    f"\tdetail {i}: " + "x" * 60 for i in range(10)
)  # Ray's multi-line message: about 700 characters


def died(message: str = LONG_DEATH) -> ActorDiedError:
    error = ActorDiedError()
    error.error_msg = message
    return error


def task_error(cause: BaseException) -> RayTaskError:
    """What a replica's failure looks like at the caller: a RayTaskError that is also an
    instance of its cause's class, with the replica's traceback in its message."""
    trace = f"Traceback (most recent call last):\n  File \"scorer.py\", line 1\n{type(cause).__name__}: {cause}"
    return RayTaskError("score", trace, cause).as_instanceof_cause()


class Method:
    """`handle.<method>` of a fake DeploymentHandle: `remote(*args)` records the call and returns
    an awaitable that runs `behaviour(call_number, *args)`."""

    def __init__(self, behaviour):
        self.behaviour, self.calls = behaviour, []

    def remote(self, *args):
        self.calls.append(args)
        return self.behaviour(len(self.calls), *args)


class Handle:
    def __init__(self, **methods):
        self.__dict__.update(methods)


def scripted(*outcomes):
    """Call n gets outcomes[n-1] (the last repeats): an exception is raised, a value returned."""

    async def behaviour(n, *args):
        await asyncio.sleep(0)
        outcome = outcomes[min(n, len(outcomes)) - 1]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return behaviour


# --- classification ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        died(),
        ActorUnavailableError("connection reset", None),
        DeploymentUnavailableError(DeploymentID(name="VQAScore", app_name="sceneref")),
        BackPressureError(num_queued_requests=10, max_queued_requests=10),
        task_error(died()),  # a RayTaskError whose cause is a dead actor
    ],
    ids=["actor-died", "actor-unavailable", "deployment-unavailable", "back-pressure", "task-error-of-dead-actor"],
)
def test_errors_that_mean_the_replica_went_away_are_transient(error):
    reason = replica_gone(error)
    assert reason is not None and len(reason) < 160 and "\n" not in reason


def test_a_serve_error_raised_from_a_dead_upstream_actor_is_transient():
    wrapped = RayServeException("Request to deployment 'VQAScore' failed because an upstream actor died")
    wrapped.__cause__ = died()
    assert replica_gone(wrapped).startswith("replica died")


@pytest.mark.parametrize(
    "error",
    [
        ValueError("cannot identify image file"),
        task_error(ValueError("cannot identify image file <_io.BytesIO>")),
        task_error(RuntimeError("CUDA error: device-side assert triggered")),
        ProviderError("HTTP 400: content policy", retryable=False),
        RayServeException("some other Serve error"),
    ],
)
def test_real_errors_are_not_transient(error):
    assert replica_gone(error) is None


# --- chat and images --------------------------------------------------------------------------


async def test_chat_retries_a_dead_replica_then_answers():
    complete = Method(scripted(died(), ActorUnavailableError("restarting", None), {"text": "ok"}))
    chat = HandleChat(Handle(complete=complete), FAST)
    assert await chat.complete([{"role": "user", "content": "hi"}], task="cinematographer") == "ok"
    assert len(complete.calls) == 3


async def test_chat_that_never_finds_a_replica_is_a_short_retryable_provider_error():
    complete = Method(scripted(died()))
    chat = HandleChat(Handle(complete=complete), FAST)
    with pytest.raises(ProviderError) as info:
        await chat.complete([], task="prompt_engineer")
    assert info.value.retryable is True and len(complete.calls) == 3
    assert str(info.value).startswith("prompt_engineer agent failed after 3 attempts (no replica answered: replica died")
    assert len(str(info.value)) < 300 and transient(info.value)


async def test_provider_errors_from_the_deployment_are_not_retried_again():
    answer = {"error": "chat failed after 4 attempts (HTTP 503)", "retryable": True, "status_code": 503}
    complete = Method(scripted(answer))
    with pytest.raises(ProviderError, match="after 4 attempts") as info:
        await HandleChat(Handle(complete=complete), FAST).complete([], task="storyboard")
    assert info.value.retryable is True and info.value.status_code == 503
    assert len(complete.calls) == 1  # the deployment already retried; no second round here


async def test_images_retry_a_dead_replica_but_not_a_real_error():
    generate = Method(scripted(died(), {"data": b"png", "metadata": {"provider": "fake"}}))
    image = await HandleImages(Handle(generate=generate), FAST).generate("p", reference=None, variation=2)
    assert image.data == b"png" and len(generate.calls) == 2 and generate.calls[0] == ("p", None, 2)

    broken = Method(scripted(task_error(TypeError("unexpected keyword 'seed'"))))
    with pytest.raises(TypeError):
        await HandleImages(Handle(generate=broken), FAST).generate("p", reference=None, variation=1)
    assert len(broken.calls) == 1


# --- scoring: images by reference, a dead replica retried within a budget ----------------------

NAMES = ("pickscore", "clipscore", "vqascore", "aesthetic")


def result(score: float) -> dict:
    return {"raw": score / 100, "score": score, "truncated": False}


class Ref:
    """Stands for a Ray ObjectRef: what the fake `put` returns."""

    def __init__(self, data: bytes):
        self.data = data


def scoring(behaviours: dict, retry: HandleRetry = FAST, by_reference: bool = True):
    methods = {name: Method(behaviours.get(name, scripted(result(50.0 + i)))) for i, name in enumerate(NAMES)}
    client = HandleScoring({name: Handle(score_text=m) for name, m in methods.items()}, retry, by_reference=by_reference)
    puts: list[bytes] = []
    client.put = lambda data: puts.append(data) or Ref(data)
    return client, methods, puts


async def test_each_image_is_put_once_and_its_reference_goes_to_all_four_scorers():
    images = [b"a" * 1000, b"b" * 2000, b"c" * 3000, b"d" * 4000]
    client, methods, puts = scoring({})
    scores = await client.score(images, ["prompt"] * 4)

    assert puts == images  # one put per image
    for method in methods.values():
        payloads = [payload for payload, _ in method.calls]
        assert all(isinstance(p, Ref) for p in payloads) and [p.data for p in payloads] == images
    refs = {id(payload) for method in methods.values() for payload, _ in method.calls}
    assert len(refs) == 4  # the same four references, shared by the scorers
    assert [sorted(s) for s in scores] == [sorted(NAMES)] * 4
    assert scores[0]["vqascore"].score == 52.0
    assert (client.sent.put, client.sent.inline, client.sent.calls) == (10_000, 0, 16)

    inline, methods, puts = scoring({}, by_reference=False)
    assert await inline.score(images, ["prompt"] * 4) == scores
    assert puts == [] and methods["pickscore"].calls[1][0] == images[1]
    assert (inline.sent.put, inline.sent.inline, inline.sent.calls) == (0, 40_000, 16)


async def test_a_scoring_call_whose_replica_died_is_retried_until_a_replica_answers():
    vqa = scripted(died(), died(), ActorUnavailableError("not ready", None), result(77.0))
    client, methods, _ = scoring({"vqascore": vqa})
    [scores] = await client.score([b"img"], ["prompt"])
    assert scores["vqascore"].score == 77.0
    assert len(methods["vqascore"].calls) == 4 and len(methods["pickscore"].calls) == 1
    payloads = {id(payload) for payload, _ in methods["vqascore"].calls}
    assert len(payloads) == 1  # retried with the same object reference, not a second put


async def test_no_live_replica_within_the_budget_is_a_short_retryable_scoring_error():
    client, methods, _ = scoring({"vqascore": scripted(died())})
    with pytest.raises(ScorerUnavailable) as info:
        await client.score([b"img"], ["prompt"])
    message = str(info.value)
    assert message.startswith("vqascore: no live replica after 0.5 s (replica died: The actor died unexpectedly")
    assert len(message) < 250 and "detail 3" not in message
    assert len(methods["vqascore"].calls) >= 2 and transient(info.value)


async def test_a_retry_that_hangs_is_bounded_by_the_budget():
    async def dies_then_hangs(n, *args):
        if n == 1:
            raise died("The actor died unexpectedly before finishing this task.")
        await asyncio.Event().wait()  # the router waits for a replica that never comes

    client, methods, _ = scoring({"aesthetic": dies_then_hangs})
    with pytest.raises(ScorerUnavailable, match=r"^aesthetic: no live replica after 0.5 s \(replica died"):
        await client.score([b"img"], ["prompt"])
    assert len(methods["aesthetic"].calls) == 2


async def test_a_real_scorer_error_is_not_retried_and_stops_the_other_calls():
    cancelled: list[str] = []

    def slow(name):
        async def behaviour(n, *args):
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(name)
                raise

        return behaviour

    bad = scripted(task_error(ValueError("cannot identify image file <_io.BytesIO object>")))
    client, methods, _ = scoring({"clipscore": bad, "pickscore": slow("pickscore"), "vqascore": slow("vqascore")})
    with pytest.raises(ScoringError) as info:
        await client.score([b"not an image"], ["prompt"])
    assert not isinstance(info.value, ScorerUnavailable) and not transient(info.value)
    assert str(info.value) == "clipscore: ValueError: cannot identify image file <_io.BytesIO object>"
    assert len(methods["clipscore"].calls) == 1
    await asyncio.sleep(0)
    assert sorted(cancelled) == ["pickscore", "vqascore"]


# --- a deployment with no live replica: the router waits forever, so the caller bounds it ------


def hangs():
    async def behaviour(n, *args):
        await asyncio.Event().wait()  # Serve's router waits for a replica that never comes

    return behaviour


BOUNDED = HandleRetry(
    calls=RetrySettings(max_attempts=2, initial_delay_s=0.001, max_delay_s=0.01),
    scoring_budget_s=0.3, scoring_call_timeout_s=0.1, provider_call_timeout_s=0.1,
)


async def test_a_first_scoring_call_that_finds_no_replica_fails_within_the_budget():
    """Before: a first call to a deployment with no live replica (its node gone, no replacement
    placed yet) awaited forever, and the generation with it."""
    client, methods, _ = scoring({"vqascore": hangs()}, retry=BOUNDED)
    with pytest.raises(ScorerUnavailable, match=r"^vqascore: no live replica after 0.3 s \(no replica answered within 0.1 s\)"):
        await asyncio.wait_for(client.score([b"img"], ["prompt"]), 5)
    assert len(methods["vqascore"].calls) >= 2


async def test_provider_calls_that_find_no_replica_are_bounded_too():
    chat = HandleChat(Handle(complete=Method(hangs())), BOUNDED)
    with pytest.raises(ProviderError, match=r"no replica answered within 0.1 s") as info:
        await asyncio.wait_for(chat.complete([{"role": "user", "content": "x"}], task="cinematographer"), 5)
    assert info.value.retryable
    images = HandleImages(Handle(generate=Method(hangs())), BOUNDED)
    with pytest.raises(ProviderError, match=r"after 2 attempts"):
        await asyncio.wait_for(images.generate("p", reference=None, variation=1), 5)


async def test_a_timed_out_call_is_cancelled_at_serve():
    cancelled: list[int] = []

    class Response:
        """A DeploymentResponse: awaitable and cancellable."""

        def __init__(self):
            self.task = asyncio.ensure_future(asyncio.Event().wait())

        def __await__(self):
            return self.task.__await__()

        def cancel(self):
            cancelled.append(1)
            self.task.cancel()

    method = Method(lambda n, *args: Response())
    client = HandleScoring({"pickscore": Handle(score_text=method)}, BOUNDED)
    client.put = lambda data: Ref(data)
    with pytest.raises(ScorerUnavailable):
        await client.score([b"img"], ["prompt"])
    assert len(cancelled) == len(method.calls) >= 2


async def test_consistency_pairs_put_each_image_once_and_retry_a_dead_replica():
    from deployments.adapters import HandleConsistency

    async def by_pair(n, payload, reference):
        await asyncio.sleep(0)
        if n == 1:
            raise died()  # the first call finds its replica gone: retried, not failed
        return result(len(payload.data) + len(reference.data))

    method = Method(by_pair)
    client = HandleConsistency(Handle(score_pair=method), FAST)
    puts: list[bytes] = []
    client.scoring.put = lambda data: puts.append(data) or Ref(data)
    scene_1, previous = b"s" * 10, b"p" * 20
    a, b = b"a" * 30, b"b" * 40
    scores = await client.similarity([a, a, b, b], [previous, scene_1, previous, scene_1])
    assert sorted(puts) == sorted([a, b, previous, scene_1])  # each image once, however often it is paired
    assert [s.score for s in scores] == [50.0, 40.0, 60.0, 50.0]  # in the order asked
    assert len(method.calls) == 5
    pairs = {(payload.data, reference.data) for payload, reference in method.calls}
    assert pairs == {(a, previous), (a, scene_1), (b, previous), (b, scene_1)}


async def test_a_call_past_its_timeout_keeps_waiting_while_its_deployment_is_served():
    """A flood or a scale-up makes calls wait longer than the timeout while replicas are live:
    they are not cancelled then. Only when Serve reports no live replica do they fail."""
    release = asyncio.Event()

    async def busy(n, *args):
        await release.wait()  # a live but busy replica: the answer comes late
        return result(42.0)

    asked: list[str] = []

    async def served(deployment: str) -> bool:
        asked.append(deployment)
        if len(asked) == 3:
            release.set()
        return True

    client, methods, _ = scoring({"vqascore": busy}, retry=BOUNDED)
    client.served = {name: (lambda n=name: served(n)) for name in NAMES}
    [scores] = await asyncio.wait_for(client.score([b"img"], ["prompt"]), 5)
    assert scores["vqascore"].score == 42.0
    assert len(methods["vqascore"].calls) == 1 and asked.count("vqascore") >= 3  # one call, never cancelled

    async def gone(deployment: str) -> bool:
        return False

    chat = HandleChat(Handle(complete=Method(hangs())), BOUNDED, served=gone)
    with pytest.raises(ProviderError, match=r"no replica answered within 0.1 s"):
        await asyncio.wait_for(chat.complete([{"role": "user", "content": "x"}], task="cinematographer"), 5)
