"""The gateway over shards, in process: shard apps reached through httpx's ASGI transport, and
shards that are down, stall or answer garbage as transports that do so. (tests/test_shards.py
runs real processes and kills them.)"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from quorum.runtime.engine import Engine
from quorum.runtime.errors import InvalidRequest
from quorum.runtime.options import PredictOptions
from quorum.server import shard_codec
from quorum.server.app import create_app, create_gateway_app
from quorum.server.gateway import Gateway
from quorum.server.settings import GatewaySettings, Settings

URLS = ["http://shard-1", "http://shard-2"]


@pytest.fixture(scope="module")
def whole(bundle_dir: Path) -> Iterator[Engine]:
    engine = Engine.load(bundle_dir, device="cpu")
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def shard_apps(bundle_dir: Path):
    engines = [Engine.load(bundle_dir, device="cpu", modules=range(k * 20, (k + 1) * 20)) for k in range(2)]
    apps = [create_app(Settings(bundle=bundle_dir), engine=e) for e in engines]
    yield apps
    for e in engines:
        e.close()


class Down(httpx.AsyncBaseTransport):
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)


class Stalled(httpx.AsyncBaseTransport):
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)
        raise AssertionError("unreachable")


class Switch(httpx.AsyncBaseTransport):
    """Another transport, which a test may swap for a third."""

    def __init__(self, to: httpx.AsyncBaseTransport) -> None:
        self.to = to

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.to.handle_async_request(request)


class Garbage(httpx.AsyncBaseTransport):
    """Answers health checks as the real shard does, and partial answers with nonsense."""

    def __init__(self, app) -> None:
        self.real = httpx.ASGITransport(app=app)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/shard/partial":
            return httpx.Response(200, content=b"\x00" * 17, headers={"inference-header-content-length": "5"})
        return await self.real.handle_async_request(request)


class Refusing(Garbage):
    """Answers health checks as the real shard does, and refuses every partial request's inputs."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/shard/partial":
            return httpx.Response(422, json={"error": "every module overflowed on these inputs"})
        return await self.real.handle_async_request(request)


def _transports(shard_apps, second: httpx.AsyncBaseTransport | None = None) -> dict:
    return {URLS[0]: httpx.ASGITransport(app=shard_apps[0]), URLS[1]: second or httpx.ASGITransport(app=shard_apps[1])}


def _predict(transports: dict, x: np.ndarray, **options) -> tuple[Gateway, object]:
    async def run():
        gateway = await Gateway.connect(URLS, transports=transports, shard_timeout_s=0.3, wait_s=0)
        try:
            return gateway, await gateway.predict_async(x, PredictOptions(**options))
        finally:
            await gateway.aclose()

    return asyncio.run(run())


@pytest.mark.parametrize(
    "options",
    [{"budget": 1}, {"budget": 8}, {}, {"budget": 30, "drop": 0.5, "seed": 3}, {"specialist": "Coat", "budget": 5}],
)
def test_with_every_shard_up_the_gateway_answers_as_one_server(shard_apps, whole: Engine, test_images, options):
    x = test_images[0][:16]
    _, got = _predict(_transports(shard_apps), x, **options)
    want = whole.predict(x, PredictOptions(**options))
    assert got.used == want.used and got.dropped == want.dropped and got.requested == want.requested
    np.testing.assert_allclose(got.probabilities, want.probabilities, rtol=0, atol=1e-5)
    assert not got.failed and got.degraded == want.degraded
    _same_uncertainty(got, want)
    if "specialist" in options:
        np.testing.assert_array_equal(got.specialist.is_class, want.specialist.is_class)


@pytest.mark.parametrize("options", [{"tolerance": 0.0}, {"tolerance": 0.02, "max_budget": 24}])
def test_budget_auto_through_the_gateway_is_one_servers(shard_apps, whole: Engine, test_images, options):
    x = test_images[0][:32]
    _, got = _predict(_transports(shard_apps), x, adaptive=True, **options)
    want = whole.predict(x, PredictOptions(adaptive=True, **options))
    assert got.used == want.used and not got.degraded
    np.testing.assert_array_equal(got.per_input, want.per_input)
    np.testing.assert_allclose(got.probabilities, want.probabilities, rtol=0, atol=1e-5)
    _same_uncertainty(got, want)


