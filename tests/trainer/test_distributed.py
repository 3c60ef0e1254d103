"""Module-parallel training is the single-process training, over several processes.

In float64, a few SGD steps of every architecture and every loss on 2 and 3 gloo ranks give the
single-process weights and losses to 1e-12: the gradients are the same, not W times them. In
float32, `torchrun ... -m quorum train` gives the single-process run (weights, losses, validation
metrics, checkpoints that export and resume at any world size), to the tolerances stated at
`TOLERANCE`. A rank killed with a real SIGKILL ends the job, and under `--max-restarts` the job
finishes from its checkpoint with the uninterrupted run's weights.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from quorum.trainer.blocks import block_of, join_states, module_rows
from quorum.trainer.checkpoint import load_checkpoint, read_jsonl
from quorum.trainer.config import TrainConfig
from quorum.trainer.models import create, list_archs
from quorum.trainer.peers import Peers, share_loss
from quorum.trainer.train import loss_for_epoch, make_optimizer
from tests.trainer.test_models import SMALL_KWARGS

pytestmark = pytest.mark.slow  # every test here starts processes

# ---------------------------------------------------------------- float64: the procedure itself

M, STEPS = 5, 4
CASES: list[tuple[str, dict[str, Any]]] = [  # every architecture, and every loss on the MLP
    *((arch, {"lam": 0.9}) for arch in list_archs()),
    ("mlp", {"lam": 1.0}),
    ("mlp", {"lam": 0.0}),
    ("mlp", {"loss": "mcl", "mcl_k": 2, "lam": 0.0}),
]


def _case(arch: str, options: dict[str, Any]) -> tuple[TrainConfig, Callable[[int], Any], Any, list[Any]]:
    """The loss and optimizer settings, a float64 builder, the whole ensemble and STEPS batches."""
    cfg = TrainConfig(modules=M, lr=0.5, weight_decay=1e-3, **options)  # the loss and the optimizer only
    kwargs = {k: v for k, v in SMALL_KWARGS[arch].items() if k != "num_modules"}

    def build(m: int) -> Any:
        return create(arch, num_modules=m, **kwargs).double()

    torch.manual_seed(0)
    full = build(M)
    g = torch.Generator().manual_seed(1)
    K = full.num_classes
    batches = [
        (torch.randn(8, *full.in_shape, generator=g, dtype=torch.float64), torch.randint(0, K, (8,), generator=g))
        for _ in range(STEPS)
    ]
    return cfg, build, full, batches


def _steps(model: Any, cfg: TrainConfig, loss_fn: Any, batches: list[Any], sync: Any = None) -> list[torch.Tensor]:
    opt = make_optimizer(cfg, model)
    losses = []
    for x, y in batches:
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        if sync is not None:
            sync()
        opt.step()
        losses.append(loss.detach())
    return losses


def _rank(rank: int, world: int, out: str) -> None:
    """One rank of `test_module_parallel_steps_are_the_single_process_steps`: every case in turn."""
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world)
    results = []
    for arch, options in CASES:
        cfg, build, full, batches = _case(arch, options)
        peers = Peers(rank, world, M)
        rows = module_rows(build)
        block = block_of(full, build, rows, peers.start, peers.stop)
        shared = [p for n, p in block.named_parameters() if rows[n] is None]
        sync = (lambda: peers.sum_grads(shared)) if shared else None  # noqa: B023  (called within the iteration)
        losses = _steps(block, cfg, share_loss(cfg, 0, peers), batches, sync)
        results.append({"state": block.state_dict(), "losses": [float(peers.sum(loss)) for loss in losses]})
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_module_parallel_steps_are_the_single_process_steps(tmp_path: Path, world: int):
    mp.spawn(_rank, (world, str(tmp_path)), nprocs=world)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    for i, (arch, options) in enumerate(CASES):
        cfg, build, full, batches = _case(arch, options)
        losses = _steps(full, cfg, loss_for_epoch(cfg, 0), batches)
        what = f"{arch} {options} on {world} ranks"
        joined = join_states([r[i]["state"] for r in ranks], module_rows(build))
        for name, weights in full.state_dict().items():
            torch.testing.assert_close(joined[name], weights, rtol=0, atol=1e-12, msg=f"{what}: {name}")
        shared = [name for name, rows in module_rows(build).items() if rows is None]
        for r in ranks:  # the loss over all ranks, and every rank's copy of a trunk
            assert r[i]["losses"] == pytest.approx([float(x) for x in losses], rel=1e-12, abs=1e-12), what
            for name in shared:
                torch.testing.assert_close(r[i]["state"][name], full.state_dict()[name], rtol=0, atol=1e-12)


# ---------------------------------------------------------------- float32: `torchrun -m quorum train`

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # a rank's threads under torchrun, for the one-process runs too

# Float32 tolerance on weights after the runs of TRAINED. One step's gradients differ from one
# process's by rounding alone (η̄ and a trunk's gradient are summed in another order: ~1e-7
# relative), and the MLP runs stay there (256-M-4-H: 1.8e-7 after 20 steps). In the ConvNets,
# SGD at the default rate (0.1·M) amplifies such a difference wherever a ReLU input sits near 0,
# most in a TreeNet's trunk, which reads the raw images (1.9e-3 after 8 steps). One process
# amplifies its own rounding alike: 5e-3 between runs on 1 and on 2 threads. A trunk gradient
# left unsummed over the ranks is 1e-1 away after 6 steps; the float64 test above holds 1e-12.
TOLERANCE = {"mlp": 1e-5, "convnet": 1e-2, "treenet": 1e-2}
TRAINED = {  # arch: (processes, options): 256-M-4-H as in the papers; uneven blocks for the ConvNets
    "mlp": (2, ["--modules", "256", "--hidden", "4", "--subset", "1000"]),
    "convnet": (2, ["--arch", "convnet", "--modules", "5", "--filters", "6,8", "--strides", "2,2", "--subset", "400"]),
    "treenet": (3, ["--arch", "treenet", "--modules", "5", "--filters", "6,8,8", "--strides", "2,2,1", "--split", "1",
                    "--subset", "400"]),
}  # fmt: skip
COMMON = ["--lam", "0.95", "--val-size", "1000", "--quiet"]


def _quorum(
    *args: str,
    processes: int = 1,
    restarts: int = 0,
    script: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: int = 600,
) -> subprocess.CompletedProcess[str]:
    """`quorum ARGS` in one process, or under torchrun (a standalone rendezvous on a free port);
    `script` runs instead of `-m quorum`."""
    cmd = [sys.executable, "-m", "quorum", *args]
    if processes > 1 or script is not None:
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                    f"--max-restarts={restarts}", "--monitor-interval=0.2"]  # fmt: skip
        cmd = [sys.executable, *launcher, *([str(script)] if script else ["-m", "quorum"]), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**ENV, **(env or {})})


def _ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _max_diff(a: Path, b: Path) -> dict[str, float]:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    return {k: float((wa[k].double() - wb[k].double()).abs().max()) for k in wa}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Callable[[str], tuple[Path, Path, str]]:
    """(one-process run, module-parallel run, torchrun's stdout) of an architecture of TRAINED, 2 epochs each."""
    made: dict[str, tuple[Path, Path, str]] = {}

    def get(arch: str) -> tuple[Path, Path, str]:
        if arch not in made:
            tmp = tmp_path_factory.mktemp(arch)
            processes, options = TRAINED[arch]
            args = ["train", *options, *COMMON, "--epochs", "2"]
            _ok(_quorum(*args, "--out", str(tmp / "one")))
            out = _ok(_quorum(*args, "--out", str(tmp / "many"), processes=processes)).stdout
            made[arch] = (tmp / "one", tmp / "many", out)
        return made[arch]

    return get


@pytest.mark.parametrize("arch", sorted(TRAINED))
def test_torchrun_trains_the_one_process_ensemble(trained, arch: str):
    one, many, stdout = trained(arch)
    diffs = _max_diff(one / "last.pt", many / "last.pt")
    assert max(diffs.values()) <= TOLERANCE[arch], diffs
    a, b = read_jsonl(one / "metrics.jsonl"), read_jsonl(many / "metrics.jsonl")
    assert [r["epoch"] for r in b] == [1, 2]
    for ra, rb in zip(a, b, strict=True):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-4)
        assert rb["val_nll"] == pytest.approx(ra["val_nll"], rel=1e-3)
        # 1,000 validation images: a few may sit on a decision boundary that float rounding crosses
        assert abs(rb["val_error"] - ra["val_error"]) <= 0.003
        assert abs(rb["val_oracle_accuracy"] - ra["val_oracle_accuracy"]) <= 0.003
        assert len(rb["val_module_errors"]) == len(ra["val_module_errors"])
        assert max(abs(x - y) for x, y in zip(ra["val_module_errors"], rb["val_module_errors"], strict=True)) <= 0.003
    # the checkpoints hold what one process writes; progress and logs come from rank 0 alone
    for name in ("last.pt", "best.pt"):
        ca, cb = load_checkpoint(one / name), load_checkpoint(many / name)
        assert ca.keys() == cb.keys() and ca["epoch"] == cb["epoch"]
    assert stdout.count("2 epochs; best validation error") == 1


