"""Property-based fuzzing of the server's own OpenAPI schema with schemathesis: whatever it generates (valid,
edge-case and invalid bodies for every operation), the answer is never a 5xx. Against the fake engine, so it is
fast; bounded to 50 examples per operation."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from fake_engine import FakeEngine
from runner.server.config import ModelCard, ServerConfig
from runner.server.app import create_app

engine = FakeEngine(n_parallel=4, token_delay=0.0, n_ctx=512)
app = create_app(ServerConfig(), engine=engine, card=ModelCard(name="fake-model"))
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    # name the served model so generated requests get past the 404 and into validation and generation
    # (unknown models are covered by the bad-request corpus)
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = "fake-model"
    case.call_and_validate(checks=[not_a_server_error])


def test_fuzzing_reached_the_engine():
    """Runs after the fuzz test (file order): some generated requests were valid enough to generate."""
    submitted = engine.submitted
    assert {kind for kind, _, _ in submitted} == {"chat", "complete"}


def test_fuzzing_reached_the_embeddings():
    assert engine.embed_calls > 0