@pytest.mark.parametrize(("transport", "kind"), [(Down(), "shard_unreachable"), (Stalled(), "shard_timeout")])
def test_a_lost_shard_costs_its_planned_modules_only(shard_apps, whole: Engine, test_images, transport, kind):
    x = test_images[0][:4]
    _, got = _predict(_transports(shard_apps, transport), x, budget=20)
    planned = whole.predict(x, budget=20).used
    lost = [j for j in planned if j >= 20]
    assert lost and got.requested == 20 and got.degraded
    assert sorted(f.id for f in got.failed) == sorted(lost) and {f.kind for f in got.failed} <= {
        kind,
        "shard_unreachable",
    }
    assert got.used == [j for j in planned if j < 20]
    np.testing.assert_allclose(got.probabilities, _mean_softmax(whole, x, got.used), rtol=0, atol=1e-5)


def _same_uncertainty(got, want) -> None:
    """The gateway's entropy, mutual information, vote share and chance of being right are one server's."""
    for name in ("entropy", "mutual_information", "vote_share", "p_correct"):
        np.testing.assert_allclose(
            getattr(got.uncertainty, name), getattr(want.uncertainty, name), rtol=0, atol=1e-4, err_msg=name
        )


def _mean_softmax(engine: Engine, x: np.ndarray, ids: list[int]) -> np.ndarray:
    from quorum.core.tasks import softmax

    return softmax(engine.mean_logits(x, ids) / np.float32(engine.temperature(len(ids))))


def test_when_every_planned_module_is_lost_the_next_on_live_shards_answer(shard_apps, whole: Engine, test_images):
    x = test_images[0][:4]
    first = whole.predict(x, budget=1).used[0]
    down = 1 if first >= 20 else 0
    transports = _transports(shard_apps)
    transports[URLS[down]] = Down()
    _, got = _predict(transports, x, budget=1)
    assert [f.id for f in got.failed] == [first] and len(got.used) == 1 and got.used[0] // 20 != down


def test_a_replica_answers_for_a_shard_that_fails_within_the_same_request(
    shard_apps, bundle_dir: Path, whole: Engine, test_images
):
    x = test_images[0][:4]
    replica = Engine.load(bundle_dir, device="cpu", modules=range(20, 40))
    try:
        urls = [*URLS, "http://replica"]
        second = Switch(httpx.ASGITransport(app=shard_apps[1]))
        transports = _transports(shard_apps, second)
        transports[urls[2]] = httpx.ASGITransport(app=create_app(Settings(bundle=bundle_dir), engine=replica))

        async def run():
            gateway = await Gateway.connect(urls, transports=transports, wait_s=0)
            try:
                second.to = Down()  # it fails after the gateway found it up
                return gateway, await gateway.predict_async(x, PredictOptions(budget=40))
            finally:
                await gateway.aclose()

        gateway, got = asyncio.run(run())
    finally:
        replica.close()
    assert not gateway.shards[1].up and not got.failed and not got.degraded and len(got.used) == 40
    np.testing.assert_allclose(got.probabilities, whole.predict(x, budget=40).probabilities, rtol=0, atol=1e-5)


def test_a_garbage_answer_is_the_shards_error(shard_apps, test_images):
    _, got = _predict(_transports(shard_apps, Garbage(shard_apps[1])), test_images[0][:2], budget=40)
    assert {f.kind for f in got.failed} == {"shard_error"} and len(got.failed) == 20 and len(got.used) == 20