def test_the_export_of_a_module_parallel_run_is_the_one_process_bundle(trained, tmp_path: Path):
    from quorum.exporter.export import export_run
    from quorum.runtime.manifest import Manifest

    one, many, _ = trained("convnet")
    a = export_run(one, tmp_path / "one", progress=False)
    b = export_run(many, tmp_path / "many", progress=False)
    assert Manifest.load(tmp_path / "many").training.arch == "convnet"
    assert (a.training.arch, len(a.modules), a.training.exported_epoch) == (b.training.arch, len(b.modules), 2)
    assert b.metrics.test_error == pytest.approx(a.metrics.test_error, abs=0.002)
    assert [m.val_error for m in b.modules] == pytest.approx([m.val_error for m in a.modules], abs=0.003)
    assert all(m.parity <= 1e-4 for m in b.modules)


SMALL = ["--modules", "8", "--hidden", "4", "--subset", "600", *COMMON]  # 6 steps an epoch


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[Path, Path]:
    """(one-process, 2-process) runs of SMALL, 3 epochs each, never interrupted."""
    tmp = tmp_path_factory.mktemp("straight")
    _ok(_quorum("train", *SMALL, "--epochs", "3", "--out", str(tmp / "one")))
    _ok(_quorum("train", *SMALL, "--epochs", "3", "--out", str(tmp / "two"), processes=2))
    return tmp / "one", tmp / "two"


