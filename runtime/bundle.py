"""Loading a bundle: verify every file against the manifest, quarantine what fails, load the rest.

A module whose file is missing, lies outside the bundle, fails its checksum, does not load,
or gives non-finite or misshapen logits on a probe input is quarantined and the rest serve.
Sessions are created from the very bytes that were hashed. The packed graph must answer,
module by module, what the healthy module files answer, or it is not used. A trunk that
cannot run, or a bundle with no healthy module, is a BundleError.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from quorum.runtime.errors import BundleError
from quorum.runtime.executors import IsolatedExecutor
from quorum.runtime.manifest import Manifest, ModuleEntry, probe_input
from quorum.runtime.packed import PackedExecutor, expose_hidden
from quorum.runtime.providers import CUDA, requested_providers, session_options
from quorum.runtime.stats import ModuleState

__all__ = ["Executor", "LoadedBundle", "load_bundle"]

log = logging.getLogger(__name__)

Executor = Literal["auto", "packed", "isolated"]


@dataclass
class LoadedBundle:
    """A verified bundle: its manifest, the healthy modules' sessions, and how they can run."""

    dir: Path
    manifest: Manifest
    states: list[ModuleState]  # every module by id: healthy, or quarantined and why
    isolated: IsolatedExecutor  # one session per healthy module
    packed: PackedExecutor | None  # every module in one graph, when the bundle has one that verifies
    packed_note: str | None  # why the packed graph is not used, if it is not
    trunk: ort.InferenceSession | None  # the layers every module shares (TreeNets)
    providers: list[str]  # the execution providers the sessions run on

    @property
    def sessions(self) -> dict[int, ort.InferenceSession]:
        return self.isolated.sessions


class _Quarantine(Exception):
    """Internal: why a file cannot be used."""


def _verified(bundle_dir: Path, file: str, sha256: str | None) -> bytes:
    """The bytes of a bundle file that lies inside the bundle and matches its checksum; else _Quarantine."""
    path = (bundle_dir / file).resolve()
    if not path.is_relative_to(bundle_dir.resolve()):
        raise _Quarantine(f"file {file!r} lies outside the bundle")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _Quarantine(f"file {file} is missing") from None
    except OSError as e:
        raise _Quarantine(f"file {file} cannot be read: {e}") from None
    if (digest := hashlib.sha256(data).hexdigest()) != sha256:
        raise _Quarantine(f"checksum mismatch for {file}: manifest {(sha256 or '?')[:12]}…, file {digest[:12]}…")
    return data


