"""The runtime engine: verify a bundle, plan each request, run the modules, combine.

    engine = Engine.load("bundles/demo")
    result = engine.predict(x_raw, budget=32)   # x_raw: (N, 784) raw pixel values 0..255

A classification bundle answers class probabilities and labels; a regression or count bundle
(task.kind) answers values: the mean of the modules' outputs through the manifest's combiner.

A module whose file is missing, fails its checksum or fails to load is quarantined at load
and the engine serves with the rest. At request time a module that raises or returns
non-finite logits is left out of that answer, with its reason. The engine knows nothing of HTTP.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort

from quorum.runtime.breaker import Breakers, BreakerState
from quorum.runtime.errors import BundleError, InvalidRequest, NoModulesAvailable
from quorum.runtime.executors import FailureKind, IsolatedExecutor, ModuleRun, PackedExecutor
from quorum.runtime.faults import FaultPlan
from quorum.runtime.manifest import PARITY_ATOL, PARITY_RTOL, Manifest, ModuleEntry, TaskKind, probe_input
from quorum.runtime.plan import make_plan
from quorum.runtime.providers import CUDA, requested_providers, session_options

__all__ = ["Engine", "FailedModule", "ModuleState", "Prediction", "SpecialistPrediction", "softmax"]

log = logging.getLogger(__name__)


@dataclass
class ModuleState:
    """Health and counters of one module."""

    id: int
    file: str
    status: Literal["healthy", "quarantined"]
    reason: str | None = None  # why it is quarantined
    calls: int = 0  # answers it was asked to take part in, on either path
    failures: int = 0  # runs that raised, timed out or returned non-finite values
    failure_kinds: dict[str, int] = field(default_factory=dict)  # failures by kind, or "injected"
    last_error: str | None = None
    total_ms: float = 0.0  # time spent in its runs of its own session (the packed path times whole calls)
    timed_runs: int = 0  # runs of its own session
    breaker: BreakerState = "closed"  # open: out of rotation after repeated failures, until open_for_s passes
    open_for_s: float | None = None
    breaker_trips: int = 0

    @property
    def mean_ms(self) -> float | None:
        """Mean time of a run of its own session; None if it has run only inside packed calls."""
        return round(self.total_ms / self.timed_runs, 4) if self.timed_runs else None


@dataclass(frozen=True)
class FailedModule:
    id: int
    reason: str
    kind: FailureKind = "error"  # error (raised, misshapen), timeout, nonfinite
    injected: bool = False  # put there by a fault plan (a rehearsal), not a real failure


@dataclass
class Prediction:
    """The combined answer of the modules used.

    `values` is what the bundle's combiner makes of the mean of their outputs, whatever the task.
    `probabilities`, `labels` and `class_names` are the classification view: empty (size 0) for
    regression and count bundles, which have no classes.
    """

    task: TaskKind
    values: np.ndarray  # (N, K) class probabilities | (N, D) predicted values (regression) or expected counts (count)
    probabilities: np.ndarray  # (N, K) float32, softmax of the mean of the used modules' logits; (N, 0) if no classes
    labels: np.ndarray  # (N,) int64 argmax; (0,) if no classes
    class_names: list[str]  # (N,) name of each label; [] if no classes
    requested: int  # modules asked for (the budget, or all modules of the bundle)
    used: list[int]  # ids whose logits were combined, in anytime order
    dropped: list[int] = field(default_factory=list)  # made unavailable by fault injection
    failed: list[FailedModule] = field(default_factory=list)  # ran but gave no usable answer
    unfinished: list[int] = field(default_factory=list)  # not done by the request's deadline (not failures)
    degraded: bool = False  # fewer modules answered than were requested
    latency_ms: float = 0.0


@dataclass
class SpecialistPrediction:
    class_index: int
    class_name: str
    subset: list[int]  # the class's specialist modules, in selection order
    val_f1: float  # the subset's F1 on the validation split, where it was chosen
    is_class: np.ndarray  # (N,) bool: the subset's argmax is the class
    probability: np.ndarray  # (N,) float32: the subset's probability of the class
    prediction: Prediction  # the subset's full answer (modules used, dropped, failed, latency)


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits."""
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    out: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verified(bundle_dir: Path, file: str, sha256: str) -> Path:
    """The path of a bundle file that lies inside the bundle and matches its checksum; else _Quarantine."""
    path = (bundle_dir / file).resolve()
    if not path.is_relative_to(bundle_dir.resolve()):
        raise _Quarantine(f"file {file!r} lies outside the bundle")
    if not path.is_file():
        raise _Quarantine(f"file {file} is missing")
    if (digest := _sha256(path)) != sha256:
        raise _Quarantine(f"checksum mismatch for {file}: manifest {sha256[:12]}…, file {digest[:12]}…")
    return path


