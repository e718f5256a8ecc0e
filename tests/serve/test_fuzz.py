"""Schemathesis against the running offline app's own OpenAPI document, with a valid token.

Every operation the document lists gets a bounded number of generated requests (valid and
invalid ones); each answer must be no server error, a status code the document declares for
that operation, with the content type and body schema declared for it. This is what keeps the
document and the server from drifting apart: a new error path that is not declared fails here.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.serve.conftest import auth

pytestmark = pytest.mark.serve

FUZZ_USER = "fuzzer"
EXAMPLES_PER_OPERATION = 20  # per operation and mode: 9 operations x 2 modes, about 360 requests
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def accepted(offline_app):
    """Generations the fuzzer got accepted, cancelled at the end: they would otherwise keep the
    shared test cluster busy for the tests after this one."""
    ids: list[str] = []
    yield ids
    for generation_id in ids:
        httpx.delete(f"{offline_app}/api/generations/{generation_id}", headers=auth(FUZZ_USER), timeout=10)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_keeps_its_openapi_contract(offline_app, accepted, mode):
    # Schemathesis' pytest plugin (`from_fixture`) does not run on this pytest; the schema's
    # own strategies with plain Hypothesis do the same work, one operation after another.
    schema = schemathesis.openapi.from_url(f"{offline_app}/openapi.json")
    headers = auth(FUZZ_USER)
    failures: dict[str, str] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9

    for operation in operations:

        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case) -> None:
            response = case.call_and_validate(base_url=offline_app, headers=headers, checks=CHECKS, timeout=30)
            if response.status_code == 202 and case.method.upper() == "POST" and "generate" in case.path:
                accepted.append(response.json()["generation_id"])

        try:
            fuzz()
        except Unsatisfiable:
            # Negative mode on an operation with no parameters or body (GET /api/health): there
            # is nothing to make invalid, so no request can be generated.
            assert mode == GenerationMode.NEGATIVE
            assert len(operation.path_parameters) + len(operation.query) + len(operation.body) == 0
        except Exception as exc:  # collected, so one run reports every operation that fails
            failures[f"{operation.method.upper()} {operation.path}"] = str(exc)[:3000]
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
