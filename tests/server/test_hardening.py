"""The server against its own clients: each attack of the hardening review, sent 20 times (four times
the failures that open a breaker by default), leaves every breaker closed and the service answering
with all modules; limits answer fast 4xx/503s."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from quorum.server.app import create_app
from quorum.server.limits import InFlightLimit
from quorum.server.settings import Settings

ROUNDS = 20  # Settings.breaker_failures is 5: an attack that counted as a failure would open it


def _all_closed_and_serving(c: TestClient, inputs: list, modules: int) -> None:
    states = c.get("/modules").json()["modules"]
    assert {m["breaker"] for m in states} == {"closed"}, [m for m in states if m["breaker"] != "closed"][:3]
    r = c.post("/predict", json={"inputs": inputs})
    assert r.status_code == 200 and len(r.json()["modules"]["used"]) == modules and not r.json()["degraded"]


def test_huge_finite_inputs_to_a_tabular_bundle_are_refused_and_open_no_breaker(regression_bundle: Path):
    settings = Settings(bundle=regression_bundle, breaker_failures=2)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        for value in (1e30, -1e38, 3e38, 1e300):
            for _ in range(ROUNDS // 4):
                r = c.post("/predict", json={"inputs": [[value] * 10] * 6})
                assert r.status_code == 422 and "standard deviations" in r.json()["error"], r.text
        _all_closed_and_serving(c, [[50.0] * 10], modules=5)


def test_injected_faults_and_slow_batches_open_no_breaker(bundle_dir: Path, test_images):
    settings = Settings(bundle=bundle_dir, allow_fault_injection=True, breaker_failures=2, executor="isolated")
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        for i in range(ROUNDS):
            r = c.post(f"/predict?fail={i % 40},{(i + 1) % 40}&nan={(i + 2) % 40}", json={"inputs": [[0] * 784]})
            assert r.status_code == 200 and len(r.json()["modules"]["injected"]) == 3, r.text[:300]
        _all_closed_and_serving(c, test_images[0][:2].tolist(), modules=40)
    with TestClient(
        create_app(settings.model_copy(update={"module_timeout_ms": 50})), raise_server_exceptions=False
    ) as c:
        for _ in range(5):  # every module waits past its timeout: the request's doing, not theirs
            r = c.post("/predict?budget=4&delay_ms=80", json={"inputs": [[0] * 784]})
            assert r.status_code == 503 and "timeout" in r.json()["error"]
        _all_closed_and_serving(c, test_images[0][:2].tolist(), modules=40)


@pytest.mark.parametrize("token", ["", "short-token"])
def test_an_empty_or_short_admin_token_turns_the_admin_api_off(bundle_dir: Path, token: str):
    with TestClient(create_app(Settings(bundle=bundle_dir, admin_token=token))) as c:
        for _ in range(ROUNDS):
            assert c.get("/admin/faults", headers={"Authorization": f"Bearer {token}"}).status_code == 404
            assert c.post("/admin/reload", headers={"Authorization": "Bearer "}).status_code == 404
            r = c.post("/predict?fail=1", json={"inputs": [[0] * 784]}, headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 403


def _v2(**tensor: object) -> dict:
    return {"inputs": [{"name": "input", "shape": [1, 784], "datatype": "UINT8", "data": [0] * 784, **tensor}]}


BAD_REQUESTS = [
    ("/predict?drop=0.5&seed=-3", "application/json", json.dumps({"inputs": [[0] * 784]}).encode(), {}),
    ("/predict?specialist=%C2%B2", "application/json", json.dumps({"inputs": [[0] * 784]}).encode(), {}),
    ("/predict?specialist=" + "9" * 5000, "application/json", json.dumps({"inputs": [[0] * 784]}).encode(), {}),
    ("/predict", "application/octet-stream", bytes(784), {"x-shape": ",".join(["1"] * 40 + ["784"])}),
    ("/predict", "application/octet-stream", bytes(784), {"x-shape": "1," + "9" * 400}),
    ("/v2/models/small/infer", "application/json", json.dumps(_v2(shape=[], data=[0])).encode(), {}),
    ("/v2/models/small/infer", "application/json", json.dumps({**_v2(), "parameters": [1, 2]}).encode(), {}),
    ("/v2/models/small/infer", "application/json", json.dumps({**_v2(), "outputs": {"name": "label"}}).encode(), {}),
    ("/v2/models/small/infer", "application/json", json.dumps({**_v2(), "outputs": [{"name": {"a": 1}}]}).encode(), {}),
    ("/v2/models/small/infer", "application/json", json.dumps({**_v2(), "outputs": [{"name": ["x"]}]}).encode(), {}),
    (
        "/v2/models/small/infer",
        "application/json",
        json.dumps(_v2()).encode(),
        {"inference-header-content-length": "²".encode()},
    ),
    ("/v2/models/small/infer", "application/json", json.dumps(_v2(parameters=[1])).encode(), {}),
]


@pytest.mark.parametrize(("path", "content_type", "body", "headers"), BAD_REQUESTS)
def test_each_reproduced_bad_input_is_a_4xx_with_a_message(bundle_dir: Path, path, content_type, body, headers):
    with TestClient(create_app(Settings(bundle=bundle_dir)), raise_server_exceptions=False) as c:
        for _ in range(ROUNDS):
            r = c.post(path, content=body, headers={"content-type": content_type, **headers})
            assert 400 <= r.status_code < 500 and r.json()["error"], (r.status_code, r.text[:200])
        _all_closed_and_serving(c, [[0] * 784], modules=40)


def test_made_up_methods_do_not_grow_the_metrics(bundle_dir: Path):
    with TestClient(create_app(Settings(bundle=bundle_dir)), raise_server_exceptions=False) as c:
        for i in range(ROUNDS):
            c.request(f"BREW{i}", "/predict")
        text = c.get("/metrics").text
    methods = {line.split('method="')[1].split('"')[0] for line in text.splitlines() if 'method="' in line}
    assert methods <= {"GET", "POST", "other"} and "BREW7" not in text


def test_a_body_with_too_many_numbers_is_refused_before_it_is_parsed(bundle_dir: Path):
    with TestClient(create_app(Settings(bundle=bundle_dir, max_elements=784 * 4))) as c:
        r = c.post("/predict", json={"inputs": [[0] * 784] * 5})
        assert r.status_code == 413 and "numbers" in r.json()["error"]
        r = c.post(
            "/predict",
            content=bytes(784 * 5),
            headers={"content-type": "application/octet-stream", "x-shape": "5,784", "x-dtype": "uint8"},
        )
        assert r.status_code == 413 and "numbers" in r.json()["error"]
        r = c.post("/v2/models/small/infer", json=_v2(shape=[5, 784], data=[0] * (784 * 5)))
        assert r.status_code == 413
        assert c.post("/predict", json={"inputs": [[0] * 784] * 4}).status_code == 200


def test_requests_beyond_the_in_flight_limit_get_a_fast_503_with_retry_after():
    started, release = asyncio.Event(), asyncio.Event()
    rejected: list[int] = []

    async def slow_app(scope, receive, send) -> None:
        started.set()
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    limit = InFlightLimit(slow_app, max_in_flight=1, on_reject=lambda: rejected.append(1))

    async def call(path: str) -> tuple[int, dict[bytes, bytes]]:
        sent: list[dict] = []

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        await limit({"type": "http", "method": "POST", "path": path}, receive, send)
        return sent[0]["status"], dict(sent[0]["headers"])

    async def scenario() -> None:
        first = asyncio.create_task(call("/predict"))
        await started.wait()
        status, headers = await call("/v2/models/small/infer")
        assert status == 503 and headers[b"retry-after"] == b"1" and rejected == [1]
        assert (await asyncio.wait_for(_health(), 1)) == 200  # probes are never refused
        release.set()
        assert (await first)[0] == 200
        assert (await call("/predict"))[0] == 200  # the slot is free again

    async def _health() -> int:
        release_health = asyncio.Event()
        release_health.set()
        status = []

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def ok_app(scope, receive, send) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        await InFlightLimit(ok_app, max_in_flight=0)(
            {"type": "http", "method": "GET", "path": "/readyz"}, receive, send
        )
        return status[0]

    asyncio.run(scenario())
    _ = np


def test_a_retired_engine_closes_when_its_last_request_ends():
    from quorum.server.reload import Leases

    class FakeEngine:
        closed = False

        def close(self) -> None:
            self.closed = True

    leases, old, idle = Leases(), FakeEngine(), FakeEngine()
    with leases.hold(old):  # type: ignore[arg-type]
        with leases.hold(old):  # type: ignore[arg-type]
            leases.retire(old)  # type: ignore[arg-type]
            leases.retire(idle)  # type: ignore[arg-type]
            assert idle.closed and not old.closed and leases.in_flight(old) == 2  # type: ignore[arg-type]
        assert not old.closed
    assert old.closed and leases.in_flight(old) == 0  # type: ignore[arg-type]


def test_with_an_admin_port_admin_and_metrics_leave_the_public_app(bundle_dir: Path):
    from quorum.server.app import create_admin_app

    token = "a-token-long-enough-for-admin"
    app = create_app(Settings(bundle=bundle_dir, admin_token=token, admin_port=9000))
    admin = create_admin_app(app)
    auth = {"Authorization": f"Bearer {token}"}
    with TestClient(app) as public, TestClient(admin) as private:
        assert (
            public.get("/metrics").status_code == 404 and public.get("/admin/faults", headers=auth).status_code == 404
        )
        assert public.post("/predict", json={"inputs": [[0] * 784]}).status_code == 200
        assert "quorum_http_requests_total" in private.get("/metrics").text  # the public app's counters
        assert private.put("/admin/faults", json={"drop_probability": 0.5, "seed": 1}, headers=auth).status_code == 200
        assert public.app.state.engine.faults is not None  # type: ignore[attr-defined]
        r = private.post("/admin/reload", headers=auth)
        assert r.status_code == 200 and public.get("/readyz").status_code == 200
