"""Schemathesis: requests generated from the app's own OpenAPI schema never get a 5xx.

Cases are drawn with Hypothesis from each operation's strategy (schemathesis's pytest
plugin is not used: it does not run under this pytest version).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from quorum.runtime.engine import Engine
from quorum.server.app import create_app
from quorum.server.settings import Settings

EXAMPLES = 25  # per operation; bounded so that CI stays quick


@pytest.fixture(scope="module")
def operations(bundle_dir: Path) -> tuple[list, str]:
    engine = Engine.load(bundle_dir, device="cpu")
    app = create_app(Settings(bundle=bundle_dir, admin_token="fuzz-token", max_batch=8), engine=engine)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    return [result.ok() for result in schema.get_all_operations()], engine.manifest.name


def test_the_schema_lists_every_route(operations):
    routes = {(op.method.upper(), op.path) for op in operations[0]}
    assert {("POST", "/predict"), ("POST", "/v2/models/{name}/infer"), ("PUT", "/admin/faults")} <= routes


def _fuzz(op, model: str) -> None:
    @given(case=op.as_strategy())
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case) -> None:
        if case.path_parameters and "name" in case.path_parameters:
            case.path_parameters["name"] = model  # the served model: its bodies reach the parser, not a 404
        response = case.call()
        # 503 is the documented answer when no module can answer; no other 5xx is allowed.
        allowed = response.status_code < 500 or (response.status_code == 503 and "error" in response.json())
        assert allowed, (op.method, op.path, case.query, response.status_code, response.text[:300])

    check()


def test_no_generated_request_gets_a_5xx(operations):
    ops, model = operations
    for op in ops:
        _fuzz(op, model)
