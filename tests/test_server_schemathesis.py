"""Schemathesis against /openapi.json of a live server (the tiny model behind `test_server`'s fixture): for a bounded
number of generated requests per operation, no 5xx, and every response's status, content type and JSON body conform
to what the schema documents."""

from __future__ import annotations

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from test_server import KEY, base, llm, tiny  # noqa: F401 (shared fixtures)

schema = schemathesis.pytest.from_fixture("api_schema")
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def api_schema(base):  # noqa: F811 (test_server's fixture)
    return schemathesis.openapi.from_url(f"{base}/openapi.json")


@pytest.fixture(autouse=True)
def subnormal_floats():
    """conftest flushes denormals (for torch speed) on this thread, and hypothesis refuses to generate floats then."""
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(True)


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_generated_requests_get_documented_answers(case):
    if case.body is not None and isinstance(case.body, dict) and isinstance(case.body.get("max_tokens"), int):
        case.body["max_tokens"] = min(case.body["max_tokens"], 8)  # keep generations short; the schema allows more
    case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, checks=CHECKS, timeout=60)
