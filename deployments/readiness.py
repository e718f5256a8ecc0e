"""Whether the deployments a generation needs have a live replica, asked of Serve's controller.

Serve's router waits without end for a replica of a deployment that has none (its node died
and no replacement is placed yet, or the cluster has no room for one), so a job submitted then
would only wait. The ingress asks here before it accepts a submission and answers 503 with
the missing deployments named and a Retry-After; `GET /api/ready` reports the same for load
balancers and operators. Answers are cached for a few seconds, so a flood of submissions costs
one controller call per replica per period; when the controller itself cannot be asked, the
service is taken as ready (the handles' own timeouts still bound every call).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("sceneref.readiness")


@dataclass(frozen=True)
class Readiness:
    missing: tuple[str, ...]  # deployments with no RUNNING replica
    checked: bool = True  # False when the controller could not be asked

    @property
    def ready(self) -> bool:
        return not self.missing

    def reason(self) -> str:
        names = ", ".join(self.missing)
        verb = "has" if len(self.missing) == 1 else "have"
        return (
            f"{names} {verb} no live replica right now (a node may have gone and Serve is placing a "
            "new one); nothing was submitted: try again shortly"
        )


def running_replicas(status, app_name: str) -> dict[str, int]:
    """Deployment name -> RUNNING replicas, from a `ray.serve.schema.ServeStatus`."""
    app = status.applications.get(app_name)
    if app is None:
        return {}
    return {
        name: sum(count for state, count in overview.replica_states.items() if str(getattr(state, "value", state)) == "RUNNING")
        for name, overview in app.deployments.items()
    }


class ReadinessCheck:
    """Cached readiness of `required` deployments of `app_name`. `status` is `serve.status`
    (a blocking controller call, run in a thread); tests pass a function returning a real
    `ServeStatus`."""

    def __init__(self, status: Callable, app_name: str, required: list[str], cache_s: float = 3.0):
        self.status, self.app_name, self.required, self.cache_s = status, app_name, list(required), cache_s
        self._last: Readiness | None = None
        self._at = -float("inf")
        self._lock = asyncio.Lock()

    async def check(self) -> Readiness:
        async with self._lock:  # one controller call at a time; the others reuse its answer
            if self._last is not None and time.monotonic() - self._at < self.cache_s:
                return self._last
            try:
                running = running_replicas(await asyncio.to_thread(self.status), self.app_name)
                result = Readiness(tuple(name for name in self.required if running.get(name, 0) < 1))
            except Exception as exc:
                log.warning("could not ask Serve for replica states (%s); taking the service as ready", exc)
                result = Readiness((), checked=False)
            self._last, self._at = result, time.monotonic()
            return result
