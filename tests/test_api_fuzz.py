"""Property-based API fuzzing: schemathesis generates requests from the server's own OpenAPI document
and sends them in-process to the ASGI app (tiny model, real index). Every answer must be below 500,
carry a status code and content type the document declares, and match the declared response schema."""
from __future__ import annotations

import collections

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed: pip install 'mimic-engine[dev]'")
from hypothesis import HealthCheck, settings  # noqa: E402  (schemathesis brings hypothesis)
from schemathesis.checks import (content_type_conformance, not_a_server_error, response_schema_conformance,  # noqa: E402
                                 status_code_conformance)

from tests.test_server import make_client  # noqa: E402

EXAMPLES_PER_OPERATION = 15
STATUSES = collections.Counter()  # (operation, status) -> answers, printed at the end


@pytest.fixture(scope="module")
def app(tiny_encoders, tmp_path_factory):
    client, _ = make_client(tiny_encoders, tmp_path_factory.mktemp("fuzz") / "index", max_items=4, max_k=20)
    with client:  # runs the app's start-up and, at the end, its shutdown (index and model closed)
        assert client.post("/v1/documents", json={"documents": [{"id": "seed", "text": "a stored document"}]}).status_code == 200
        yield client.app
    print("fuzz answers by operation and status:", dict(sorted(STATUSES.items())))
    assert sum(STATUSES.values()) >= 9 * 5  # every operation really ran examples


@pytest.fixture(scope="module")
def api_schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_generated_requests_get_declared_answers(case):
    response = case.call_and_validate(checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                                              response_schema_conformance])
    STATUSES[(f"{case.method} {case.path}", response.status_code)] += 1
