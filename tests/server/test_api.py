from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient

from quorum.runtime.engine import Engine
from quorum.server.app import create_app
from quorum.server.settings import Settings


@pytest.fixture(scope="module")
def client(bundle_dir: Path):
    settings = Settings(bundle=bundle_dir, max_batch=64, max_body_bytes=2 * 1024 * 1024)
    with TestClient(create_app(settings)) as c:  # the lifespan handler loads the engine
        yield c


@pytest.fixture(scope="module")
def images(test_images) -> list[list[int]]:
    x, _ = test_images
    return x[:4].tolist()


def test_predict_with_a_budget(client: TestClient, images, test_images):
    r = client.post("/predict?budget=32", json={"inputs": images})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["predictions"]) == 4
    for p in body["predictions"]:
        assert len(p["probabilities"]) == 10 and abs(sum(p["probabilities"]) - 1) < 1e-5
        assert p["class_name"] == client.get("/").json()["classes"][p["label"]]
        assert p["label"] == int(np.argmax(p["probabilities"]))
    assert body["modules"]["requested"] == 32 and len(body["modules"]["used"]) == 32
    assert body["modules"]["dropped"] == [] and body["modules"]["failed"] == []
    assert body["degraded"] is False and body["latency_ms"] > 0


def test_predict_with_drop_reports_dropped_modules(client: TestClient, images):
    r = client.post("/predict?drop=0.25&seed=1", json={"inputs": images})
    body = r.json()
    assert r.status_code == 200 and len(body["modules"]["dropped"]) == 10 and body["degraded"] is True
    r2 = client.post("/predict?drop=3&seed=1&budget=5", json={"inputs": images})
    assert len(r2.json()["modules"]["dropped"]) == 3 and len(r2.json()["modules"]["used"]) == 5


@pytest.mark.parametrize("cls", ["9", "Ankle boot", "ankle BOOT"])
def test_specialist_query_answers_one_vs_all_from_the_class_subset(client: TestClient, images, bundle_dir: Path, cls):
    spec = json.loads((bundle_dir / "manifest.json").read_text())["specialists"][9]
    r = client.post("/predict", params={"specialist": cls}, json={"inputs": images})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["specialist"] == {
        "class_index": 9,
        "class_name": "Ankle boot",
        "subset": spec["modules"],
        "val_f1": spec["val_f1"],
    }
    assert body["modules"]["used"] == spec["modules"] and body["degraded"] is False
    # the same answer as the subset's full prediction
    engine = Engine.load(bundle_dir)
    full = engine.predict_specialist(np.array(images), 9)
    for answer, probs, label in zip(body["predictions"], full.probabilities, full.labels, strict=True):
        assert answer["is_class"] == (label == 9)
        assert answer["probability"] == pytest.approx(float(probs[9]), abs=1e-6)


def test_specialist_query_with_budget_and_drop_acts_on_the_subset(client: TestClient, images, bundle_dir: Path):
    subset = json.loads((bundle_dir / "manifest.json").read_text())["specialists"][0]["modules"]
    r = client.post("/predict?specialist=0&budget=5", json={"inputs": images})
    assert r.status_code == 200 and r.json()["modules"]["used"] == subset[:5]
    r = client.post("/predict?specialist=0&drop=4&seed=2", json={"inputs": images})
    body = r.json()
    assert len(body["modules"]["dropped"]) == 4 and set(body["modules"]["dropped"]) <= set(subset)
    assert body["degraded"] is True and len(body["modules"]["used"]) == 16
    r = client.post("/predict?specialist=0&budget=21", json={"inputs": images})
    assert r.status_code == 422 and "1..20" in r.json()["error"]


@pytest.mark.parametrize("cls", ["10", "-1", "cat", "", "1.5"])
def test_unknown_specialist_class_names_the_valid_ones(client: TestClient, images, cls):
    r = client.post("/predict", params={"specialist": cls}, json={"inputs": images})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert "unknown class" in error and "'T-shirt/top'" in error and "9 ('Ankle boot')" in error


def test_bundle_without_specialists_says_so(bundle_copy: Path, images):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["specialists"], manifest["specialist_criterion"] = [], None
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with TestClient(create_app(Settings(bundle=bundle_copy))) as c:
        assert c.get("/").json()["specialists"] is False
        r = c.post("/predict?specialist=3", json={"inputs": images})
        assert r.status_code == 422 and "no specialist" in r.json()["error"]
        assert c.post("/predict", json={"inputs": images}).status_code == 200


def _row(value: object = 0) -> list[object]:
    return [value] * 784


