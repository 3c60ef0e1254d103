"""The HTTP API on regression and count bundles (tests/conftest.py builds them): /predict answers
values per named output, GET / says what is predicted, KServe v2 gives one `value` output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sklearn import datasets

from quorum.runtime.engine import Engine
from quorum.server.app import create_app
from quorum.server.settings import Settings


@pytest.fixture(scope="module")
def regression_client(regression_bundle: Path):
    with TestClient(create_app(Settings(bundle=regression_bundle, max_batch=64))) as c:
        yield c


@pytest.fixture(scope="module")
def count_client(count_bundle: Path):
    with TestClient(create_app(Settings(bundle=count_bundle, max_batch=64))) as c:
        yield c


@pytest.fixture(scope="module")
def patients() -> np.ndarray:
    """Four diabetes patients' raw features (4, 10)."""
    return datasets.load_diabetes(scaled=False).data[:4]


@pytest.fixture(scope="module")
def men() -> np.ndarray:
    """Four men's weight, waist and pulse (4, 3)."""
    return datasets.load_linnerud().target[:4]


def test_predict_answers_values_per_named_output(regression_client: TestClient, regression_bundle: Path, patients):
    r = regression_client.post("/predict?budget=2", json={"inputs": patients.tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    assert list(body) == ["task", "targets", "predictions", "modules", "degraded", "latency_ms"]
    assert body["task"] == "regression" and body["targets"] == ["progression"]
    assert body["modules"]["requested"] == 2 and body["modules"]["used"] == [0, 1] and body["degraded"] is False
    expected = Engine.load(regression_bundle, device="cpu").predict(patients, budget=2).values[:, 0]
    assert [p["values"]["progression"] for p in body["predictions"]] == pytest.approx(expected.tolist(), rel=1e-6)


def test_count_bundle_answers_expected_counts(count_client: TestClient, count_bundle: Path, men):
    r = count_client.post("/predict", json={"inputs": men.tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == "count" and body["targets"] == ["Chins", "Situps", "Jumps"]
    expected = Engine.load(count_bundle, device="cpu").predict(men).values
    got = [[p["values"][t] for t in body["targets"]] for p in body["predictions"]]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert len(body["modules"]["used"]) == 5 and body["degraded"] is False


def test_drop_and_failures_mark_the_answer_degraded(regression_client: TestClient, patients):
    r = regression_client.post("/predict?drop=2&seed=1", json={"inputs": patients.tolist()})
    body = r.json()
    assert r.status_code == 200 and len(body["modules"]["dropped"]) == 2 and len(body["modules"]["used"]) == 3
    assert body["degraded"] is True and len(body["predictions"]) == 4


@pytest.mark.parametrize(
    ("query", "inputs", "message"),
    [
        ("", [[0.0] * 9], r"shape (N, 10)"),
        ("?specialist=0", [[0.0] * 10], "specialists answer class questions"),
        ("?specialist=progression", [[0.0] * 10], "regression model of progression"),
    ],
)
def test_client_mistakes_are_422_with_an_error(regression_client: TestClient, query, inputs, message):
    r = regression_client.post(f"/predict{query}", json={"inputs": inputs})
    assert r.status_code == 422, r.text
    assert message in r.json()["error"]


def test_service_info_names_the_task_and_targets(regression_client: TestClient, count_client: TestClient):
    info = regression_client.get("/").json()
    assert info["task"] == "regression" and info["targets"] == ["progression"] and info["classes"] == []
    assert info["input_shape"] == [10] and info["specialists"] is False and info["num_modules"] == 5
    assert info["executor"] == "isolated" and info["executor_note"]
    assert count_client.get("/").json()["targets"] == ["Chins", "Situps", "Jumps"]


def test_openapi_documents_the_regression_response(regression_client: TestClient):
    schema = regression_client.get("/openapi.json").json()
    ok = schema["paths"]["/predict"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert {"$ref": "#/components/schemas/RegressionResponse"} in ok["anyOf"]
    assert {"task", "targets"} <= set(schema["components"]["schemas"]["ServiceInfo"]["properties"])


def test_v2_infer_gives_one_value_output(regression_client: TestClient, regression_bundle: Path, patients):
    meta = regression_client.get("/v2/models/diabetes-linear").json()
    assert meta["outputs"] == [{"name": "value", "datatype": "FP32", "shape": [-1, 1]}]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 10]}]
    request = {
        "inputs": [{"name": "input", "shape": [4, 10], "datatype": "FP64", "data": patients.ravel().tolist()}],
        "parameters": {"budget": 3},
    }
    r = regression_client.post("/v2/models/diabetes-linear/infer", json=request)
    assert r.status_code == 200, r.text
    (out,) = r.json()["outputs"]
    assert out["name"] == "value" and out["datatype"] == "FP32" and out["shape"] == [4, 1]
    expected = Engine.load(regression_bundle, device="cpu").predict(patients, budget=3).values.ravel()
    assert out["data"] == pytest.approx(expected.tolist(), rel=1e-6)
    assert r.json()["parameters"]["modules_used"] == 3 and r.json()["parameters"]["degraded"] is False
    r = regression_client.post("/v2/models/diabetes-linear/infer", json={**request, "parameters": {"specialist": 0}})
    assert r.status_code == 422 and "specialists answer class questions" in r.json()["error"]


def test_v2_infer_on_counts(count_client: TestClient, men):
    request = {"inputs": [{"name": "input", "shape": [4, 3], "datatype": "FP32", "data": men.tolist()}]}
    r = count_client.post("/v2/models/linnerud-linear/infer", json=request)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["shape"] == [4, 3] and min(r.json()["outputs"][0]["data"]) > 0


def test_metrics_count_regression_answers(regression_client: TestClient, patients):
    regression_client.post("/predict?drop=1&seed=0", json={"inputs": patients.tolist()})
    r = regression_client.get("/metrics")
    assert r.status_code == 200
    assert 'quorum_http_requests_total{method="POST",route="/predict",status="200"}' in r.text
    assert "quorum_degraded_answers_total" in r.text and 'quorum_module_ready{module="4"} 1.0' in r.text
