"""The benchmark scripts still run (tiny settings; their timings are not asserted: they are
benchmarks, and a test that times them would only measure this machine's noise)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # each benchmark runs as a process


def _run(*args: str) -> str:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_inference_bench_prints_its_comparison(bundle_dir: Path, data_dir: Path):
    out = _run(
        "bench/inference.py",
        "--bundle",
        str(bundle_dir),
        "--batches",
        "1",
        "--budgets",
        "1",
        "3",
        "--rounds",
        "1",
        "--target-ms",
        "1",
    )
    assert "packed/floor" in out and "naive/cached" in out and "predict/hand" in out
    executors, rest = out.split("the request path")[:2]
    request_path, products = rest.split("budget=auto's exit signal")[0], rest.split("budget=auto's exit signal")[1]
    for table in (executors, products.split("packed graph:")[0], request_path):
        rows = [line.split() for line in table.splitlines() if line.strip().startswith("1 ")]
        assert [r[1] for r in rows] == ["1", "3"]
    assert all(float(r[-1]) > 0 for r in rows)  # predict/hand, measured


def test_epoch_time_bench_runs_both_workloads(data_dir: Path):
    out = _run("bench/epoch_time.py", "--device", "cpu", "--images", "8", "--epochs", "1")
    assert "mlp 256-M-4-H" in out and "DN-64-6-16" in out and "s/epoch" in out


def test_train_bench_prints_its_comparison(data_dir: Path):
    out = _run("bench/train.py", "--epochs", "1", "--subset", "1000", "--skip-torchensemble")
    assert "ours / floor" in out


def test_chaos_load_loses_nothing_and_flags_every_degraded_answer(bundle_dir: Path, data_dir: Path):
    out = _run("bench/chaos.py", "--bundle", str(bundle_dir), "--requests", "300", "--concurrency", "8",
               "--budget", "8")  # fmt: skip
    assert "PASS" in out and "'2xx': 300" in out


def test_memory_bench_measures_the_largest_bodies_and_sees_the_limits_hold(bundle_dir: Path):
    out = _run("bench/memory.py", "--bundle", str(bundle_dir), "--concurrency", "2")
    assert "peak_rss_burst_mib" in out and out.rstrip().endswith("PASS"), out[-2000:]


def test_distributed_bench_counts_bk_floats_against_every_parameter_for_ddp(data_dir: Path):
    out = _run("bench/distributed.py", "--only", "mlp", "--steps", "2", "--warmup", "1", "--rounds", "1")
    rows = {tuple(line.split()[:2]): line.split() for line in out.splitlines() if line.startswith("  ")}
    # 256-M-4-H at B = 100: 1,000 floats a step against 256 x (784·4 + 4 + 4·10 + 10) parameters
    assert rows[("module-parallel", "2")][2] == "1,000" and rows[("ddp", "2")][2] == "816,640"
    assert "DDP sends 817x the floats of module-parallel per step" in out
    assert out.strip().splitlines()[-1].split()[0] == "64"  # the model reaches 64 nodes


def test_shard_chaos_loses_nothing_and_the_outage_answers_are_the_sub_ensembles(bundle_dir: Path, data_dir: Path):
    out = _run("bench/shard_chaos.py", "--bundle", str(bundle_dir), "--shards", "3", "--clients", "4",
               "--phase-s", "1.5", "--shard-timeout-ms", "500", "--health-interval-s", "0.2")  # fmt: skip
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    phases = {r[0].strip(): r for r in rows if r[0].strip() in ("all up", "2 killed", "3 stopped")}
    assert all(int(r[3]) == 0 and int(r[4]) == 0 for r in phases.values())  # no 5xx, nothing lost
    assert int(phases["2 killed"][5]) > 0 and int(phases["3 stopped"][5]) > 0  # the outages degraded answers
    served, offline = (float(v) for v in re.findall(r"served (\d\.\d+), the same modules offline (\d\.\d+)", out)[0])
    assert served == offline


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="checks the script's answer where there is no GPU")
def test_the_gpu_script_fails_soft_without_a_gpu(tmp_path: Path):
    out = subprocess.run(
        ["bash", "bench/gpu.sh"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OUT": str(tmp_path)},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "no GPU here" in (tmp_path / "status.txt").read_text() and (tmp_path / "env.txt").exists()


def test_selection_bench_compares_with_the_reference(tmp_path: Path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 500)
    logits = rng.normal(0, 1, (500, 12, 4)).astype(np.float32)
    logits[np.arange(500), :, y] += 0.5
    np.savez(tmp_path / "val.npz", logits=logits, labels=y)
    out = _run("bench/selection.py", "--logits", str(tmp_path / "val.npz"), "--float64-reference")
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("anytime", "order,", "specialists"))}
    assert rows["specialists"].endswith("identical") and rows["order,"].endswith("identical")


def test_prefix_loss_bench_prints_each_loss_against_the_modular_one(data_dir: Path):
    out = _run("bench/prefix_loss.py", "--images", "200", "--rounds", "1", "--modules", "8")
    assert "8-M-4-H, 200 images per pass" in out
    for loss in ("modular", "prefix", "dropout"):
        assert re.search(rf"{loss}\s+[\d.]+ s\s+[\d.]+x modular", out), out