def test_a_shard_that_refuses_the_inputs_stays_up_and_refused_everywhere_is_a_422(shard_apps, test_images):
    x = test_images[0][:2]
    gateway, got = _predict(_transports(shard_apps, Refusing(shard_apps[1])), x, budget=40)
    assert {f.kind for f in got.failed} == {"shard_error"} and len(got.failed) == 20 and len(got.used) == 20
    assert "overflowed" in got.failed[0].reason and all(s.up for s in gateway.shards)  # the request's fault
    with pytest.raises(InvalidRequest, match="overflowed"):
        _predict({url: Refusing(app) for url, app in zip(URLS, shard_apps, strict=True)}, x, budget=40)


class Counting(Garbage):
    """The real shard, each partial request 50 ms late; counts the calls and their inputs."""

    def __init__(self, app, refuse_batches: bool = False) -> None:
        super().__init__(app)
        self.rows: list[int] = []
        self.refuse_batches = refuse_batches

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/shard/partial":
            body = await request.aread()
            inputs, *_ = shard_codec.decode_request(body, request.headers[shard_codec.HEADER_LENGTH], 10**6)
            self.rows.append(len(inputs))
            await asyncio.sleep(0.05)
            if self.refuse_batches and len(inputs) > 1:
                return httpx.Response(422, json={"error": "refused: as if one input overflowed every module"})
        return await self.real.handle_async_request(request)


@pytest.mark.parametrize("refuse_batches", [False, True])
def test_concurrent_requests_for_the_same_modules_share_a_call_and_get_their_own_answers(
    shard_apps, whole: Engine, test_images, refuse_batches: bool
):
    x = test_images[0][:8]
    transports = {url: Counting(app, refuse_batches) for url, app in zip(URLS, shard_apps, strict=True)}

    async def run():
        gateway = await Gateway.connect(URLS, transports=transports, wait_s=0)
        try:
            return await asyncio.gather(
                *(gateway.predict_async(x[i : i + 1], PredictOptions(budget=40)) for i in range(8))
            )
        finally:
            await gateway.aclose()

    answers = asyncio.run(run())
    for i, got in enumerate(answers):
        want = whole.predict(x[i : i + 1], budget=40)
        assert not got.degraded and got.used == want.used
        np.testing.assert_allclose(got.probabilities, want.probabilities, rtol=0, atol=1e-5)
        _same_uncertainty(got, want)
    for t in transports.values():
        assert sum(t.rows) == 8 + (7 if refuse_batches else 0)  # a refused batch goes again, one by one
        assert t.rows[:2] == [1, 7]  # the first alone, the seven that waited for it together


def test_the_gateway_app_serves_the_public_api_and_reports_its_shards(shard_apps, test_images):
    settings = GatewaySettings(shards=URLS, health_interval_s=0.05, shard_timeout_ms=300)
    transports = _transports(shard_apps, Down())
    with TestClient(create_gateway_app(settings, transports), raise_server_exceptions=False) as c:
        images = test_images[0][:3].tolist()
        r = c.post("/predict?budget=40", json={"inputs": images})
        assert r.status_code == 200 and r.json()["degraded"] and len(r.json()["modules"]["used"]) == 20
        assert {f["kind"] for f in r.json()["modules"]["failed"]} == {"shard_unreachable"}
        assert c.post("/predict?budget=abc", json={"inputs": images}).status_code == 422
        assert c.post("/predict", json={"inputs": [[0] * 783]}).status_code == 422  # checked once, at the gateway
        v2 = {
            "inputs": [{"name": "input", "shape": [3, 784], "datatype": "UINT8", "data": images}],
            "parameters": {"budget": 4},
        }
        r = c.post("/v2/models/small/infer", json=v2)
        assert r.status_code == 200 and r.json()["parameters"]["modules_used"] >= 1
        assert c.get("/readyz").json()["healthy_modules"] == 20
        mods = c.get("/modules").json()["modules"]
        assert mods[0]["shard"] == URLS[0] and mods[0]["status"] == "healthy" and mods[25]["status"] == "unreachable"
        assert 'quorum_shard_up{shard="http://shard-2"} 0.0' in c.get("/metrics").text
        assert c.get("/").json()["executor"] == "gateway"
