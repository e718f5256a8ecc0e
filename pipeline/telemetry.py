"""Hooks through which the pipeline reports what it does, without knowing who listens.

The pipeline never imports Ray, yet its numbers must reach Prometheus through Ray Serve's
metrics API when it runs inside a replica. So the pipeline calls the hooks of one process-wide
sink (`hooks()`): a no-op by default (the CLI, unit tests), `deployments.metrics.ServeMetrics`
inside Serve replicas, `MemorySink` in tests. A sink that raises never fails a generation:
metrics are never worth a user's images.

Cost accounting uses a second, scoped channel: `collect()` opens a ledger for the code it
wraps (and the asyncio tasks that code starts), and `account()` adds a provider call's usage to
every open ledger. The runner opens one per scene and stage, so concurrent scenes and
concurrent generations in one process never mix their bills. A provider that runs in another
process (a Serve deployment) collects there and sends its usage back with its answer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

log = logging.getLogger("sceneref.telemetry")


class Telemetry:
    """The hook interface. Labels are bounded sets (stage names, provider kinds, model ids,
    error kinds): never a user id, prompt or generation id."""

    def generation_finished(self, status: str) -> None:
        """A run of a generation ended with this final status (completed, failed, cancelled)."""

    def stage_seconds(self, stage: str, seconds: float) -> None:
        """Planning per generation; enhancement, generation and scoring per scene."""

    def enhancement_iterations(self, count: int) -> None:
        """Agent 1 <-> agent 2 rounds one scene took."""

    def provider_call(self, kind: str, outcome: str, reason: str = "") -> None:
        """A provider call ended (after its retries): outcome "ok" or "error" with the reason kind."""

    def provider_retry(self, kind: str, reason: str) -> None:
        """A failed attempt that will be tried again."""

    def scorer_batch(self, scorer: str, size: int, seconds: float) -> None:
        """One forward pass of a scoring model: how many inputs, how long."""

    def selected_quality(self, score: float) -> None:
        """The overall score (0-100) of a scene's selected image."""

    def images_generated(self, provider: str, count: int) -> None:
        """Images received from the image provider."""

    def usage(self, kind: str, model: str, input_tokens: int, output_tokens: int) -> None:
        """Tokens of a scene's or the storyboard's calls, counted once where they are accounted."""

    def cost(self, stage: str, usd: float | None) -> None:
        """Estimated spend of a stage of one scene (None: a model without a price)."""


HOOKS = tuple(name for name in vars(Telemetry) if not name.startswith("_"))


class MemorySink(Telemetry):
    """Records every hook call as (name, args) in `calls`: for tests and for looking at what
    a run reports."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    def __getattribute__(self, name: str) -> Any:
        if name in HOOKS:
            return lambda *args: object.__getattribute__(self, "calls").append((name, args))
        return object.__getattribute__(self, name)

    def named(self, name: str) -> list[tuple]:
        return [args for hook, args in self.calls if hook == name]


_sink: Telemetry = Telemetry()


def set_sink(sink: Telemetry | None) -> Telemetry:
    """Install the process's sink (None: the no-op); returns the previous one."""
    global _sink
    previous, _sink = _sink, sink or Telemetry()
    return previous


def current_sink() -> Telemetry:
    return _sink


class _Guarded:
    def __getattr__(self, name: str):
        def call(*args: Any) -> None:
            try:
                getattr(_sink, name)(*args)
            except Exception:
                log.warning("telemetry hook %s failed", name, exc_info=True)

        return call


_guarded = _Guarded()


def hooks() -> Telemetry:
    """The current sink behind a guard: calling a hook never raises."""
    return _guarded  # type: ignore[return-value]


# --- cost accounting -------------------------------------------------------------------------

_ledgers: ContextVar[tuple[list, ...]] = ContextVar("sceneref_ledgers", default=())


@contextmanager
def collect() -> Iterator[list]:
    """A ledger (a list of `pipeline.costs.CallUsage`) of the calls made inside the block and
    in the tasks started from it. Ledgers nest: a call is added to every open one."""
    ledger: list = []
    token = _ledgers.set((*_ledgers.get(), ledger))
    try:
        yield ledger
    finally:
        _ledgers.reset(token)


def account(usage: Any) -> None:
    """Add one call's usage to the open ledgers (none open: nothing to do)."""
    for ledger in _ledgers.get():
        ledger.append(usage)