@pytest.mark.parametrize(
    ("query", "body", "status", "match"),
    [
        ("?budget=0", {"inputs": [_row()]}, 422, "budget=0"),
        ("?budget=41", {"inputs": [_row()]}, 422, "1..40"),
        ("?budget=abc", {"inputs": [_row()]}, 422, "budget"),
        ("?budget=3.5", {"inputs": [_row()]}, 422, "budget"),
        ("?drop=1.5", {"inputs": [_row()]}, 422, "drop"),
        ("?drop=lots", {"inputs": [_row()]}, 422, "drop"),
        ("?drop=40", {"inputs": [_row()]}, 422, "drop"),
        ("?seed=x", {"inputs": [_row()]}, 422, "seed"),
        ("?deadline_ms=soon", {"inputs": [_row()]}, 422, "deadline_ms"),
        ("?deadline_ms=0", {"inputs": [_row()]}, 422, "deadline_ms"),
        ("?deadline_ms=0.000001", {"inputs": [_row()]}, 503, "no module finished"),
        ("?budjet=3", {"inputs": [_row()]}, 422, "unknown query parameter"),
        ("", {"inputs": [[1, 2, 3]]}, 422, "shape"),
        ("", {"inputs": [_row("a")]}, 422, "real numbers"),
        ("", {"inputs": [_row(None)]}, 422, "real numbers"),
        ("", {"inputs": [_row([1])]}, 422, "shape"),
        ("", {"inputs": [_row(), [1]]}, 422, "rectangular|shape"),
        ("", {"inputs": [_row(-3)]}, 422, "raw values"),
        ("", {"inputs": []}, 422, "N >= 1"),
        ("", {"inputs": 5}, 422, "inputs"),
        ("", {"inputs": "abc"}, 422, "inputs"),
        ("", {"foo": 1}, 422, "inputs"),
        ("", [1, 2], 422, "body"),
        ("", {"inputs": [_row()] * 65}, 413, "limit of 64"),
    ],
)
def test_bad_requests_get_4xx_with_an_error_message(client: TestClient, query, body, status, match):
    r = client.post(f"/predict{query}", json=body)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"}
    assert __import__("re").search(match, r.json()["error"]), r.json()["error"]


@pytest.mark.parametrize(
    ("content", "headers", "status"),
    [
        (b"{not json", {"content-type": "application/json"}, 400),
        (b"", {"content-type": "application/json"}, 422),
        (b'{"inputs": [[1]]}', {}, 415),
        (b'{"inputs": [[1]]}', {"content-type": "application/x-www-form-urlencoded"}, 415),
        (b'{"inputs": [[NaN' + b", 0" * 783 + b"]]}", {"content-type": "application/json"}, 400),  # not JSON
        (b'{"inputs": [[Infinity' + b", 0" * 783 + b"]]}", {"content-type": "application/json"}, 400),
        (b'{"inputs": [[1e999' + b", 0" * 783 + b"]]}", {"content-type": "application/json"}, 400),
        (b"inputs=1", {"content-type": "text/plain"}, 415),
        (b"\xff\xfe\x00", {"content-type": "application/json"}, 400),
        (b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {"content-type": "application/json"}, 400),
        (b'{"inputs": [[' + b"9" * 5000 + b"]]}", {"content-type": "application/json"}, 400),
    ],
)
def test_malformed_bodies(client: TestClient, content, headers, status):
    r = client.post("/predict", content=content, headers=headers)
    assert r.status_code == status, r.text
    assert r.json()["error"]


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _raw(shape: str | None, dtype: str | None = None) -> dict[str, str]:
    headers = {"content-type": "application/octet-stream"}
    headers.update({k: v for k, v in (("x-shape", shape), ("x-dtype", dtype)) if v is not None})
    return headers


def test_binary_bodies_give_the_same_answer_as_json(client: TestClient, test_images):
    x = test_images[0][:5]
    want = client.post("/predict?budget=7", json={"inputs": x.tolist()}).json()
    bodies = [
        (x.astype("<f4").tobytes(), {"content-type": "application/octet-stream", "x-shape": "5,784"}),
        (x.tobytes(), {"content-type": "application/octet-stream", "x-shape": "5, 784", "x-dtype": "uint8"}),
        (_npy(x), {"content-type": "application/x-npy"}),
        (_npy(x.astype(np.float32)), {"content-type": "application/x-npy"}),
    ]
    for content, headers in bodies:
        r = client.post("/predict?budget=7", content=content, headers=headers)
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["predictions"] == want["predictions"] and got["modules"] == want["modules"]