Executor = Literal["auto", "packed", "isolated"]


class Engine:
    """A loaded bundle, ready to answer budgeted predictions. Safe to call from many threads.

    `executor` says how modules run: "packed" (one call of the bundle's packed graph for any
    subset), "isolated" (one session per module, concurrent, each under a deadline), or
    "auto": packed when the bundle has a packed graph that verifies, else isolated.
    """

    def __init__(
        self,
        bundle_dir: Path,
        manifest: Manifest,
        isolated: IsolatedExecutor,
        modules: list[ModuleState],
        packed: PackedExecutor | None = None,
        packed_note: str | None = None,
        *,
        wait_for_first: bool = False,
        breaker: tuple[int, float, float] = (5, 30.0, 30.0),
        trunk: ort.InferenceSession | None = None,
    ):
        self.bundle_dir = bundle_dir
        self._trunk = trunk
        self.manifest = manifest
        self._states = modules
        # Calls per module on the packed path, added to in one vectorized step per request.
        self._packed_calls = np.zeros(len(modules), np.int64)
        self._sessions = isolated.sessions
        self._isolated = isolated
        self._packed = packed
        self.executor: Literal["packed", "isolated"] = "packed" if packed else "isolated"
        self.packed_note = packed_note  # why the packed graph is not used, if it is not
        self.wait_for_first = wait_for_first  # under a deadline, wait for the first module past it
        self.faults: FaultPlan | None = None  # the server-wide fault plan (rehearsals), set by the admin API
        self._lock = threading.Lock()  # guards the counters in `modules`
        spec = manifest.input
        self._input_shape = tuple(spec.shape)
        channels = len(spec.mean)
        # Preprocessing constants shaped once, at load: per channel on axis 1 (per feature for
        # tabular inputs of shape [F], where the F features are the channels).
        bshape = (1, channels) + (1,) * (len(spec.shape) - 1) if channels > 1 else (1,)
        self._scale = np.float32(spec.scale)
        self._mean = np.asarray(spec.mean, dtype=np.float32).reshape(bshape)
        self._std = np.asarray(spec.std, dtype=np.float32).reshape(bshape)
        self._class_names = np.asarray(manifest.task.class_names, dtype=object)
        out = manifest.output
        # regression: value = mean eta * target_scale + target_shift, per output: (1, D)
        self._target_scale = np.asarray(out.target_scale or [1.0] * manifest.num_classes, np.float32)[None]
        self._target_shift = np.asarray(out.target_shift or [0.0] * manifest.num_classes, np.float32)[None]
        self.breakers = Breakers(len(modules), *breaker)
        # The orders restricted to modules in rotation; recomputed only when that set changes.
        self._rotation_version = -1
        self._anytime: list[int] = []
        self._specialists: list[list[int]] = []
        self._rotation()
        self.providers = sorted({p for s in self._sessions.values() for p in s.get_providers()[:1]})

    # ---------------------------------------------------------------- loading

    @classmethod
    def load(
        cls,
        bundle_dir: str | os.PathLike[str],
        *,
        device: str = "auto",
        executor: Executor = "auto",
        workers: int | None = None,
        module_timeout_ms: float = 1000.0,
        packed_cache_mb: float = 64.0,
        packed_threads: int = 1,
        wait_for_first: bool = False,
        breaker: tuple[int, float, float] = (5, 30.0, 30.0),
    ) -> Engine:
        """Verify and load a bundle. Raises BundleError only when no module is healthy, or when
        `executor="packed"` is asked for and the bundle's packed graph is missing or does not verify.

        Args:
            device: "auto" (CUDA where it loads), "cpu" or "cuda".
            executor: "auto", "packed" or "isolated" (see the class docstring).
            workers: concurrent module runs per request on the isolated path (default: cores).
            module_timeout_ms: the time one module run may take from its start (isolated path); a
                request ends by twice this.
            packed_cache_mb: memory for the gathered weights of subsets asked for again (budgets
                on the anytime order, specialists); 0 turns the cache off.
            packed_threads: intra-op threads of the packed session. 1 (the default) is fastest
                for small requests and never competes with the server's own thread; 2 halves the
                time of a 64-image, 256-module request on two cores (docs/RESULTS.md).
            wait_for_first: under `deadline_ms`, wait past the deadline for the first module
                (up to the module timeout) rather than answer that none finished.
            breaker: (failures, window_s, open_s): a module that fails `failures` times within
                `window_s` is out of rotation for `open_s`, then tried again (0 failures: off).
        """
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
        providers = requested_providers(device)
        opts = session_options()
        sessions: dict[int, ort.InferenceSession] = {}
        states = {e.id: ModuleState(e.id, e.file, "healthy") for e in manifest.modules}

        def quarantine(j: int, why: str) -> None:
            log.warning("module %d quarantined: %s", j, why)
            states[j].status, states[j].reason = "quarantined", why
            sessions.pop(j, None)

        trunk = cls._load_trunk(bundle_dir, manifest, opts, providers)

        for entry in manifest.modules:
            try:
                session = cls._load_module(bundle_dir, manifest, entry, opts, providers)
            except _Quarantine as q:
                quarantine(entry.id, str(q))
                continue
            if CUDA in providers and session.get_providers()[0] != CUDA:
                log.info("CUDA execution provider did not load; running on the CPU")
                providers = [p for p in providers if p != CUDA]
            sessions[entry.id] = session
        isolated = IsolatedExecutor(
            sessions,
            manifest.input.name,
            manifest.output.name,
            workers=workers,
            timeout_s=module_timeout_ms / 1e3,
        )
        # Every module must answer a probe input, finite and in shape, within the deadline.
        probe = probe_input(manifest.input)
        if trunk is not None:
            probe = trunk.run(None, {manifest.input.name: probe})[0]
        probe_logits: dict[int, np.ndarray] = {}
        for run in isolated.run(sorted(sessions), probe):
            if run.error is not None or run.logits is None:
                quarantine(run.id, f"{manifest.modules[run.id].file} fails on a probe input: {run.error}")
            elif run.logits.shape != (probe.shape[0], manifest.num_classes) or not np.isfinite(run.logits).all():
                quarantine(
                    run.id, f"{manifest.modules[run.id].file} gives non-finite or misshapen logits on a probe input"
                )
            else:
                probe_logits[run.id] = run.logits
        modules = list(states.values())
        if not sessions:
            reasons = "; ".join(f"m{m.id}: {m.reason}" for m in modules[:5])
            isolated.close()
            raise BundleError(f"{bundle_dir}: no healthy module ({reasons}{'; ...' if len(modules) > 5 else ''})")
        n_bad = len(modules) - len(sessions)
        log.info("loaded %s: %d/%d modules healthy on %s", bundle_dir, len(sessions), len(modules), providers[0])
        if n_bad:
            log.warning("%d module(s) quarantined; serving with the rest", n_bad)
        packed: PackedExecutor | None = None
        note: str | None = "executor=isolated was asked for"
        if executor != "isolated":
            try:
                packed_opts = session_options()
                packed_opts.intra_op_num_threads = packed_threads
                packed_opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads sleep
                packed = cls._load_packed(bundle_dir, manifest, packed_opts, providers, probe, probe_logits)
                cls._load_core(
                    bundle_dir, manifest, packed, packed_opts, providers, probe, int(packed_cache_mb * 2**20)
                )
                note = None
            except _Quarantine as q:
                note = str(q)
                if executor == "packed":
                    isolated.close()
                    raise BundleError(f"{bundle_dir}: executor=packed asked for, but {note}") from None
                # Packed graphs are made for mlp classifiers; elsewhere their absence is no news.
                expected = manifest.packed is None and (
                    manifest.training.arch != "mlp" or manifest.task.kind != "classification"
                )
                (log.info if expected else log.warning)("packed graph not used (%s); one session per module", note)
        return cls(
            bundle_dir,
            manifest,
            isolated,
            modules,
            packed,
            note,
            wait_for_first=wait_for_first,
            breaker=breaker,
            trunk=trunk,
        )

    @staticmethod
    def _load_trunk(
        bundle_dir: Path, manifest: Manifest, opts: ort.SessionOptions, providers: list[str]
    ) -> ort.InferenceSession | None:
        """Verify and load the shared trunk, if the bundle has one. Every module needs it, so a
        trunk that cannot run is a BundleError, not a quarantine."""
        entry = manifest.trunk
        if entry is None:
            return None
        try:
            path = _verified(bundle_dir, entry.file, entry.sha256)
            try:
                session = ort.InferenceSession(str(path), opts, providers=providers)
                out = session.run(None, {manifest.input.name: probe_input(manifest.input)})[0]
            except Exception as e:
                raise _Quarantine(f"ONNX Runtime cannot run {entry.file}: {type(e).__name__}: {e}") from e
            if tuple(out.shape[1:]) != tuple(entry.output_shape) or not np.isfinite(out).all():
                raise _Quarantine(
                    f"{entry.file} gives features of shape {out.shape[1:]}, expected {entry.output_shape}"
                )
        except _Quarantine as q:
            raise BundleError(f"{bundle_dir}: {q}; every module needs the shared trunk; re-export the run") from None
        return session

    @staticmethod
    def _load_module(
        bundle_dir: Path,
        manifest: Manifest,
        entry: ModuleEntry,
        opts: ort.SessionOptions,
        providers: list[str],
    ) -> ort.InferenceSession:
        """Verify module `entry`'s file and load it."""
        path = _verified(bundle_dir, entry.file, entry.sha256)
        try:
            session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as e:
            raise _Quarantine(f"ONNX Runtime cannot load {entry.file}: {e}") from e
        inputs, outputs = session.get_inputs(), session.get_outputs()
        want_in = [manifest.input.name]
        if [i.name for i in inputs] != want_in or inputs[0].type != "tensor(float)":
            raise _Quarantine(f"{entry.file} takes {[(i.name, i.type) for i in inputs]}, expected one float {want_in}")
        if manifest.output.name not in [o.name for o in outputs]:
            raise _Quarantine(f"{entry.file} has no output {manifest.output.name!r}")
        return session

    @staticmethod
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
        if entry is None and manifest.training.arch != "mlp":
            raise _Quarantine(
                f"packed graphs exist for mlp modules; {manifest.training.arch} modules run one session each"
            )
        if entry is None:
            raise _Quarantine("the bundle has no packed graph (add one with `quorum pack BUNDLE`)")
        path = _verified(bundle_dir, entry.file, entry.sha256)
        try:
            session = ort.InferenceSession(str(path), opts, providers=providers)
            packed = PackedExecutor(session, manifest.input.name, entry.index_input, manifest.output.name)
            # The module files are the unit of verification: the packed graph must answer for
            # every healthy module what its file answers.
            for j, expected in probe_logits.items():
                diff = float(np.abs(packed.run([j], probe) - expected).max())
                if not diff <= PARITY_ATOL + PARITY_RTOL * float(np.abs(expected).max()):
                    raise _Quarantine(f"{entry.file} disagrees with {manifest.modules[j].file} by {diff:.2e}")
        except _Quarantine:
            raise
        except Exception as e:
            raise _Quarantine(f"ONNX Runtime cannot run {entry.file}: {type(e).__name__}: {e}") from e
        return packed

    @staticmethod
    def _load_core(
        bundle_dir: Path,
        manifest: Manifest,
        packed: PackedExecutor,
        opts: ort.SessionOptions,
        providers: list[str],
        probe: np.ndarray,
        cache_bytes: int,
    ) -> None:
        """Attach the packed core, if the bundle has one that reproduces the packed graph exactly."""
        entry = manifest.packed
        if entry is None or entry.core_file is None or not entry.weights or cache_bytes <= 0:
            return
        path = (bundle_dir / entry.core_file).resolve()
        try:
            if not path.is_relative_to(bundle_dir.resolve()) or _sha256(path) != entry.core_sha256:
                raise ValueError(f"{entry.core_file} is missing or fails its checksum")
            core = ort.InferenceSession(str(path), opts, providers=providers)
            index = np.arange(len(manifest.modules), dtype=np.int64)
            logits, *weights = packed.session.run(
                [manifest.output.name, *entry.weights], {manifest.input.name: probe, entry.index_input: index}
            )
            feeds = {manifest.input.name: probe, **dict(zip(entry.weights, weights, strict=True))}
            if not np.array_equal(core.run([manifest.output.name], feeds)[0], logits):
                raise ValueError(f"{entry.core_file} does not reproduce {entry.file}")
        except Exception as e:
            log.warning("packed core not used, no weight cache (%s)", e)
            return
        packed.attach_core(core, entry.weights, cache_bytes)

    # ---------------------------------------------------------------- serving

    def _rotation(self) -> tuple[list[int], list[list[int]]]:
        """The anytime order and the specialist subsets without quarantined or open-breaker modules."""
        self.breakers.refresh()
        if self.breakers.version != self._rotation_version:
            with self._lock:
                version = self.breakers.version
                out = self.breakers.closed_to_traffic()
                ok = frozenset(j for j in self._sessions if j not in out)
                self._anytime = [j for j in self.manifest.anytime_order if j in ok]
                self._specialists = [[j for j in s.modules if j in ok] for s in self.manifest.specialists]
                self._rotation_version = version
        return self._anytime, self._specialists

    @property
    def modules(self) -> list[ModuleState]:
        """A snapshot of every module's state and counters, by id."""
        now = time.monotonic()
        states = []
        for m in self._states:
            breaker, until = self.breakers.state(m.id)
            states.append((m, breaker, None if until is None else round(max(0.0, until - now), 3)))
        with self._lock:
            return [
                replace(
                    m,
                    calls=m.calls + int(self._packed_calls[m.id]),
                    failure_kinds=dict(m.failure_kinds),
                    breaker=breaker,
                    open_for_s=open_for,
                    breaker_trips=self.breakers.trips(m.id),
                )
                for m, breaker, open_for in states
            ]

    @property
    def healthy_ids(self) -> frozenset[int]:
        return frozenset(self._sessions)

    @property
    def num_modules(self) -> int:
        return len(self.manifest.modules)

    def _features(self, x: np.ndarray) -> np.ndarray:
        """What the module graphs take: x itself, or the shared trunk's features of x."""
        if self._trunk is None:
            return x
        try:
            features: np.ndarray = self._trunk.run(None, {self.manifest.input.name: x})[0]
        except Exception as e:
            raise NoModulesAvailable(f"the shared trunk failed, and every module needs it: {e}") from e
        if not np.isfinite(features).all():
            raise NoModulesAvailable("the shared trunk gave non-finite features, and every module needs them")
        return features

    def preprocess(self, x_raw: Any) -> np.ndarray:
        """Validate raw inputs (N, *input.shape) and normalize them as the manifest says."""
        try:
            x = np.asarray(x_raw)
        except (ValueError, TypeError) as e:  # ragged nesting
            raise InvalidRequest(f"inputs must be a rectangular array of numbers: {e}") from None
        kind = x.dtype.kind  # i, u: integers; f: floats; anything else is refused
        if kind not in "iuf":
            raise InvalidRequest(f"inputs must be real numbers, got dtype {x.dtype}")
        shape = self._input_shape
        if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape or x.shape[0] < 1:
            raise InvalidRequest(
                f"inputs must have shape (N, {', '.join(map(str, shape))}) with N >= 1, got {tuple(x.shape)}"
            )
        if kind == "f" and not np.isfinite(x).all():
            bad = np.argwhere(~np.isfinite(x))[0]
            raise InvalidRequest(f"inputs must be finite; input {bad[0]} holds {x[tuple(bad)]} at {tuple(bad[1:])}")
        lo_hi = self.manifest.input.raw_range
        if lo_hi is not None:
            lo, hi = lo_hi
            fits = kind == "u" and lo <= 0 and 2 ** (8 * x.dtype.itemsize) - 1 <= hi  # e.g. uint8 in [0, 255]
            if not fits and (x.min() < lo or x.max() > hi):
                raise InvalidRequest(
                    f"inputs must be raw values in [{lo:g}, {hi:g}] (found {x.min():g}..{x.max():g}); "
                    "send unnormalized values: the runtime applies the manifest's normalization"
                )
        x = x.astype(np.float32, copy=False)
        out: np.ndarray = (x * self._scale - self._mean) / self._std
        return out.astype(np.float32, copy=False)

    def predict(
        self,
        x_raw: Any,
        budget: int | None = None,
        drop: float | int | None = None,
        seed: int | None = None,
        deadline_ms: float | None = None,
        faults: FaultPlan | None = None,
    ) -> Prediction:
        """Predict with a budgeted subset of modules.

        Args:
            x_raw: (N, *input.shape) raw inputs, as clients send them (0..255 pixels).
            budget: evaluate the first `budget` available modules of the anytime order
                (1..M; default: all available). Fewer available -> all of them, `degraded`.
            drop: simulate failed hardware: an int count, or a float fraction in [0, 1),
                of the available modules made unavailable at random.
            seed: seeds the choice of dropped modules.
            deadline_ms: answer with the modules of the plan, in order, that finish within this
                time (anytime prediction); none finished -> NoModulesAvailable, unless the engine
                was loaded with `wait_for_first`.
            faults: a fault plan for this request, on top of the engine's own (`self.faults`).
        """
        return self._predict(x_raw, self._rotation()[0], self.num_modules, budget, drop, seed, deadline_ms, faults)

    def predict_specialist(
        self,
        x_raw: Any,
        cls: int | str,
        budget: int | None = None,
        drop: float | int | None = None,
        seed: int | None = None,
        deadline_ms: float | None = None,
        faults: FaultPlan | None = None,
    ) -> SpecialistPrediction:
        """Answer "is it class `cls`?" with that class's specialist sub-ensemble.

        `cls` is a class index or a class name (case-insensitive). The subset's modules are
        used in the order they were selected, so `budget` and `drop` act on it as they act on
        the anytime order in `predict`. Positive when the subset's argmax is the class.
        """
        task = self.manifest.task
        if task.kind != "classification":
            raise InvalidRequest(
                f"specialists answer class questions (is it class c?), and bundle {self.manifest.name!r} is a "
                f"{task.kind} model of {', '.join(task.target_names)}, with no classes; predict without a specialist"
            )
        c = self.class_index(cls)
        if not self.manifest.specialists:
            raise InvalidRequest(
                f"bundle {self.manifest.name!r} has no specialist subsets; re-export its run with "
                "`quorum export` to select them"
            )
        spec = self.manifest.specialists[c]
        pred = self._predict(x_raw, self._rotation()[1][c], len(spec.modules), budget, drop, seed, deadline_ms, faults)
        return SpecialistPrediction(
            class_index=c,
            class_name=spec.class_name,
            subset=list(spec.modules),
            val_f1=spec.val_f1,
            is_class=pred.labels == c,
            probability=pred.probabilities[:, c],
            prediction=pred,
        )

    def may_wait(self, faults: FaultPlan | None = None) -> bool:
        """Whether a request can wait on module deadlines (isolated path, or faults injected),
        rather than finish in one bounded packed call."""
        return self._packed is None or FaultPlan.merge(self.faults, faults) is not None

    def class_index(self, cls: int | str) -> int:
        """The index of class `cls`, given as an index or a name (case-insensitive)."""
        task = self.manifest.task
        if task.kind != "classification":
            raise InvalidRequest(f"bundle {self.manifest.name!r} is a {task.kind} model: it has no classes")
        names = task.class_names
        text = str(cls).strip()
        if text.lstrip("-").isdigit():
            c = int(text)
            if 0 <= c < len(names):
                return c
        else:
            by_name = {n.casefold(): i for i, n in enumerate(names)}
            if text.casefold() in by_name:
                return by_name[text.casefold()]
        valid = ", ".join(f"{i} ({n!r})" for i, n in enumerate(names))
        raise InvalidRequest(f"unknown class {cls!r}; give an index or a name: {valid}")

    def _predict(
        self,
        x_raw: Any,
        available: list[int],
        num_modules: int,
        budget: int | None,
        drop: float | int | None,
        seed: int | None,
        deadline_ms: float | None = None,
        faults: FaultPlan | None = None,
    ) -> Prediction:
        """Predict with modules from `available` (healthy ids, best first) out of `num_modules`."""
        t0 = time.perf_counter()
        if deadline_ms is not None and (isinstance(deadline_ms, bool) or not 0 < deadline_ms < math.inf):
            raise InvalidRequest(f"deadline_ms={deadline_ms!r} must be a positive number of milliseconds")
        x = self._features(self.preprocess(x_raw))
        plan_faults = FaultPlan.merge(self.faults, faults)
        fault_drops: list[int] = []
        if plan_faults is not None:
            plan_faults.check_ids(self.num_modules)
            fault_drops = plan_faults.dropped(available)
            gone = set(fault_drops)
            available = [j for j in available if j not in gone]
        trying = self.breakers.any_half_open
        if trying:  # a half-open module is tried by one request at a time
            busy = self.breakers.trials_running()
            available = [j for j in available if j not in busy]
        plan = make_plan(available, None, num_modules, budget=budget, drop=drop, seed=seed)
        selected, trials = self.breakers.claim(plan.selected) if trying else (plan.selected, [])
        dropped = sorted(plan.dropped + fault_drops)
        deadline_s = None if deadline_ms is None else max(0.0, deadline_ms / 1e3 - (time.perf_counter() - t0))
        try:
            # Without drops the subset is a prefix of a fixed order: worth caching its weights.
            mean, used, failed, unfinished = self._combine(selected, x, not dropped, deadline_s, plan_faults)
        finally:
            if trials:
                self.breakers.release(trials)
        if not used:
            if unfinished and not failed:
                raise NoModulesAvailable(f"no module finished within deadline_ms={deadline_ms:g}")
            raise NoModulesAvailable("no module answered: " + "; ".join(f"m{f.id}: {f.reason}" for f in failed[:5]))
        task = self.manifest.task.kind
        if task == "classification":
            values = probs = softmax(mean)  # (N, K)
            labels = probs.argmax(axis=1)
            names = list(self._class_names[labels])
        else:
            values = self._values(mean)  # (N, D)
            probs, labels, names = np.empty((len(mean), 0), np.float32), np.empty(0, np.int64), []
        return Prediction(
            task=task,
            values=values,
            probabilities=probs,
            labels=labels,
            class_names=names,
            requested=plan.requested,
            used=used,
            dropped=dropped,
            failed=failed,
            unfinished=unfinished,
            degraded=len(used) < plan.requested,
            latency_ms=(time.perf_counter() - t0) * 1e3,
        )

    def _values(self, mean: np.ndarray) -> np.ndarray:
        """Regression values or expected counts (N, D) from the mean of the modules' outputs (N, D)."""
        with np.errstate(over="ignore"):
            if self.manifest.output.combiner == "mean_exp":
                values: np.ndarray = np.exp(mean)  # Poisson: the mean log-rate -> the expected count
            else:
                values = mean * self._target_scale + self._target_shift  # Gaussian: back to the target's units
        if not np.isfinite(values).all():
            raise InvalidRequest(
                f"the ensemble's prediction overflows float32 (largest mean output {float(np.abs(mean).max()):.4g}); "
                "the inputs lie far outside the data the bundle was trained on"
            )
        return values.astype(np.float32, copy=False)

    def _run_packed(self, ids: list[int], x: np.ndarray, cacheable: bool = False) -> np.ndarray | None:
        """Mean logits of `ids` from the packed graph, or None when its answer is not usable."""
        assert self._packed is not None
        index = np.array(ids, dtype=np.int64)
        try:
            mean = self._packed.run(index, x, cacheable=cacheable)
            ok = mean.shape == (x.shape[0], self.manifest.num_classes) and bool(np.isfinite(mean).all())
        except Exception as e:
            log.warning("packed graph failed (%s: %s); running the modules one by one", type(e).__name__, e)
            return None
        with self._lock:
            self._packed_calls[index] += 1
        if ok and self.breakers.any_half_open:
            self.breakers.succeeded(ids)
        return mean if ok else None

    def mean_logits(self, x_raw: Any, ids: list[int]) -> np.ndarray:
        """Mean logits (N, K) of exactly the modules `ids`, through this engine's executor.

        For evaluating chosen subsets offline. Unlike `predict`, a module that is not healthy
        or that fails raises: an evaluation must not silently change its subset.
        """
        if not ids or (missing := [j for j in ids if j not in self._sessions]):
            raise InvalidRequest(f"module(s) {ids and missing} are not healthy modules of this bundle")
        mean, _, failed, _ = self._combine(list(ids), self._features(self.preprocess(x_raw)))
        if failed:
            raise NoModulesAvailable("module(s) failed: " + "; ".join(f"m{f.id}: {f.reason}" for f in failed[:5]))
        return mean

    def _combine(
        self,
        ids: list[int],
        x: np.ndarray,
        cacheable: bool = False,
        deadline_s: float | None = None,
        faults: FaultPlan | None = None,
    ) -> tuple[np.ndarray, list[int], list[FailedModule], list[int]]:
        """Mean logits of the modules of `ids` that answer; the ids used; the failures; the ids
        cut off by the deadline.

        The packed graph answers in one call (in growing chunks under a deadline); when it is
        absent, raises or gives non-finite values, the modules run one session each, so that
        every failure has a module and a reason. Requests with faults take that path too: it is
        where module runs can be delayed, made to raise or corrupted.
        """
        if self._packed is not None and faults is None:
            if deadline_s is None:
                mean = self._run_packed(ids, x, cacheable)
                if mean is not None:
                    return mean, ids, [], []
            elif (anytime := self._run_packed_anytime(ids, x, cacheable, deadline_s)) is not None:
                mean, done = anytime
                return mean, ids[:done], [], ids[done:]
        runs = self._isolated.run(ids, x, deadline_s=deadline_s, wait_first=self.wait_for_first, faults=faults)
        unfinished = [r.id for r in runs if r.kind == "deadline"]
        runs = self._checked([r for r in runs if r.kind != "deadline"], x.shape[0])
        used = [r.id for r in runs if r.error is None]
        failed = [
            FailedModule(r.id, r.error, r.kind or "error", r.injected)  # type: ignore[arg-type]
            for r in runs
            if r.error is not None
        ]
        answers = [r.logits for r in runs if r.error is None and r.logits is not None]
        mean = np.mean(np.stack(answers), axis=0) if answers else np.empty((x.shape[0], 0), np.float32)
        return mean, used, failed, unfinished

    def _run_packed_anytime(
        self, ids: list[int], x: np.ndarray, cacheable: bool, deadline_s: float
    ) -> tuple[np.ndarray, int] | None:
        """Anytime prediction on the packed path: the plan's modules in chunks of 1, 1, 2, 4, …
        (each one packed call), until the next chunk, timed by the last, would pass the deadline.

        Returns the mean logits of the first `done` modules and `done`, or None when the packed
        graph's answer is unusable. `done` is 0 when not even the first module finished in time
        (and the engine does not wait for the first).
        """
        t0 = time.perf_counter()
        total, done, size, per_module = None, 0, 1, 0.0
        while done < len(ids):
            chunk = ids[done : done + size]
            if done and time.perf_counter() - t0 + per_module * len(chunk) > deadline_s:
                break
            start = time.perf_counter()
            mean = self._run_packed(chunk, x, cacheable)
            if mean is None:
                return None
            now = time.perf_counter()
            if not done and now - t0 > deadline_s and not self.wait_for_first:
                return np.empty((x.shape[0], 0), np.float32), 0
            per_module = (now - start) / len(chunk)
            total = mean * len(chunk) if total is None else total + mean * len(chunk)
            done += len(chunk)
            size = done  # chunks double the modules done so far
        assert total is not None
        return total / done, done

    def module_logits(self, x_raw: Any, ids: list[int] | None = None, batch_size: int = 1000) -> np.ndarray:
        """Logits of each module in `ids` (default: every healthy module, by id): (N, len(ids), K).

        For offline evaluation (robustness curves, specialist selection), where every module's
        answer on a whole dataset is computed once and subsets are combined afterwards. Unlike
        `predict`, a module that fails here raises: an evaluation must not silently shrink.
        """
        ids = sorted(self._sessions) if ids is None else list(ids)
        if missing := [j for j in ids if j not in self._sessions]:
            raise InvalidRequest(f"module(s) {missing} are not healthy in this bundle")
        x = self._features(self.preprocess(x_raw))
        out = np.empty((x.shape[0], len(ids), self.manifest.num_classes), np.float32)
        name_in, name_out = self.manifest.input.name, self.manifest.output.name
        for col, j in enumerate(ids):
            for i in range(0, x.shape[0], batch_size):
                out[i : i + batch_size, col] = self._sessions[j].run([name_out], {name_in: x[i : i + batch_size]})[0]
        return out

    def _checked(self, runs: list[ModuleRun], n: int) -> list[ModuleRun]:
        """Turn a wrong shape or non-finite logits into an error, and count every run."""
        shape = (n, self.manifest.num_classes)
        for r in runs:
            if r.error is None and r.logits is not None and r.logits.shape != shape:
                r.error, r.kind = f"output shape {r.logits.shape}, expected {shape}", "error"
        answered = [(r, r.logits) for r in runs if r.error is None and r.logits is not None]
        if answered:  # one vectorized check for the common case, where all are finite
            finite: list[bool] = np.isfinite(np.stack([a for _, a in answered])).all(axis=(1, 2)).tolist()
            for (r, _), ok in zip(answered, finite, strict=True):
                if not ok:
                    r.error, r.kind = "non-finite output", "nonfinite"
        with self._lock:
            for r in runs:
                state = self._states[r.id]
                state.calls += 1
                state.total_ms += r.ms
                state.timed_runs += 1
                if r.error is not None:
                    state.failures += 1
                    state.last_error = r.error
                    kind = "injected" if r.injected else r.kind or "error"
                    state.failure_kinds[kind] = state.failure_kinds.get(kind, 0) + 1
        for r in runs:
            if r.error is not None:
                # Injected faults are expected in their thousands during a rehearsal: debug only.
                (log.debug if r.injected else log.warning)("module %d failed: %s", r.id, r.error)
                self.breakers.failed(r.id)
        if self.breakers.any_half_open:
            self.breakers.succeeded(r.id for r in runs if r.error is None)
        return runs

    def close(self) -> None:
        """Release the worker threads of the isolated path."""
        self._isolated.close()


class _Quarantine(Exception):
    """Internal: why a module cannot be loaded."""