def load_bundle(
    bundle_dir: str | os.PathLike[str],
    *,
    device: str = "auto",
    executor: Executor = "auto",
    workers: int | None = None,
    module_timeout_ms: float = 1000.0,
    packed_cache_mb: float = 64.0,
    packed_threads: int = 1,
    packed_compile: bool = True,
    modules: Collection[int] | None = None,
) -> LoadedBundle:
    """Verify and load a bundle (`Engine.load` documents the arguments). Raises BundleError only when
    no module is healthy, or when `executor="packed"` is asked for and the packed graph does not verify.
    `modules`: load only these (a shard of the bundle); the others are "elsewhere"."""
    if executor not in ("auto", "packed", "isolated"):
        raise ValueError(f"executor must be auto, packed or isolated, got {executor!r}")
    bundle_dir = Path(bundle_dir)
    manifest = Manifest.load(bundle_dir)
    spec = manifest.input
    if len(spec.mean) not in (1, spec.shape[0]):
        raise BundleError(
            f"{bundle_dir}: input.mean and input.std hold {len(spec.mean)} entries for input shape {spec.shape}: "
            "give one, or one per channel (the first axis; per feature for tabular inputs); re-export the run"
        )
    if modules is not None and (bad := sorted(set(modules) - set(range(len(manifest.modules))))):
        raise BundleError(f"{bundle_dir}: no module(s) {bad[:10]}; its modules are 0..{len(manifest.modules) - 1}")
    providers = requested_providers(device)
    fold = manifest.precision is not None and manifest.precision.weights_only
    opts = session_options(fold_dequantize=fold)
    sessions: dict[int, ort.InferenceSession] = {}
    states = [
        ModuleState(e.id, e.file, "healthy")
        if modules is None or e.id in modules
        else ModuleState(e.id, e.file, "elsewhere", reason="served by another shard")
        for e in manifest.modules
    ]

    def quarantine(j: int, why: str) -> None:
        log.warning("module %d quarantined: %s", j, why)
        states[j].status, states[j].reason = "quarantined", why
        sessions.pop(j, None)

    trunk = _load_trunk(bundle_dir, manifest, opts, providers)
    for entry in manifest.modules:
        if states[entry.id].status == "elsewhere":
            continue
        try:
            session = _load_module(bundle_dir, manifest, entry, opts, providers)
        except _Quarantine as q:
            quarantine(entry.id, str(q))
            continue
        if CUDA in providers and session.get_providers()[0] != CUDA:
            log.info("CUDA execution provider did not load; running on the CPU")
            providers = [p for p in providers if p != CUDA]
        sessions[entry.id] = session
    isolated = IsolatedExecutor(
        sessions, manifest.input.name, manifest.output.name, workers=workers, timeout_s=module_timeout_ms / 1e3
    )
    # Every module must answer a probe input, finite and in shape, within its timeout.
    probe = probe_input(manifest.input)
    if trunk is not None:
        probe = trunk.run(None, {manifest.input.name: probe})[0]
    probe_logits: dict[int, np.ndarray] = {}
    for run in isolated.probe(sorted(sessions), probe):
        file = manifest.modules[run.id].file
        if run.error is not None or run.logits is None:
            quarantine(run.id, f"{file} fails on a probe input: {run.error}")
        elif run.logits.shape != (probe.shape[0], manifest.num_classes) or not np.isfinite(run.logits).all():
            quarantine(run.id, f"{file} gives non-finite or misshapen logits on a probe input")
        else:
            probe_logits[run.id] = run.logits
    if not sessions:
        reasons = "; ".join(f"m{m.id}: {m.reason}" for m in states if m.status == "quarantined")[:600]
        isolated.close()
        raise BundleError(f"{bundle_dir}: no healthy module ({reasons or 'none loaded'})")
    here = sum(m.status != "elsewhere" for m in states)
    log.info("loaded %s: %d/%d modules healthy on %s", bundle_dir, len(sessions), here, providers[0])
    if n_bad := here - len(sessions):
        log.warning("%d module(s) quarantined; serving with the rest", n_bad)
    packed: PackedExecutor | None = None
    note: str | None = "executor=isolated was asked for"
    if executor != "isolated":
        try:
            packed_opts = session_options(fold_dequantize=fold)
            packed_opts.intra_op_num_threads = packed_threads
            packed_opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads sleep
            packed = _load_packed(bundle_dir, manifest, packed_opts, providers, probe, probe_logits)
            cache_bytes = int(packed_cache_mb * 2**20)
            _load_core(bundle_dir, manifest, packed, packed_opts, providers, probe, cache_bytes, packed_compile)
            note = None
        except _Quarantine as q:
            note = str(q)
            if executor == "packed":
                isolated.close()
                raise BundleError(f"{bundle_dir}: executor=packed asked for, but {note}") from None
            # Bundles of modules the exporter does not pack have none: their absence is no news.
            (log.info if manifest.packed is None else log.warning)(
                "packed graph not used (%s); one session per module", note
            )
    return LoadedBundle(bundle_dir, manifest, states, isolated, packed, note, trunk, providers)


def _load_trunk(
    bundle_dir: Path, manifest: Manifest, opts: ort.SessionOptions, providers: list[str]
) -> ort.InferenceSession | None:
    """Verify and load the shared trunk, if the bundle has one. Every module needs it, so a
    trunk that cannot run is a BundleError, not a quarantine."""
    entry = manifest.trunk
    if entry is None:
        return None
    try:
        data = _verified(bundle_dir, entry.file, entry.sha256)
        try:
            session = ort.InferenceSession(data, opts, providers=providers)
            out = session.run(None, {manifest.input.name: probe_input(manifest.input)})[0]
        except Exception as e:
            raise _Quarantine(f"ONNX Runtime cannot run {entry.file}: {type(e).__name__}: {e}") from e
        if tuple(out.shape[1:]) != tuple(entry.output_shape) or not np.isfinite(out).all():
            raise _Quarantine(f"{entry.file} gives features of shape {out.shape[1:]}, expected {entry.output_shape}")
    except _Quarantine as q:
        raise BundleError(f"{bundle_dir}: {q}; every module needs the shared trunk; re-export the run") from None
    return session