def test_a_run_resumes_at_any_world_size(straight, tmp_path: Path):
    one, _ = straight
    run = str(tmp_path / "run")
    _ok(_quorum("train", *SMALL, "--epochs", "1", "--out", run, processes=2))
    _ok(_quorum("train", *SMALL, "--epochs", "2", "--out", run, "--resume"))  # one process
    _ok(_quorum("train", *SMALL, "--epochs", "3", "--out", run, "--resume", processes=3))
    assert [r["epoch"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]
    assert max(_max_diff(one / "last.pt", tmp_path / "run" / "last.pt").values()) <= TOLERANCE["mlp"]
    assert load_checkpoint(tmp_path / "run" / "best.pt")["epoch"] == load_checkpoint(one / "best.pt")["epoch"]


# Runs the CLI under torchrun; on the first attempt, rank KILL_RANK SIGKILLs itself at its
# KILL_STEP-th optimizer step (mid-epoch).
KILLER = """
import os, signal, sys
import torch
from quorum.cli import main

if os.environ["RANK"] == os.environ["KILL_RANK"] and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
    step, taken = torch.optim.SGD.step, [0]

    def counted(self, *args, **kwargs):
        taken[0] += 1
        if taken[0] == int(os.environ["KILL_STEP"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return step(self, *args, **kwargs)

    torch.optim.SGD.step = counted
sys.exit(main(sys.argv[1:]))
"""


def _killer(tmp_path: Path) -> Path:
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    return script


def test_a_killed_rank_under_max_restarts_finishes_the_run_from_its_checkpoint(straight, tmp_path: Path):
    one, two = straight
    run = tmp_path / "run"
    kill = {"KILL_RANK": "1", "KILL_STEP": "9"}  # epoch 2, step 3 of 6: epoch 1 is committed
    proc = _ok(
        _quorum("train", *SMALL, "--epochs", "3", "--out", str(run), processes=2, restarts=1, script=_killer(tmp_path),
                env=kill)
    )  # fmt: skip
    assert "failed (exitcode: -9) local_rank: 1" in proc.stderr  # killed, then restarted by torchrun
    assert "from epoch 1 on 2 processes" in proc.stderr  # ... and resumed from its checkpoint
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]
    # resumed at the same world size from a checkpoint that holds every bit of the state: the same run
    assert max(_max_diff(two / "last.pt", run / "last.pt").values()) == 0.0
    assert max(_max_diff(two / "best.pt", run / "best.pt").values()) == 0.0
    assert max(_max_diff(one / "last.pt", run / "last.pt").values()) <= TOLERANCE["mlp"]
    assert [r["val_error"] for r in read_jsonl(run / "metrics.jsonl")] == [
        r["val_error"] for r in read_jsonl(two / "metrics.jsonl")
    ]


def test_a_rank_that_dies_ends_the_job_and_torchrun_names_it(tmp_path: Path, data_dir: Path):
    kill = {"KILL_RANK": "1", "KILL_STEP": "9"}
    t0 = time.monotonic()
    proc = _quorum("train", *SMALL, "--epochs", "3", "--out", str(tmp_path / "run"), processes=2,
                   script=_killer(tmp_path), env=kill)  # fmt: skip
    assert proc.returncode != 0
    root_cause = proc.stderr.split("Root Cause")[-1]
    assert "rank      : 1 " in root_cause and "SIGKILL" in root_cause, proc.stderr[-3000:]
    assert time.monotonic() - t0 < 120  # the survivor does not wait on a dead peer
    # what was committed stays: epoch 1, from which --resume continues
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1


def test_an_error_on_rank_0_stops_every_rank_with_one_message(straight, tmp_path: Path):
    one, _ = straight
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(one / "config.json", run / "config.json")
    proc = _quorum("train", *SMALL, "--out", str(run), processes=2, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("already holds a run; pass --resume") == 1, proc.stderr[-3000:]
    assert json.loads((run / "config.json").read_text()) == json.loads((one / "config.json").read_text())
