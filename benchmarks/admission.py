"""Admission throughput: what serialising the admission check with the insert costs.

A benchmark, not a test: `--threads` threads create `--jobs` generations of `--users` users,
once with plain `JobStore.create` and once with `create(..., limits=...)` (the check and the
insert in one transaction that admissions enter one at a time), on SQLite and on a throwaway
PostgreSQL cluster (testkit/postgres.py; skipped without its binaries). The limits are set high so
nothing is refused: it measures the cost of the serialised path, not refusals.

    .venv/bin/python benchmarks/admission.py
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.jobs.store import JobStore  # noqa: E402
from pipeline.jobs.limits import AdmissionLimits  # noqa: E402

REQUEST = {"prompt": "A lighthouse keeper's morning", "target_duration": 9}


def rate(url: str, limits: AdmissionLimits | None, args: argparse.Namespace) -> float:
    """Creates per second from `args.threads` threads, after a warm-up round."""
    store = JobStore(url)

    def one(index: int) -> None:
        store.create(f"gen-{index}", f"user-{index % args.users}", REQUEST, offline=True, limits=limits)

    try:
        with ThreadPoolExecutor(args.threads) as pool:
            list(pool.map(one, range(args.threads)))
            started = time.perf_counter()
            list(pool.map(one, range(args.threads, args.threads + args.jobs)))
            return args.jobs / (time.perf_counter() - started)
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--users", type=int, default=40)
    args = parser.parse_args()
    limits = AdmissionLimits(max_active_per_user=args.jobs, max_submitted_per_window=args.jobs,
                             max_unfinished=10 * args.jobs)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; {args.threads} threads, {args.jobs} jobs")
    root = tempfile.mkdtemp(prefix="sceneref-admission-")
    urls = [("sqlite", f"sqlite:///{root}/plain.db", f"sqlite:///{root}/admitted.db")]
    cluster = None
    from testkit.postgres import PostgresCluster, bin_dir

    if bin_dir() is not None:
        cluster = PostgresCluster(bin_dir()).start()
        cluster.admin("CREATE DATABASE plain")
        cluster.admin("CREATE DATABASE admitted")
        urls.append(("postgresql", cluster.url("plain"), cluster.url("admitted")))
    try:
        for name, plain_url, admitted_url in urls:
            plain, admitted = rate(plain_url, None, args), rate(admitted_url, limits, args)
            print(f"{name}: plain create {plain:.0f}/s, create with admission {admitted:.0f}/s")
    finally:
        if cluster is not None:
            cluster.stop()


if __name__ == "__main__":
    main()
