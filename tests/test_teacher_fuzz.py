"""Schemathesis against the real ``opd serve-teacher``'s published OpenAPI schema (loaded from the running
server).

Schema-valid and schema-violating requests, with and without the bearer token: none may get a 5xx, and every
answer must conform to the schema (a documented status code and content type, a body matching the response
model); with the token, whatever the schema forbids must be refused with a 4xx. Bounded (~40 examples per
operation and mode, fixed seed) so it runs in about a minute on the session's shared server.

The cases are drawn with ``schema.as_strategy`` under a plain ``@given``: schemathesis's own pytest loader
(``schemathesis.pytest.from_fixture``) fails on pytest 9 in schemathesis 4.32 (``Function`` has no
``_nodeid``).
"""

from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

# the session's one `teacher_server` (shared with test_teacher_server.py)
pytest_plugins = ["teacher_fixture"]

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
OPERATIONS = {"GET /health", "POST /v1/score", "POST /v1/generate", "POST /v1/reward"}
PER_OPERATION = 40


@pytest.fixture(scope="module")
def teacher_schema(teacher_server):
    url, token = teacher_server
    return schemathesis.openapi.from_url(f"{url}/openapi.json", headers={"Authorization": f"Bearer {token}"},
                                         timeout=30)


def _fuzz(schema, mode: GenerationMode, examples: int, call) -> Counter:
    """Run ``call(case)`` on ``examples`` cases over every operation; returns how many each operation got."""
    seen: Counter = Counter()

    @given(case=schema.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case):
        seen[case.operation.label] += 1
        call(case)

    run()
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_fuzz_with_token(teacher_schema, teacher_server, mode):
    auth = {"Authorization": f"Bearer {teacher_server[1]}"}
    checks = CHECKS + ([negative_data_rejection] if mode == GenerationMode.NEGATIVE else [])
    seen = _fuzz(teacher_schema, mode, PER_OPERATION * len(OPERATIONS),
                 lambda case: case.call_and_validate(headers=auth, checks=checks, timeout=60))
    assert set(seen) >= OPERATIONS - ({"GET /health"} if mode == GenerationMode.NEGATIVE else set()), seen


@pytest.mark.slow
def test_fuzz_without_token(teacher_schema):
    """Without the token every path but /health is answered 401 before its body is even parsed."""

    def call(case):
        response = case.call_and_validate(checks=CHECKS, timeout=60)
        assert case.path == "/health" or response.status_code == 401, (response.status_code, response.text)

    assert set(_fuzz(teacher_schema, GenerationMode.POSITIVE, 15 * len(OPERATIONS), call)) == OPERATIONS