@pytest.mark.parametrize(
    ("content", "headers", "status", "message"),
    [
        (b"\0" * 3136, _raw(None), 422, "X-Shape"),
        (b"\0" * 3136, _raw("1x784"), 422, "X-Shape"),
        (b"\0" * 3136, _raw("0,784"), 422, "positive"),
        (b"\0" * 3135, _raw("1,784"), 422, "3135 bytes"),
        (b"\0" * 3136, _raw("1,784", "f8"), 422, "X-Dtype"),
        (b"\0" * 3136, _raw("2,1568", "uint8"), 422, "shape"),
        (b"\0" * 784 * 65, _raw("65,784", "uint8"), 413, "limit"),
        (b"\0" * 3136, _raw("1,28,28"), 422, "shape"),
        (b"not a npy file", {"content-type": "application/x-npy"}, 400, ".npy"),
        (_npy(np.array(3.0)), {"content-type": "application/x-npy"}, 422, "batch axis"),
        (_npy(np.array(["a"] * 784).reshape(1, 784)), {"content-type": "application/x-npy"}, 422, "real numbers"),
        (_npy(np.full((1, 784), np.nan, np.float32)), {"content-type": "application/x-npy"}, 422, "finite"),
    ],
)
def test_malformed_binary_bodies(client: TestClient, content, headers, status, message):
    r = client.post("/predict", content=content, headers=headers)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert "error" in r.json()


def test_body_size_limit(client: TestClient):
    big = json.dumps({"inputs": [_row(255.0)] * 60}).encode() + b" " * (2 * 1024 * 1024)
    r = client.post("/predict", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"]


def test_chunked_body_over_the_limit_is_refused(client: TestClient):
    def chunks():
        for _ in range(40):
            yield b" " * 65536

    r = client.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_health_and_module_endpoints(client: TestClient):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["healthy_modules"] == 40
    mods = client.get("/modules").json()
    assert mods["healthy"] == mods["total"] == 40
    assert {m["status"] for m in mods["modules"]} == {"healthy"}
    info = client.get("/").json()
    assert info["num_modules"] == 40 and info["executor"] == "packed" and info["executor_note"] is None
    r = client.get("/nope")
    assert r.status_code == 404 and "error" in r.json()
    assert client.get("/predict").status_code == 405


def test_quarantined_modules_show_in_modules_and_the_rest_serve(bundle_copy: Path, test_images):
    f = bundle_copy / "modules" / "m007.onnx"
    f.write_bytes(f.read_bytes()[:-10])
    engine = Engine.load(bundle_copy, device="cpu")
    with TestClient(create_app(Settings(bundle=bundle_copy), engine=engine)) as c:
        mods = c.get("/modules").json()
        assert mods["healthy"] == 39
        assert mods["modules"][7]["status"] == "quarantined" and "checksum" in mods["modules"][7]["reason"]
        x, _ = test_images
        r = c.post("/predict", json={"inputs": x[:2].tolist()})
        assert r.status_code == 200 and 7 not in r.json()["modules"]["used"] and r.json()["degraded"]


@pytest.mark.slow
def test_server_package_never_imports_torch_or_onnxruntime_itself():
    root = Path(__file__).parents[2] / "server"
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "import torch" not in text and "import onnxruntime" not in text, path
    code = "import sys, quorum.server.app, quorum.server.main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_metrics_follow_the_prometheus_text_format(client: TestClient, images):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict[str, dict[tuple, float]]:
        r = client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        out: dict[str, dict[tuple, float]] = {}
        for family in text_string_to_metric_families(r.text):
            for sample in family.samples:
                out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
        return out

    before = scrape()
    assert client.post("/predict?budget=5", json={"inputs": images}).status_code == 200
    assert client.post("/predict?drop=0.5&seed=1", json={"inputs": images}).status_code == 200  # degraded
    assert client.post("/predict?budget=0", json={"inputs": images}).status_code == 422
    client.get("/no/such/path")
    after = scrape()

    def delta(name: str, **labels: str) -> float:
        key = tuple(sorted(labels.items()))
        return after.get(name, {}).get(key, 0.0) - before.get(name, {}).get(key, 0.0)

    assert delta("quorum_http_requests_total", route="/predict", method="POST", status="200") == 2
    assert delta("quorum_http_requests_total", route="/predict", method="POST", status="422") == 1
    assert delta("quorum_http_requests_total", route="unmatched", method="GET", status="404") == 1
    assert delta("quorum_http_request_duration_seconds_count", route="/predict", method="POST") == 3
    assert delta("quorum_modules_evaluated_count") == 2 and delta("quorum_modules_evaluated_sum") == 5 + 20
    assert delta("quorum_degraded_answers_total") == 1
    ok = {k: v for k, v in after["quorum_module_outcomes_total"].items() if ("outcome", "ok") in k}
    assert len(ok) == 40 and len(after["quorum_module_outcomes_total"]) == 40 * 5
    assert sum(after["quorum_module_ready"].values()) == 40


def _v2(data: object, **extra: object) -> dict:
    return {"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 784], "data": data, **extra}]}


@pytest.mark.parametrize(
    ("content", "headers", "status", "message"),
    [
        (b"{nope", {}, 400, "not valid JSON"),
        (b"[1]", {}, 422, "JSON object"),
        (orjson.dumps({"inputs": []}), {}, 422, "exactly one tensor"),
        (
            orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 784], "data": [0] * 784}]}),
            {},
            422,
            "named 'input'",
        ),
        (orjson.dumps(_v2([0] * 784, datatype="STRING")), {}, 422, "datatype"),
        (orjson.dumps(_v2([0] * 784, shape="1x784")), {}, 422, "shape"),
        (orjson.dumps(_v2([0] * 783)), {}, 422, "783 values"),
        (orjson.dumps(_v2(["a"] * 784)), {}, 422, "UINT8"),
        (orjson.dumps(_v2(None)), {}, 422, "neither"),
        (orjson.dumps({**_v2([0] * 784), "parameters": {"budget": "3"}}), {}, 422, "integer"),
        (orjson.dumps({**_v2([0] * 784), "parameters": {"drop": "x"}}), {}, 422, "drop"),
        (orjson.dumps({**_v2([0] * 784), "parameters": {"specialist": "Spaceship"}}), {}, 422, "unknown class"),
        (orjson.dumps({**_v2([0] * 784), "outputs": [{"name": "logits"}]}), {}, 422, "unknown outputs"),
        (
            orjson.dumps(_v2(None, parameters={"binary_data_size": 784})) + b"\0" * 700,
            {"inference-header-content-length": "9999"},
            400,
            "does not fit",
        ),
    ],
)
def test_v2_infer_rejects_malformed_requests(client: TestClient, content, headers, status, message):
    r = client.post("/v2/models/small/infer", content=content, headers={"content-type": "application/json", **headers})
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_v2_health_and_metadata(client: TestClient, images):
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get("/v2/models/small/ready").json()["ready"] is True
    assert client.get("/v2/models/other").status_code == 404
    header = orjson.dumps(_v2(None, parameters={"binary_data_size": 784}))
    body = header + np.asarray(images[0], np.uint8).tobytes()
    r = client.post(
        "/v2/models/small/infer", content=body, headers={"inference-header-content-length": str(len(header))}
    )
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["shape"] == [1, 10] and r.json()["parameters"]["modules_used"] == 40


