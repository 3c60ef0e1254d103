"""Heads: turn the mean of the used modules' outputs into the task's answer.

Classes: probabilities (softmax of the mean logits), labels and class names. Tasks without
classes: values in the targets' units (regression) or expected counts; an input so far from
the training data that the answer overflows float32 is the caller's mistake.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from quorum.runtime.confidence import MemberSums, Uncertainty, correctness_at, temperature_at, uncertainty
from quorum.runtime.errors import InvalidRequest, NoModulesAvailable
from quorum.runtime.manifest import Manifest
from quorum.runtime.results import FailedModule, Prediction, SpecialistAnswer

if TYPE_CHECKING:
    from quorum.runtime.plan import RequestPlan

__all__ = ["Answer", "Head", "class_index", "nothing_answered", "specialist_answer", "specialist_index"]

Answer = tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]  # values, probabilities, labels, class names


class Head:
    """The answer of one bundle's task from mean module outputs (N, K)."""

    def __init__(self, manifest: Manifest):
        self._manifest = manifest
        self.task = manifest.task.task
        self._class_names = list(manifest.task.class_names)
        out, width = manifest.output, manifest.num_classes
        self._scale = np.asarray(out.target_scale or [1.0] * width, np.float32)[None]  # (1, D)
        self._shift = np.asarray(out.target_shift or [0.0] * width, np.float32)[None]
        conf = manifest.confidence
        # the temperature of b modules, b = 1..M (index b); 1 where the bundle has none fitted
        self.temperatures = np.ones(len(manifest.modules) + 1, np.float32)  # index b: of b modules; 0: none
        if conf is not None:
            b = np.arange(1, len(manifest.modules) + 1)
            self.temperatures[1:] = temperature_at(conf.stages, conf.temperatures, b)
        self.calibrated = conf is not None
        knots = None if conf is None else conf.correctness_knots()
        self._correctness = None if conf is None or knots is None else (conf.stages, knots)

    def __call__(self, mean: np.ndarray, modules: int | np.ndarray = 0) -> Answer:
        """The answer from mean module outputs (N, K) of `modules` modules (one count, or one per
        input; 0: uncalibrated), which this may overwrite."""
        if self.calibrated and self.task.has_classes:
            t = self.temperatures[modules]
            mean = mean / (t[:, None] if isinstance(t, np.ndarray) else t)
        values = self.task.combine(mean, self._scale, self._shift)
        if self.task.has_classes:
            labels = values.argmax(axis=1)
            names = self._class_names
            return values, values, labels, [names[i] for i in labels.tolist()]
        if not np.isfinite(values).all():
            raise InvalidRequest(
                f"the ensemble's prediction overflows float32 (largest mean output {float(np.abs(mean).max()):.4g}); "
                "the inputs lie far outside the data the bundle was trained on"
            )
        values = values.astype(np.float32, copy=False)
        return values, np.empty((len(mean), 0), np.float32), np.empty(0, np.int64), []

    def predict(
        self,
        mean: np.ndarray,
        plan: RequestPlan,
        used: list[int],
        failed: list[FailedModule],
        unfinished: list[int],
        t0: float,
        specialist: int | None,
        members: MemberSums | None = None,
        per_input: np.ndarray | None = None,
    ) -> Prediction:
        """The Prediction of a request planned as `plan`, from the mean outputs of the modules `used`
        (an engine's, or a gateway's from its shards' sums); `t0`: when it arrived (perf_counter).
        `members`: the used modules' sums for the disagreement; `per_input`: modules per input
        (budget=auto), else all of `used`."""
        counts = per_input if per_input is not None else len(used)
        values, probabilities, labels, names = self(mean, counts)
        spread: Uncertainty | None = None
        if self.task.has_classes:
            used_by = counts if isinstance(counts, np.ndarray) else np.full(len(labels), counts)
            right = None
            if self._correctness is not None and len(labels):
                right = correctness_at(*self._correctness, used_by, probabilities.max(axis=1))
            spread = uncertainty(probabilities, labels, members, used_by, right)
        return Prediction(
            task=self._manifest.task.kind,
            values=values,
            probabilities=probabilities,
            labels=labels,
            class_names=names,
            requested=plan.requested,
            used=used,
            dropped=list(plan.dropped),
            failed=failed,
            unfinished=unfinished,
            degraded=len(used) < plan.requested,
            latency_ms=(time.perf_counter() - t0) * 1e3,
            specialist=None
            if specialist is None
            else specialist_answer(self._manifest, specialist, probabilities, labels),
            per_input=per_input,
            uncertainty=spread,
        )


def nothing_answered(
    failed: list[FailedModule], unfinished: list[int], deadline_ms: float | None
) -> NoModulesAvailable:
    """The error of a request that no module answered: the deadline's, or the failures' first reasons."""
    if unfinished and not failed:
        return NoModulesAvailable(f"no module finished within deadline_ms={deadline_ms:g}")
    return NoModulesAvailable("no module answered: " + "; ".join(f"m{f.id}: {f.reason}" for f in failed[:5]))


def class_index(manifest: Manifest, cls: int | str) -> int:
    """The index of class `cls`, given as an index or a name (case-insensitive)."""
    task = manifest.task
    if not task.task.has_classes:
        raise InvalidRequest(f"bundle {manifest.name!r} is a {task.kind} model: it has no classes")
    names = task.class_names
    text = str(cls).strip()
    if text.isascii() and text.lstrip("-").isdigit() and len(text) <= 18:
        c = int(text)
        if 0 <= c < len(names):
            return c
    else:
        by_name = {n.casefold(): i for i, n in enumerate(names)}
        if text.casefold() in by_name:
            return by_name[text.casefold()]
    valid = ", ".join(f"{i} ({n!r})" for i, n in enumerate(names))
    shown = text if len(text) <= 40 else text[:40] + "…"
    raise InvalidRequest(f"unknown class {shown!r}; give an index or a name: {valid}")


def specialist_index(manifest: Manifest, cls: int | str) -> int:
    """The class of a specialist query; InvalidRequest when the bundle cannot answer it."""
    task = manifest.task
    if not task.task.has_classes:
        raise InvalidRequest(
            f"specialists answer class questions (is it class c?), and bundle {manifest.name!r} is a "
            f"{task.kind} model of {', '.join(task.target_names)}, with no classes; predict without a specialist"
        )
    c = class_index(manifest, cls)
    if not manifest.specialists:
        raise InvalidRequest(
            f"bundle {manifest.name!r} has no specialist subsets; re-export its run with `quorum export` to select them"
        )
    return c


def specialist_answer(manifest: Manifest, c: int, probabilities: np.ndarray, labels: np.ndarray) -> SpecialistAnswer:
    """Class c's one-vs-all answer from the subset's probabilities and labels."""
    spec = manifest.specialists[c]
    return SpecialistAnswer(
        class_index=c,
        class_name=spec.class_name,
        subset=list(spec.modules),
        val_f1=spec.val_f1,
        is_class=labels == c,
        probability=probabilities[:, c],
    )
