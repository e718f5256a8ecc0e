"""Schemathesis hooks for tests/serve/test_fuzz.py (loaded by its CLI through SCHEMATHESIS_HOOKS).

Schemathesis' `positive_data_acceptance` fails any schema-valid request the server refuses.
Two rules of this API are stated in the OpenAPI document's descriptions but cannot be stated
as JSON Schema, so a schema-valid request may break them:

- a prompt needs ten *visible* characters (zero-width and format characters, lone combining
  marks and unassigned code points do not count) and no lone surrogates: the 422 names the
  prompt and one of these rules (`prompt must ...`), never a bound the schema declares;
- an image is one by its content: any bytes fit `format: binary`, and a non-image is the
  declared 415.

This check is that one with exactly these two exceptions; the run excludes the original. Any
other refusal of valid data, a 422 for a bound the document states included, still fails.
"""

from __future__ import annotations

import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance

SUBMISSIONS = ("/api/generate", "/api/generate-with-image")


def _prompt_rule(response) -> bool:
    try:
        errors = response.json().get("errors") or []
    except ValueError:
        return False
    return bool(errors) and all(e.get("field") == "prompt" and "prompt must" in e.get("message", "") for e in errors)


@schemathesis.check
def positive_data_acceptance_beyond_schema(ctx, response, case):
    path = case.operation.path
    if path in SUBMISSIONS and response.status_code == 422 and _prompt_rule(response):
        return None
    if path == "/api/generate-with-image" and response.status_code == 415:
        return None
    return positive_data_acceptance(ctx, response, case)