# ---------------------------------------------------------------- budget=auto and uncertainty


def test_budget_auto_reports_the_modules_and_the_uncertainty_of_each_input(client: TestClient, images):
    r = client.post("/predict?budget=auto&tolerance=0.01&max_budget=32", json={"inputs": images})
    assert r.status_code == 200, r.text
    body = r.json()
    used = [p["modules_used"] for p in body["predictions"]]
    assert all(1 <= b <= 32 for b in used) and len(body["modules"]["used"]) == max(used)
    for p in body["predictions"]:
        u = p["uncertainty"]
        assert u["entropy"] >= 0 and u["mutual_information"] >= 0 and 0 <= u["vote_share"] <= 1
        assert 0 <= u["p_correct"] <= 1


@pytest.mark.parametrize(
    "query",
    [
        "budget=automatic",
        "budget=auto&tolerance=-1",
        "tolerance=0.01",
        "budget=auto&specialist=1",
    ],
)
def test_malformed_adaptive_requests_are_4xx(client: TestClient, images, query):
    r = client.post(f"/predict?{query}", json={"inputs": images[:1]})
    assert 400 <= r.status_code < 500 and "error" in r.json()


def test_v2_takes_budget_auto_in_parameters_and_answers_per_input_outputs(client: TestClient, images):
    x = np.asarray(images[:3], np.float32)
    body = {
        "parameters": {"budget": "auto", "tolerance": 0.005},
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
    }
    r = client.post("/v2/models/small/infer", json=body)
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    assert {"modules_used", "entropy", "mutual_information", "vote_share", "p_correct"} <= outputs.keys()
    assert outputs["modules_used"]["shape"] == [3]