def _load_module(
    bundle_dir: Path, manifest: Manifest, entry: ModuleEntry, opts: ort.SessionOptions, providers: list[str]
) -> ort.InferenceSession:
    """Verify module `entry`'s file and load it from the bytes that were checked."""
    data = _verified(bundle_dir, entry.file, entry.sha256)
    try:
        session = ort.InferenceSession(data, opts, providers=providers)
    except Exception as e:
        raise _Quarantine(f"ONNX Runtime cannot load {entry.file}: {e}") from e
    inputs, outputs = session.get_inputs(), session.get_outputs()
    want_in = [manifest.input.name]
    if [i.name for i in inputs] != want_in or inputs[0].type != "tensor(float)":
        raise _Quarantine(f"{entry.file} takes {[(i.name, i.type) for i in inputs]}, expected one float {want_in}")
    if manifest.output.name not in [o.name for o in outputs]:
        raise _Quarantine(f"{entry.file} has no output {manifest.output.name!r}")
    return session


def _load_packed(
    bundle_dir: Path,
    manifest: Manifest,
    opts: ort.SessionOptions,
    providers: list[str],
    probe: np.ndarray,
    probe_logits: dict[int, np.ndarray],
) -> PackedExecutor:
    """Load the packed graph and check it, module by module, against the healthy module files."""
    entry = manifest.packed
    if entry is None:
        raise _Quarantine("the bundle has no packed graph (`quorum pack BUNDLE` adds one to a bundle of MLP modules)")
    data = _verified(bundle_dir, entry.file, entry.sha256)
    try:
        data, initializers = expose_hidden(data)  # verified bytes, one output added: the members' hidden units
        session = ort.InferenceSession(data, opts, providers=providers)
        packed = PackedExecutor(session, manifest.input.name, entry.index_input, manifest.output.name)
        if {"W2t", "B2"} <= initializers.keys():
            packed.expose_members(initializers["W2t"], initializers["B2"])
        # The module files are the unit of verification: the packed graph must answer for
        # every healthy module what its file answers.
        for j, expected in probe_logits.items():
            diff = float(np.abs(packed.run([j], probe) - expected).max())
            if not diff <= manifest.parity_bound(float(np.abs(expected).max())):
                raise _Quarantine(f"{entry.file} disagrees with {manifest.modules[j].file} by {diff:.2e}")
    except _Quarantine:
        raise
    except Exception as e:
        raise _Quarantine(f"ONNX Runtime cannot run {entry.file}: {type(e).__name__}: {e}") from e
    return packed


def _load_core(
    bundle_dir: Path,
    manifest: Manifest,
    packed: PackedExecutor,
    opts: ort.SessionOptions,
    providers: list[str],
    probe: np.ndarray,
    cache_bytes: int,
    compile_hot: bool,
) -> None:
    """Attach the packed core, if the bundle has one that reproduces the packed graph exactly."""
    entry = manifest.packed
    if entry is None or entry.core_file is None or not entry.weights or cache_bytes <= 0:
        return
    try:
        data, _ = expose_hidden(_verified(bundle_dir, entry.core_file, entry.core_sha256))
        core = ort.InferenceSession(data, opts, providers=providers)
        index = np.arange(len(manifest.modules), dtype=np.int64)
        logits, *weights = packed.session.run(
            [manifest.output.name, *entry.weights], {manifest.input.name: probe, entry.index_input: index}
        )
        feeds = {manifest.input.name: probe, **dict(zip(entry.weights, weights, strict=True))}
        if not np.array_equal(core.run([manifest.output.name], feeds)[0], logits):
            raise ValueError(f"{entry.core_file} does not reproduce {entry.file}")
    except (_Quarantine, Exception) as e:
        log.warning("packed core not used, no weight cache (%s)", e)
        return
    packed.attach_core(
        core, entry.weights, cache_bytes, core_model=data, compile_options=(opts, providers) if compile_hot else None
    )
