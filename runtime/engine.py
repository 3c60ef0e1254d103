"""The runtime engine: verify a bundle, plan each request, run the modules, combine.

    engine = Engine.load("bundles/demo")
    result = engine.predict(x_raw, budget=32)   # x_raw: (N, 784) raw pixel values 0..255

A module whose file is missing, fails its checksum or fails to load is quarantined at load
and the engine serves with the rest. At request time a module that raises or returns
non-finite logits is left out of that answer, with its reason. The engine knows nothing of HTTP.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort

from quorum.runtime.errors import BundleError, InvalidRequest, NoModulesAvailable
from quorum.runtime.manifest import Manifest, ModuleEntry
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
    calls: int = 0  # runs attempted
    failures: int = 0  # runs that raised or returned non-finite values
    last_error: str | None = None
    total_ms: float = 0.0  # time spent in its runs

    @property
    def mean_ms(self) -> float | None:
        return round(self.total_ms / self.calls, 4) if self.calls else None


@dataclass(frozen=True)
class FailedModule:
    id: int
    reason: str


@dataclass
class Prediction:
    probabilities: np.ndarray  # (N, K) float32, softmax of the mean of the used modules' logits
    labels: np.ndarray  # (N,) int64
    class_names: list[str]  # (N,) name of each label
    requested: int  # modules asked for (the budget, or all modules of the bundle)
    used: list[int]  # ids whose logits were combined, in anytime order
    dropped: list[int] = field(default_factory=list)  # made unavailable by fault injection
    failed: list[FailedModule] = field(default_factory=list)  # ran but gave no usable answer
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


class Engine:
    """A loaded bundle, ready to answer budgeted predictions. Safe to call from many threads."""

    def __init__(
        self,
        bundle_dir: Path,
        manifest: Manifest,
        sessions: dict[int, ort.InferenceSession],
        modules: list[ModuleState],
    ):
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.modules = modules
        self._sessions = sessions
        self._lock = threading.Lock()  # guards the counters in `modules`
        spec = manifest.input
        self._input_shape = tuple(spec.shape)
        channels = len(spec.mean)
        # Preprocessing constants shaped once, at load: per channel on axis 1.
        bshape = (1, channels) + (1,) * (len(spec.shape) - 1) if channels > 1 else (1,)
        self._scale = np.float32(spec.scale)
        self._mean = np.asarray(spec.mean, dtype=np.float32).reshape(bshape)
        self._std = np.asarray(spec.std, dtype=np.float32).reshape(bshape)
        self._class_names = np.asarray(manifest.task.class_names, dtype=object)
        self.providers = sorted({p for s in sessions.values() for p in s.get_providers()[:1]})

    # ---------------------------------------------------------------- loading

    @classmethod
    def load(cls, bundle_dir: str | os.PathLike[str], *, device: str = "auto") -> Engine:
        """Verify and load a bundle. Raises BundleError only when no module is healthy."""
        bundle_dir = Path(bundle_dir)
        manifest = Manifest.load(bundle_dir)
        providers = requested_providers(device)
        opts = session_options()
        sessions: dict[int, ort.InferenceSession] = {}
        modules: list[ModuleState] = []
        for entry in manifest.modules:
            try:
                session = cls._load_module(bundle_dir, manifest, entry, opts, providers)
            except _Quarantine as q:
                log.warning("module %d quarantined: %s", entry.id, q)
                modules.append(ModuleState(entry.id, entry.file, "quarantined", reason=str(q)))
                continue
            if CUDA in providers and session.get_providers()[0] != CUDA:
                log.info("CUDA execution provider did not load; running on the CPU")
                providers = [p for p in providers if p != CUDA]
            sessions[entry.id] = session
            modules.append(ModuleState(entry.id, entry.file, "healthy"))
        if not sessions:
            reasons = "; ".join(f"m{m.id}: {m.reason}" for m in modules[:5])
            raise BundleError(f"{bundle_dir}: no healthy module ({reasons}{'; ...' if len(modules) > 5 else ''})")
        n_bad = len(modules) - len(sessions)
        log.info("loaded %s: %d/%d modules healthy on %s", bundle_dir, len(sessions), len(modules), providers[0])
        if n_bad:
            log.warning("%d module(s) quarantined; serving with the rest", n_bad)
        return cls(bundle_dir, manifest, sessions, modules)

    @staticmethod
    def _load_module(
        bundle_dir: Path, manifest: Manifest, entry: ModuleEntry, opts: ort.SessionOptions, providers: list[str]
    ) -> ort.InferenceSession:
        root = bundle_dir.resolve()
        path = (bundle_dir / entry.file).resolve()
        if not path.is_relative_to(root):
            raise _Quarantine(f"file {entry.file!r} lies outside the bundle")
        if not path.is_file():
            raise _Quarantine(f"file {entry.file} is missing")
        digest = _sha256(path)
        if digest != entry.sha256:
            raise _Quarantine(f"checksum mismatch for {entry.file}: manifest {entry.sha256[:12]}…, file {digest[:12]}…")
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

    # ---------------------------------------------------------------- serving

    @property
    def healthy_ids(self) -> frozenset[int]:
        return frozenset(self._sessions)

    @property
    def num_modules(self) -> int:
        return len(self.manifest.modules)

    def preprocess(self, x_raw: Any) -> np.ndarray:
        """Validate raw inputs (N, *input.shape) and normalize them as the manifest says."""
        try:
            x = np.asarray(x_raw)
        except (ValueError, TypeError) as e:  # ragged nesting
            raise InvalidRequest(f"inputs must be a rectangular array of numbers: {e}") from None
        if x.dtype == object or not (
            np.issubdtype(x.dtype, np.number) and not np.issubdtype(x.dtype, np.complexfloating)
        ):
            raise InvalidRequest(f"inputs must be real numbers, got dtype {x.dtype}")
        shape = self._input_shape
        if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape or x.shape[0] < 1:
            raise InvalidRequest(
                f"inputs must have shape (N, {', '.join(map(str, shape))}) with N >= 1, got {tuple(x.shape)}"
            )
        x = x.astype(np.float32, copy=False)
        if not np.isfinite(x).all():
            bad = np.argwhere(~np.isfinite(x))[0]
            raise InvalidRequest(f"inputs must be finite; input {bad[0]} holds {x[tuple(bad)]} at {tuple(bad[1:])}")
        lo_hi = self.manifest.input.raw_range
        if lo_hi is not None:
            lo, hi = lo_hi
            if x.min() < lo or x.max() > hi:
                raise InvalidRequest(
                    f"inputs must be raw values in [{lo:g}, {hi:g}] (found {x.min():g}..{x.max():g}); "
                    "send unnormalized values: the runtime applies the manifest's normalization"
                )
        out: np.ndarray = (x * self._scale - self._mean) / self._std
        return out.astype(np.float32, copy=False)

    def predict(
        self,
        x_raw: Any,
        budget: int | None = None,
        drop: float | int | None = None,
        seed: int | None = None,
    ) -> Prediction:
        """Predict with a budgeted subset of modules.

        Args:
            x_raw: (N, *input.shape) raw inputs, as clients send them (0..255 pixels).
            budget: evaluate the first `budget` available modules of the anytime order
                (1..M; default: all available). Fewer available -> all of them, `degraded`.
            drop: simulate failed hardware: an int count, or a float fraction in [0, 1),
                of the available modules made unavailable at random.
            seed: seeds the choice of dropped modules.
        """
        return self._predict(x_raw, self.manifest.anytime_order, budget, drop, seed)

    def predict_specialist(
        self,
        x_raw: Any,
        cls: int | str,
        budget: int | None = None,
        drop: float | int | None = None,
        seed: int | None = None,
    ) -> SpecialistPrediction:
        """Answer "is it class `cls`?" with that class's specialist sub-ensemble.

        `cls` is a class index or a class name (case-insensitive). The subset's modules are
        used in the order they were selected, so `budget` and `drop` act on it as they act on
        the anytime order in `predict`. Positive when the subset's argmax is the class.
        """
        c = self.class_index(cls)
        if not self.manifest.specialists:
            raise InvalidRequest(
                f"bundle {self.manifest.name!r} has no specialist subsets; re-export its run with "
                "`quorum export` to select them"
            )
        spec = self.manifest.specialists[c]
        pred = self._predict(x_raw, spec.modules, budget, drop, seed)
        return SpecialistPrediction(
            class_index=c,
            class_name=spec.class_name,
            subset=list(spec.modules),
            val_f1=spec.val_f1,
            is_class=pred.labels == c,
            probability=pred.probabilities[:, c],
            prediction=pred,
        )

    def class_index(self, cls: int | str) -> int:
        """The index of class `cls`, given as an index or a name (case-insensitive)."""
        names = self.manifest.task.class_names
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
        self, x_raw: Any, order: list[int], budget: int | None, drop: float | int | None, seed: int | None
    ) -> Prediction:
        t0 = time.perf_counter()
        x = self.preprocess(x_raw)
        plan = make_plan(order, self.healthy_ids, len(order), budget=budget, drop=drop, seed=seed)
        used: list[int] = []
        outputs: list[np.ndarray] = []
        failed: list[FailedModule] = []
        for j in plan.selected:
            logits, error = self._run_module(j, x)
            if error is None:
                used.append(j)
                outputs.append(logits)
            else:
                failed.append(FailedModule(j, error))
        if not outputs:
            raise NoModulesAvailable("no module answered: " + "; ".join(f"m{f.id}: {f.reason}" for f in failed[:5]))
        probs = softmax(np.mean(np.stack(outputs), axis=0))  # (N, K)
        labels = probs.argmax(axis=1)
        return Prediction(
            probabilities=probs,
            labels=labels,
            class_names=list(self._class_names[labels]),
            requested=plan.requested,
            used=used,
            dropped=plan.dropped,
            failed=failed,
            degraded=len(used) < plan.requested,
            latency_ms=(time.perf_counter() - t0) * 1e3,
        )

    def module_logits(self, x_raw: Any, ids: list[int] | None = None, batch_size: int = 1000) -> np.ndarray:
        """Logits of each module in `ids` (default: every healthy module, by id): (N, len(ids), K).

        For offline evaluation (robustness curves, specialist selection), where every module's
        answer on a whole dataset is computed once and subsets are combined afterwards. Unlike
        `predict`, a module that fails here raises: an evaluation must not silently shrink.
        """
        ids = sorted(self._sessions) if ids is None else list(ids)
        if missing := [j for j in ids if j not in self._sessions]:
            raise InvalidRequest(f"module(s) {missing} are not healthy in this bundle")
        x = self.preprocess(x_raw)
        out = np.empty((x.shape[0], len(ids), self.manifest.num_classes), np.float32)
        name_in, name_out = self.manifest.input.name, self.manifest.output.name
        for col, j in enumerate(ids):
            for i in range(0, x.shape[0], batch_size):
                out[i : i + batch_size, col] = self._sessions[j].run([name_out], {name_in: x[i : i + batch_size]})[0]
        return out

    def _run_module(self, j: int, x: np.ndarray) -> tuple[np.ndarray, str | None]:
        """Run module j; return its logits (N, K) and None, or an error message."""
        t0 = time.perf_counter()
        error: str | None = None
        logits = np.empty(0, np.float32)
        try:
            logits = self._sessions[j].run([self.manifest.output.name], {self.manifest.input.name: x})[0]
            if logits.shape != (x.shape[0], self.manifest.num_classes):
                error = f"output shape {logits.shape}, expected {(x.shape[0], self.manifest.num_classes)}"
            elif not np.isfinite(logits).all():
                error = "non-finite output"
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        ms = (time.perf_counter() - t0) * 1e3
        with self._lock:
            state = self.modules[j]
            state.calls += 1
            state.total_ms += ms
            if error is not None:
                state.failures += 1
                state.last_error = error
        if error is not None:
            log.warning("module %d failed: %s", j, error)
        return logits, error


class _Quarantine(Exception):
    """Internal: why a module cannot be loaded."""
