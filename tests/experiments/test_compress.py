"""`quorum compress`: members chosen from a bundle, the merged network written as a one-module bundle
that the server answers from with the accuracy recorded at compression."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from quorum.experiments.compress import CompressConfig, Source, compress, load_source, write_bundle
from quorum.runtime.manifest import Manifest
from quorum.server.app import create_app
from quorum.server.settings import Settings
from quorum.trainer.errors import ConfigError
from tests.bundles import write_mlp_bundle
from tests.processes import QUORUM


@pytest.fixture(scope="module")
def source_bundle(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """Six 784-8-10 modules, built directly (not trained)."""
    return write_mlp_bundle(tmp_path_factory.mktemp("compress") / "six", data_dir, modules=6, hidden=8, packed=False)


@pytest.fixture(scope="module")
def source(source_bundle: Path, data_dir: Path) -> Source:
    return load_source(source_bundle, str(data_dir))


@pytest.mark.slow  # exports with torch.onnx, whose first call in a process takes seconds
def test_a_compressed_bundle_serves_the_accuracy_recorded_at_compression(
    source: Source, source_bundle: Path, tmp_path: Path, test_images
):
    members = source.members(budget=3)
    assert members == Manifest.load(source_bundle).anytime_order[:3]
    result = compress(source, members, CompressConfig("match"), progress=False)
    out = tmp_path / "match3"
    written = write_bundle(source, members, result, CompressConfig("match"), out)
    m = Manifest.load(out)
    assert m == written and len(m.modules) == 1 and m.training.num_modules == 1
    assert m.compression is not None and (m.compression.method, m.compression.members) == ("match", members)
    assert m.compression.source == str(source_bundle) and m.metrics.test_error == result.test[0]

    x, y = test_images
    labels = []
    with TestClient(create_app(Settings(bundle=out))) as c:
        for i in range(0, len(x), 250):
            r = c.post("/predict?budget=1", json={"inputs": x[i : i + 250].tolist()})
            assert r.status_code == 200, r.text
            assert r.json()["modules"]["used"] == [0] and not r.json()["degraded"]
            labels += [p["label"] for p in r.json()["predictions"]]
    served_error = float(np.mean(np.asarray(labels) != y))
    assert abs(served_error - m.metrics.test_error) <= 3e-4  # ONNX Runtime against torch: a few ties at most
    # one merged module of the ensemble's size, not the ensemble's 3 modules
    assert m.modules[0].params == Manifest.load(source_bundle).modules[0].params


def test_members_are_checked_with_messages_that_say_what_to_pass(source: Source):
    for members, budget, match in [
        (None, None, "either --members"),
        ([0, 1], 2, "either --members"),
        ([0], None, "2 or more distinct"),
        ([0, 0], None, "2 or more distinct"),
        ([0, 6], None, "in 0..5"),
        (None, 7, "2..6"),
    ]:
        with pytest.raises(ConfigError, match=match):
            source.members(members, budget)
    with pytest.raises(ConfigError, match="unknown --method"):
        CompressConfig("mean")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["permavg", "distill"])
def test_compress_command_trains_and_writes_a_bundle(source_bundle: Path, tmp_path: Path, method: str):
    out = tmp_path / method
    cmd = [*QUORUM, "compress", str(source_bundle), "--method", method, "--members", "2,0", "--epochs", "1",
           "--batch-size", "1000", "--out", str(out), "--quiet"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["compression"]["method"] == method and m["compression"]["members"] == [2, 0]
    assert m["compression"]["seconds"] > 0 and f"error val {m['metrics']['val_error']:.4f}" in done.stdout
    assert m["metrics"]["test_error"] < 0.8  # one epoch on the built (weak) modules: better than chance (0.9)
