"""Whether this replica can serve: the deployments a generation needs have a live replica
(asked of Serve's controller), and the stores it works with answer (`StoreCheck`).

Serve's router waits without end for a replica of a deployment that has none (its node died
and no replacement is placed yet, or the cluster has no room for one), so a job submitted then
would only wait. The ingress asks here before it accepts a submission and answers 503 with
the missing deployments named and a Retry-After; `GET /api/ready` reports the same for load
balancers and operators. Answers are cached for a few seconds, so a flood of submissions costs
one controller call per replica per period; when the controller itself cannot be asked, the
service is taken as ready (the handles' own timeouts still bound every call).

The stores are the job store and the object stores of artifacts and traces: when one cannot be
reached every route that needs it answers 503, so `GET /api/ready` says so too, and a load
balancer takes the replica out until it is back (a store down for all replicas takes all of them
out, which is the truth). Each probe is one cheap round trip (`SELECT 1`, a HEAD of the bucket),
bounded in time, cached a moment, and never run twice at once for one store.
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


# A key no one writes: asking whether it exists is a round trip to a store without `ping()`.
PROBE_KEY = "sceneref-readiness-probe"


def ping_object_store(store) -> None:
    """Raise unless the object store answers: its own `ping()` where it has one, else a look for
    a key that is never written (a HEAD on S3)."""
    ping = getattr(store, "ping", None)
    if callable(ping):
        ping()
    else:
        store.exists(PROBE_KEY)


@dataclass(frozen=True)
class StoreHealth:
    checked: tuple[str, ...]  # the stores probed
    unreachable: tuple[tuple[str, str], ...] = ()  # (store, why)

    @property
    def ok(self) -> bool:
        return not self.unreachable

    def reason(self) -> str:
        parts = "; ".join(f"the {name} cannot be reached ({why})" for name, why in self.unreachable)
        return f"{parts}: this replica cannot serve until it is back; try again shortly"


class StoreCheck:
    """Cached reachability of named stores. `probes` maps a store's name to a blocking call that
    raises when the store cannot be reached; each runs in a thread, `timeout_s` at most (a store
    that hangs is as unreachable as one that refuses). While a probe of a store hangs, the next
    check reports it unreachable without starting another."""

    def __init__(self, probes: dict[str, Callable[[], None]], cache_s: float = 2.0, timeout_s: float = 3.0):
        self.probes, self.cache_s, self.timeout_s = dict(probes), cache_s, timeout_s
        self._last: StoreHealth | None = None
        self._at = -float("inf")
        self._lock = asyncio.Lock()
        self._running: dict[str, asyncio.Future] = {}

    async def check(self) -> StoreHealth:
        async with self._lock:
            if self._last is not None and time.monotonic() - self._at < self.cache_s:
                return self._last
            whys = await asyncio.gather(*(self._probe(name, probe) for name, probe in self.probes.items()))
            result = StoreHealth(
                tuple(self.probes), tuple((name, why) for name, why in zip(self.probes, whys) if why is not None)
            )
            if not result.ok:
                log.warning("not ready: %s", result.reason())
            self._last, self._at = result, time.monotonic()
            return result

    async def _probe(self, name: str, probe: Callable[[], None]) -> str | None:
        running = self._running.get(name)
        if running is not None and not running.done():
            return f"its last probe has had no answer for over {self.timeout_s:g} s"
        future = asyncio.ensure_future(asyncio.to_thread(probe))
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # observed, also when abandoned
        self._running[name] = future
        try:
            await asyncio.wait_for(asyncio.shield(future), self.timeout_s)
            return None
        except asyncio.TimeoutError:
            return f"no answer within {self.timeout_s:g} s"
        except Exception as exc:
            cause = getattr(exc, "orig", None) or exc
            first = (str(cause).splitlines() or [""])[0]
            return f"{type(cause).__name__}: {first}"[:300]
