"""End to end on real Fashion-MNIST: `quorum train`, `quorum export`, `quorum serve` as real
processes, a real uvicorn on a free loopback port, and a client that holds only numpy,
onnxruntime and manifest.json."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.processes import QUORUM, request, start_quorum

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([*QUORUM, *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _serve(bundle: Path, **env: str) -> tuple[subprocess.Popen[str], str]:
    """`quorum serve BUNDLE` on a free loopback port, once it is ready; settings from `env`."""
    return start_quorum("serve", bundle, **env)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, data_dir: Path):
    tmp = tmp_path_factory.mktemp("e2e")
    run, bundle = tmp / "run", tmp / "bundle"
    _run("train", "--arch", "mlp", "--modules", "64", "--hidden", "4", "--lam", "0.99", "--epochs", "1",
         "--subset", "5000", "--out", str(run), "--quiet")  # fmt: skip
    _run("export", str(run), "--out", str(bundle), "--quiet")
    proc, base = _serve(bundle)
    yield base, bundle, tmp
    proc.terminate()
    proc.wait(timeout=30)


def test_predict_budget_32_over_http(server, test_images):
    base, _, _ = server
    x, y = test_images
    status, body = request(f"{base}/predict?budget=32", json.dumps({"inputs": x[:100].tolist()}).encode())
    assert status == 200, body
    assert len(body["modules"]["used"]) == 32 and body["modules"]["requested"] == 32 and not body["degraded"]
    probs = np.array([p["probabilities"] for p in body["predictions"]])
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    accuracy = (probs.argmax(1) == y[:100]).mean()
    assert accuracy > 0.6, accuracy  # one epoch on 5,000 images: far above chance (0.1)


def test_budget_auto_over_http_uses_the_thresholds_fitted_at_export(server, test_images):
    base, bundle, _ = server
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["confidence"]["stages"] == [1, 2, 4, 8, 16, 32, 48, 64]
    x, _ = test_images
    status, body = request(
        f"{base}/predict?budget=auto&tolerance=0.02", json.dumps({"inputs": x[:64].tolist()}).encode()
    )
    assert status == 200, body
    used = [p["modules_used"] for p in body["predictions"]]
    assert min(used) >= 1 and max(used) <= 64 and sum(used) < 64 * 64  # some inputs stopped early
    assert all(0 <= p["uncertainty"]["vote_share"] <= 1 for p in body["predictions"])


def test_a_client_with_only_numpy_onnxruntime_and_the_manifest_reproduces_the_server(server, test_images):
    base, bundle, tmp = server
    x, _ = test_images
    payload = {"inputs": x[100:108].tolist()}
    status, body = request(f"{base}/predict?budget=32&drop=0.3&seed=5", json.dumps(payload).encode())
    assert status == 200
    used = body["modules"]["used"]
    assert len(used) == 32 and not set(used) & set(body["modules"]["dropped"])
    offline = _offline_client(bundle, payload, used, tmp)
    mine = np.array(offline["probabilities"])
    served = np.array([p["probabilities"] for p in body["predictions"]])
    assert np.abs(mine - served).max() <= 1e-5
    right = [p["uncertainty"]["p_correct"] for p in body["predictions"]]
    np.testing.assert_allclose(offline["p_correct"], right, rtol=0, atol=1e-5)


def _offline_client(bundle: Path, payload: dict, used: list[int], tmp: Path) -> dict:
    """What examples/offline_client.py (numpy, onnxruntime and the manifest only) answers."""
    (tmp / "request.json").write_text(json.dumps(payload))
    client = ROOT / "examples" / "offline_client.py"
    assert "quorum" not in "".join(line for line in client.read_text().splitlines() if "import" in line)
    out = subprocess.run(
        [sys.executable, str(client), str(bundle), "--modules", ",".join(map(str, used)),
         "--inputs", str(tmp / "request.json")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    answer: dict = json.loads(out.stdout)
    return answer


def test_bad_request_over_http_is_a_4xx_with_a_message(server):
    base, _, _ = server
    status, body = request(f"{base}/predict?budget=32", b'{"inputs": [[1, 2, 3]]}')
    assert status == 422 and "784" in body["error"]
    status, body = request(f"{base}/predict", b"{")
    assert status == 400 and "JSON" in body["error"]


def test_cli_help_and_errors():
    for cmd in ([], ["train"], ["export"], ["serve"], ["demo"]):
        out = subprocess.run([*QUORUM, *cmd, "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "usage: quorum" in out.stdout
    out = subprocess.run([*QUORUM, "train", "--lam", "1.5", "--out", "/tmp/never"], capture_output=True, text=True)
    assert out.returncode == 2 and "Theorem 1" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([*QUORUM, "serve", "/nonexistent"], capture_output=True, text=True)
    assert out.returncode == 2 and "quorum export" in out.stderr and "Traceback" not in out.stderr


def test_kserve_v2_protocol_with_tritonclient(server, test_images):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from quorum.runtime.manifest import Manifest

    base, bundle, _ = server
    client = httpclient.InferenceServerClient(url=base.removeprefix("http://"))
    name = Manifest.load(bundle).name
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(name)
    meta = client.get_model_metadata(name)
    assert meta["inputs"][0]["name"] == "input" and meta["inputs"][0]["shape"] == [-1, 784]

    x = test_images[0][:8]
    status, want = request(f"{base}/predict?budget=32", json.dumps({"inputs": x.tolist()}).encode())
    assert status == 200
    for binary in (True, False):  # Triton's binary tensor extension, and plain JSON data
        tensor = httpclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x.astype(np.float32), binary_data=binary)
        result = client.infer(name, [tensor], parameters={"budget": 32})
        params = result.get_response()["parameters"]
        assert params["modules_requested"] == params["modules_used"] == 32 and params["degraded"] is False
        np.testing.assert_allclose(
            result.as_numpy("probabilities"), [p["probabilities"] for p in want["predictions"]], atol=1e-6
        )
        assert result.as_numpy("label").tolist() == [p["label"] for p in want["predictions"]]

    tensor = httpclient.InferInput("input", list(x.shape), "UINT8")
    tensor.set_data_from_numpy(x)
    result = client.infer(name, [tensor], parameters={"specialist": "Sneaker", "drop": 0.5, "seed": 1})
    assert result.as_numpy("is_class").dtype == bool and result.as_numpy("probability").shape == (8,)
    assert result.get_response()["parameters"]["modules_dropped"] == 10  # half of the 20 specialists

    with pytest.raises(InferenceServerException, match="no model 'nope'"):
        client.infer("nope", [tensor])
    with pytest.raises(InferenceServerException, match="unknown parameter"):
        client.infer(name, [tensor], parameters={"budjet": 3})
    with pytest.raises(InferenceServerException, match=r"budget=0 must lie in 1\.\.64"):
        client.infer(name, [tensor], parameters={"budget": 0})


@contextlib.contextmanager
def _sending(url: str, body: bytes, clients: int) -> Iterator[list[int]]:
    """`clients` threads POST `body` to `url` until the block ends; yields their statuses."""
    statuses: list[int] = []
    stop = threading.Event()

    def send() -> None:
        while not stop.is_set():
            statuses.append(request(url, body)[0])

    threads = [threading.Thread(target=send) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        yield statuses
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)


def test_hot_reload_while_clients_send_loses_no_request(server, test_images):
    _, bundle, tmp = server
    other = tmp / "other-bundle"
    shutil.copytree(bundle, other)
    proc, base = _serve(bundle, QUORUM_ADMIN_TOKEN="t0ken-for-the-e2e-test")
    body = json.dumps({"inputs": test_images[0][:4].tolist()}).encode()

    def reload(target: Path | None) -> tuple[int, dict]:
        data = json.dumps({"bundle": str(target)} if target else {}).encode()
        headers = {"Content-Type": "application/json", "Authorization": "Bearer t0ken-for-the-e2e-test"}
        req = urllib.request.Request(f"{base}/admin/reload", data=data, method="POST", headers=headers)
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())

    try:
        with _sending(f"{base}/predict?budget=16", body, clients=4) as statuses:
            time.sleep(0.5)
            status, swapped = reload(other)
            assert status == 200 and swapped["bundle"] == str(other) and swapped["healthy_modules"] == 64
            time.sleep(0.5)
            assert reload(None)[1]["bundle"] == str(bundle)  # back to the configured bundle
            time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert len(statuses) > 20 and set(statuses) == {200}


def test_sighup_reloads_the_configured_bundle_and_a_bad_one_changes_nothing(server, test_images):
    _, bundle, tmp = server
    served = tmp / "sighup-bundle"
    shutil.copytree(bundle, served)
    proc, base = _serve(served)
    body = json.dumps({"inputs": test_images[0][:4].tolist()}).encode()

    def sighup_and_settle() -> None:
        proc.send_signal(signal.SIGHUP)
        time.sleep(2.0)  # the reload is loaded and verified off the event loop
        assert proc.poll() is None and request(f"{base}/modules")[1]["healthy"] == 64

    manifest = json.loads((served / "manifest.json").read_text())
    victim = served / manifest["modules"][manifest["anytime_order"][0]]["file"]
    good = victim.read_bytes()
    try:
        with _sending(f"{base}/predict?budget=16", body, clients=3) as statuses:
            time.sleep(0.5)
            victim.write_bytes(good[::-1])  # a half-copied bundle on disk: one module is corrupt
            sighup_and_settle()  # refused: it would serve with less than the bundle serving now
            victim.write_bytes(good)
            sighup_and_settle()  # the whole bundle again: reloaded
            (served / "manifest.json").rename(served / "manifest.json.bak")  # now it cannot be served at all
            sighup_and_settle()
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert len(statuses) > 20 and set(statuses) == {200}
    refusals = [
        line for line in out.splitlines() if "SIGHUP: reload refused, still serving the previous bundle" in line
    ]
    assert len(refusals) == 2 and "quarantined" in refusals[0] and "reload with force" in refusals[0]
    assert out.count("SIGHUP: reloaded") == 1


def test_faults_admin_limits_deadlines_and_metrics_over_real_uvicorn(server, test_images):
    from prometheus_client.parser import text_string_to_metric_families

    _, bundle, _ = server
    token = "e2e-t0ken-long-enough"
    proc, base = _serve(bundle, QUORUM_ADMIN_TOKEN=token, QUORUM_MAX_BODY_BYTES="100000", QUORUM_MAX_BATCH="16")

    def call(method: str, path: str, body: object = None, auth: str | None = None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **({"Authorization": auth} if auth else {})}
        req = urllib.request.Request(base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    x = test_images[0][:4].tolist()
    try:
        assert call("GET", "/admin/faults")[0] == 401
        assert call("GET", "/admin/faults", auth="Bearer wrong")[0] == 403
        assert call("POST", "/predict?fail=1", {"inputs": x})[0] == 403  # injection needs the token
        status, plan = call("PUT", "/admin/faults", {"fail": [3], "nan_probability": 0.2, "seed": 1}, f"Bearer {token}")
        assert status == 200 and plan["fail"] == [3]
        status, body = call("POST", "/predict", {"inputs": x})
        injected = {f["id"] for f in body["modules"]["injected"]}
        assert status == 200 and body["degraded"] and 3 in injected and body["modules"]["failed"] == []
        assert call("DELETE", "/admin/faults", auth=f"Bearer {token}")[1]["fail"] == []
        assert not call("POST", "/predict", {"inputs": x})[1]["degraded"]

        status, body = call("POST", "/predict", {"inputs": test_images[0][:40].tolist()})
        assert status == 413 and "error" in body  # ~100 KB of JSON
        assert call("POST", "/predict", {"inputs": test_images[0][:20].tolist()})[0] == 413  # batch > 16
        status, body = call("POST", "/predict?deadline_ms=0.001", {"inputs": x})
        assert status == 503 and "deadline" in body["error"]

        with urllib.request.urlopen(f"{base}/metrics", timeout=30) as r:
            families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
        outcomes = {(s.labels["module"], s.labels["outcome"]) for s in families["quorum_module_outcomes"].samples}
        assert ("3", "injected") in outcomes
        statuses = {s.labels["status"] for s in families["quorum_http_requests"].samples}
        assert {"200", "401", "403", "413", "503"} <= statuses
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("arch", ["convnet", "treenet", "densenet_bc"])
def test_every_convolutional_architecture_trains_exports_and_serves_from_the_cli(
    arch, arch_bundle, tmp_path, test_images
):
    _, bundle = arch_bundle(arch)  # `quorum train` and `quorum export` as processes (tests/conftest.py)
    proc, base = _serve(bundle)
    try:
        x = test_images[0][:8].reshape(-1, 1, 28, 28)
        status, body = request(f"{base}/predict?budget=2", json.dumps({"inputs": x.tolist()}).encode())
        assert status == 200 and len(body["modules"]["used"]) == 2 and len(body["predictions"]) == 8
        mine = _offline_client(bundle, {"inputs": x.tolist()}, body["modules"]["used"], tmp_path)["probabilities"]
        served = [p["probabilities"] for p in body["predictions"]]
        assert np.abs(np.array(mine) - np.array(served)).max() <= 1e-5  # a TreeNet's trunk included
        status, body = request(f"{base}/predict?budget=2", json.dumps({"inputs": x.reshape(8, 784).tolist()}).encode())
        assert status == 422 and "(N, 1, 28, 28)" in body["error"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("dataset", ["diabetes", "linnerud"])
def test_regression_and_count_targets_train_export_and_serve_from_the_cli(dataset, tmp_path):
    from quorum.trainer.data import load_dataset

    run, bundle = tmp_path / "run", tmp_path / "bundle"
    epochs, batch = ("40", "100") if dataset == "diabetes" else ("30", "4")
    _run("train", "--dataset", dataset, "--modules", "8", "--hidden", "8", "--lam", "0.9", "--epochs", epochs,
         "--batch-size", batch, "--out", str(run), "--quiet")  # fmt: skip
    out = _run("export", str(run), "--out", str(bundle), "--quiet")
    assert "RMSE" in out.stdout
    manifest = json.loads((bundle / "manifest.json").read_text())
    kind, combiner = ("regression", "mean") if dataset == "diabetes" else ("count", "mean_exp")
    assert manifest["task"]["kind"] == kind and manifest["output"]["combiner"] == combiner
    assert manifest["specialists"] == [] and all(m["parity"] <= 1e-4 for m in manifest["modules"])
    data = load_dataset(dataset)
    # Raw feature rows, as a client has them: undo the training normalization of the test rows.
    mean, std = np.array(data.norm.mean), np.array(data.norm.std)
    raw = data.test.x.numpy()[:5] * std + mean
    proc, base = _serve(bundle)
    try:
        status, body = request(f"{base}/predict?budget=4", json.dumps({"inputs": raw.tolist()}).encode())
        assert status == 200 and body["task"] == kind and len(body["modules"]["used"]) == 4, body
        names = manifest["task"]["target_names"]
        values = np.array([[p["values"][n] for n in names] for p in body["predictions"]])
        mine = _offline_client(bundle, {"inputs": raw.tolist()}, body["modules"]["used"], tmp_path)["values"]
        np.testing.assert_allclose(mine, values, rtol=1e-4)
        truth = data.test.y.numpy()[:5]
        if dataset == "diabetes":
            truth = truth * data.target_scale[0] + data.target_shift[0]
            assert np.sqrt(((values - truth) ** 2).mean()) < 2 * manifest["metrics"]["test_error"] + 1
        assert values.shape == truth.shape and np.isfinite(values).all() and (values > 0).all()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
