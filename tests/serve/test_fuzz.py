"""Schemathesis against the running offline app's own OpenAPI document, run as a user runs it:
its command line, every operation, positive and negative data, its coverage phase (the
boundary values of every declared constraint, deterministically), generated cases, the
stateful phase where the document declares links, and all of its checks, with a valid token.

Any failure fails the test with Schemathesis' own report of it: a server error, a status code,
content type, header or body the document does not declare, invalid data accepted, valid data
refused, a route that ignores its auth. This is what keeps the document and the server from
drifting apart. Its figures (operations, cases, failures before and after): docs/benchmarks.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import pytest

from tests.serve.conftest import auth

pytestmark = pytest.mark.serve

ROOT = Path(__file__).resolve().parents[2]
FUZZ_USER = "fuzzer"
EXAMPLES_PER_OPERATION = 30  # generated cases per operation and mode, besides the coverage phase's
SEED = 20261207  # fixed: a failure reproduces with the same command


def schemathesis_command(base: str, report_dir) -> list[str]:
    return [
        sys.executable, "-m", "schemathesis.cli", "run", f"{base}/openapi.json",
        "-H", f"Authorization: {auth(FUZZ_USER)['Authorization']}",
        # All checks; positive_data_acceptance as tests/serve/fuzz_hooks.py refines it (two rules
        # the document states in words, not in JSON Schema).
        "--checks", "all", "--exclude-checks", "positive_data_acceptance", "--mode", "all", "--phases", "examples,coverage,fuzzing,stateful",
        "-n", str(EXAMPLES_PER_OPERATION), "--seed", str(SEED), "--continue-on-failure",
        "--request-timeout", "30", "--report", "junit", "--report-dir", str(report_dir),
    ]


def cancel_all(base: str) -> None:
    """The generations the fuzzer got accepted would keep the shared test cluster busy for the
    tests after this one."""
    headers = auth(FUZZ_USER)
    listing = httpx.get(f"{base}/api/generations", params={"limit": 100}, headers=headers, timeout=30).json()
    for generation in listing["generations"]:
        if generation["status"] in ("queued", "running"):
            httpx.delete(f"{base}/api/generations/{generation['generation_id']}", headers=headers, timeout=30)


def test_api_keeps_its_openapi_contract(offline_app, tmp_path):
    try:
        env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.serve.fuzz_hooks", "PYTHONPATH": str(ROOT)}
        # Run in tmp_path: Schemathesis keeps its example database in the working directory, and
        # a fresh one each run keeps the run the same every time.
        run = subprocess.run(schemathesis_command(offline_app, tmp_path), capture_output=True, text=True, timeout=600,
                             cwd=tmp_path, env=env)
    finally:
        cancel_all(offline_app)
    (tmp_path / "schemathesis.txt").write_text(run.stdout + run.stderr)  # the figures (docs/benchmarks.md)
    print(run.stdout[-1500:])
    [report] = tmp_path.glob("junit*.xml")
    cases = ET.parse(report).getroot().findall(".//testcase")
    operations = {case.get("name") for case in cases}
    assert len(operations) >= 12, (operations, run.stdout[-3000:])
    failed = [case.get("name") for case in cases if case.find("failure") is not None or case.find("error") is not None]
    assert run.returncode == 0 and not failed, f"Schemathesis failed on {failed}:\n{run.stdout[-12000:]}"
