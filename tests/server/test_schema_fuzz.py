"""Schemathesis: requests generated from the app's own OpenAPI schema never get a 5xx.

Cases are drawn with Hypothesis from each operation's strategy (schemathesis's pytest
plugin is not used: it does not run under this pytest version).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, seed, settings

from quorum.runtime.engine import Engine
from quorum.server.app import create_app
from quorum.server.settings import Settings

# per operation: 25 in CI, fewer where test_properties' QUORUM_FUZZ_EXAMPLES is lowered (make test-fast)
EXAMPLES = max(5, int(os.environ.get("QUORUM_FUZZ_EXAMPLES", "150")) // 6)


TOKEN = "fuzz-token-long-enough"


def _operations(bundle_dir: Path, **settings) -> tuple[list, Engine]:
    engine = Engine.load(bundle_dir, device="cpu")
    app = create_app(Settings(bundle=bundle_dir, max_batch=8, module_timeout_ms=200, **settings), engine=engine)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    return [result.ok() for result in schema.get_all_operations()], engine


@pytest.fixture(scope="module")
def operations(bundle_dir: Path) -> tuple[list, Engine]:
    return _operations(bundle_dir, admin_token=TOKEN)


def test_the_schema_lists_every_route(operations):
    ops = {op.method.upper() + " " + op.path: op for op in operations[0]}
    assert {"POST /predict", "POST /v2/models/{name}/infer", "PUT /admin/faults", "POST /admin/reload"} <= set(ops)
    body = ops["POST /v2/models/{name}/infer"].definition.raw["requestBody"]
    assert body["content"]["application/json"]["schema"]["required"] == ["inputs"]


def _fuzz(op, engine: Engine, admin: bool) -> list[int]:
    statuses: list[int] = []

    @given(case=op.as_strategy())
    @seed(18)
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case) -> None:
        if case.path_parameters and "name" in case.path_parameters:
            case.path_parameters["name"] = engine.manifest.name  # its bodies reach the parser, not a 404
        if admin and op.path.startswith("/admin"):
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {TOKEN}"}  # past the guard
        response = case.call()
        statuses.append(response.status_code)
        # 503 is the documented answer when no module can answer; no other 5xx is allowed.
        allowed = response.status_code < 500 or (response.status_code == 503 and "error" in response.json())
        assert allowed, (op.method, op.path, case.query, case.body, response.status_code, response.text[:300])

    try:
        check()
    finally:
        engine.faults = None  # a generated fault plan must not slow the operations after it
    return statuses


def test_no_generated_request_gets_a_5xx(operations):
    ops, engine = operations
    reached: dict[str, set[int]] = {}
    for op in ops:
        reached[op.method.upper() + " " + op.path] = set(_fuzz(op, engine, admin=True))
    # The bodies reach the handlers: some generated requests are accepted, not all refused.
    assert 200 in reached["PUT /admin/faults"] and 200 in reached["GET /admin/faults"]
    assert reached["POST /v2/models/{name}/infer"] - {400}, "every v2 request was refused as unparseable"


def test_without_an_admin_token_the_admin_routes_are_404(bundle_dir: Path):
    ops, engine = _operations(bundle_dir)
    for op in ops:
        if op.path.startswith("/admin"):
            assert set(_fuzz(op, engine, admin=False)) == {404}, op.path
