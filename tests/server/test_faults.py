"""Fault injection and the admin API: injected faults go through the real paths, are reported
apart from real failures, and only admins (or a server that allows it) may inject them."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from quorum.server.app import create_app
from quorum.server.settings import Settings

TOKEN = "s3cret-token-for-tests"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@contextmanager
def _client(bundle: Path, **settings: object) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(bundle=bundle, **settings))) as c:  # type: ignore[arg-type]
        yield c


@pytest.fixture
def images(test_images) -> list[list[int]]:
    return test_images[0][:3].tolist()


def test_without_a_token_the_admin_api_is_off_and_clients_cannot_inject(bundle_dir: Path, images):
    with _client(bundle_dir) as c:
        assert c.get("/admin/faults").status_code == 404
        assert c.put("/admin/faults", json={"fail": [1]}).status_code == 404
        assert c.put("/admin/faults", content=b"{not json").status_code == 404  # the guard before the body
        r = c.post("/predict?fail=1", json={"inputs": images})
        assert r.status_code == 403 and "admin token" in r.json()["error"]
        assert c.post("/predict?drop=3&seed=1", json={"inputs": images}).status_code == 200  # drop stays public


def test_the_admin_api_wants_the_right_bearer_token(bundle_dir: Path):
    with _client(bundle_dir, admin_token=TOKEN) as c:
        assert c.get("/admin/faults").status_code == 401
        assert c.put("/admin/faults", json={"fail_probability": "x"}).status_code == 401
        assert c.get("/admin/faults", headers={"Authorization": "Bearer wrong"}).status_code == 403
        assert c.get("/admin/faults", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 403
        r = c.get("/admin/faults", headers=ADMIN)
        assert r.status_code == 200 and r.json()["fail"] == []


def test_injected_faults_take_the_real_paths_and_are_reported_apart(bundle_dir: Path, images):
    with _client(bundle_dir, admin_token=TOKEN, breaker_failures=2, breaker_open_s=60) as c:
        m0, m1, m2 = (int(x) for x in c.app.state.engine.manifest.anytime_order[:3])  # type: ignore[attr-defined]
        r = c.post(f"/predict?budget=6&fail={m0}&nan={m1}", json={"inputs": images}, headers=ADMIN)
        assert r.status_code == 200, r.text
        mods = r.json()["modules"]
        assert mods["failed"] == [] and r.json()["degraded"] is True
        assert {(f["id"], f["kind"]) for f in mods["injected"]} == {(m0, "error"), (m1, "nonfinite")}
        assert m0 not in mods["used"] and m1 not in mods["used"] and len(mods["used"]) == 4

        # A server-wide plan applies to every client's requests, until it is deleted.
        plan = c.put("/admin/faults", json={"fail": [m2], "seed": 1}, headers=ADMIN)
        assert plan.status_code == 200 and plan.json()["fail"] == [m2]
        assert c.get("/admin/faults", headers=ADMIN).json()["fail"] == [m2]
        for _ in range(3):
            r = c.post("/predict?budget=6", json={"inputs": images})
            assert [f["id"] for f in r.json()["modules"]["injected"]] == [m2]
        # Counted apart, and never against the module's breaker: a rehearsal takes nothing out of rotation.
        state = next(m for m in c.get("/modules").json()["modules"] if m["id"] == m2)
        assert state["breaker"] == "closed" and state["failure_kinds"] == {"injected": 3}
        assert c.delete("/admin/faults", headers=ADMIN).json()["fail"] == []
        r = c.post("/predict?budget=6", json={"inputs": images})
        assert m2 in r.json()["modules"]["used"] and r.json()["modules"]["injected"] == []
        assert c.put("/admin/faults", json={"fail": [999]}, headers=ADMIN).status_code == 422
        assert c.put("/admin/faults", json={"fail_probability": 1.5}, headers=ADMIN).status_code == 422


def test_injected_latency_meets_the_module_timeout(bundle_dir: Path, images):
    with _client(bundle_dir, allow_fault_injection=True, module_timeout_ms=50, breaker_failures=0) as c:
        r = c.post("/predict?budget=3&delay_ms=400", json={"inputs": images})
        assert r.status_code == 503 and "timeout" in r.json()["error"]
        r = c.post("/predict?budget=3&delay_ms=1", json={"inputs": images})
        assert r.status_code == 200 and len(r.json()["modules"]["used"]) == 3
        assert c.post("/predict?fail=1,x", json={"inputs": images}).status_code == 422


def test_a_reload_that_cannot_serve_changes_nothing(bundle_dir: Path, images, tmp_path: Path):
    root = Path(os.path.commonpath([bundle_dir, tmp_path]))
    with _client(bundle_dir, admin_token=TOKEN, bundle_root=root) as c:
        assert c.post("/admin/reload", json={"bundle": str(tmp_path)}).status_code == 401
        r = c.post("/admin/reload", json={"bundle": str(tmp_path)}, headers=ADMIN)
        assert r.status_code == 422 and "reload refused" in r.json()["error"] and "quorum export" in r.json()["error"]
        assert c.post("/predict?budget=3", json={"inputs": images}).status_code == 200
        r = c.post("/admin/reload", headers=ADMIN)
        assert r.status_code == 200 and r.json()["bundle"] == str(bundle_dir)


def test_a_reload_loads_bundles_from_under_the_bundle_root_only(bundle_dir: Path, tmp_path: Path):
    with _client(bundle_dir, admin_token=TOKEN) as c:  # the root: the served bundle's folder's parent
        for outside in ("/etc", str(tmp_path), str(bundle_dir.parent.parent)):
            r = c.post("/admin/reload", json={"bundle": outside}, headers=ADMIN)
            assert r.status_code == 403 and "QUORUM_BUNDLE_ROOT" in r.json()["error"], outside
        assert c.post("/admin/reload", json={"bundle": str(bundle_dir)}, headers=ADMIN).status_code == 200


def test_a_reload_to_a_half_copied_bundle_changes_nothing_unless_forced(tmp_path: Path, data_dir: Path, test_images):
    from tests.bundles import write_mlp_bundle

    serving = write_mlp_bundle(tmp_path / "serving", data_dir, modules=16, hidden=2, fit_images=300)
    copy = tmp_path / "copy"
    shutil.copytree(serving, copy)
    for j in range(12):  # 12 of 16 module files cut short, as a copy that stopped midway leaves them
        f = copy / f"modules/m{j:03d}.onnx"
        f.write_bytes(f.read_bytes()[:100])
    x = {"inputs": test_images[0][:2].tolist()}
    with _client(serving, admin_token=TOKEN) as c:
        r = c.post("/admin/reload", json={"bundle": str(copy)}, headers=ADMIN)
        assert r.status_code == 409, r.text
        assert "12 of its 16 modules are quarantined" in r.json()["error"] and "force" in r.json()["error"]
        assert c.get("/").json()["bundle"] == str(serving) and c.get("/readyz").json()["healthy_modules"] == 16
        assert len(c.post("/predict", json=x).json()["modules"]["used"]) == 16
        r = c.post("/admin/reload", json={"bundle": str(copy), "force": True}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["healthy_modules"] == 4
        assert len(c.post("/predict", json=x).json()["modules"]["used"]) == 4
