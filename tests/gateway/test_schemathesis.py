"""Schemathesis against the served OpenAPI spec, in-process (ASGI): no request may produce a 5xx,
and the spec tells the truth: every status, content type and response body is documented, data the
schema forbids (``0`` for a boolean, ``true`` for a number) is refused and data it allows is accepted.

Bounded on purpose (a dozen examples per operation and generation mode) to fit the suite's time
budget.  Each example is sent with the token of a role drawn by Hypothesis (or none), in positive
(schema-valid: reaches the store and the model) and negative (schema-violating: exercises 401/403/422)
generation modes.
"""
from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance, negative_data_rejection, positive_data_acceptance, response_headers_conformance,
    response_schema_conformance, status_code_conformance,
)
from schemathesis.generation.modes import GenerationMode

from .support import Harness, make_harness

MAX_EXAMPLES = int(os.environ.get("INSITU_FUZZ_EXAMPLES", "12"))  # raise for a longer run
ROLES = ("doctor", "nurse", "ai-model", None)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance, negative_data_rejection, positive_data_acceptance]


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory) -> tuple[Harness, object]:
    h = make_harness(tmp_path_factory.mktemp("fuzz"))
    return h, schemathesis.openapi.from_asgi("/openapi.json", h.client.app)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_error(fuzz, mode):
    h, schema = fuzz
    tokens = {r: h.auth(r, ward="cardio") if r else {} for r in ROLES}
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {f"{o.method.upper()} {o.path}" for o in operations} >= {
        "GET /records/{pseudonym}", "PUT /records/{pseudonym}", "PATCH /records/{pseudonym}",
        "GET /nursing/{pseudonym}", "POST /predict", "GET /model", "GET /health"}
    statuses: list[int] = []

    for op in operations:
        @given(case=op.as_strategy(generation_mode=mode), role=st.sampled_from(ROLES))
        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def run(case, role):
            # a schema-generated Authorization header must not replace the role's token
            case.headers = {**(case.headers or {}), **tokens[role]}
            statuses.append(case.call_and_validate(checks=CHECKS).status_code)

        try:
            run()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE  # nothing to violate (e.g. /health has no inputs)
    assert statuses and max(statuses) < 500
    if mode is GenerationMode.POSITIVE:
        assert 200 in statuses  # the fuzzer got past authorization and validation, into the real work
