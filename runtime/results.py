"""What the engine answers: a `Prediction` per request, with the modules it used and why others were not."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from quorum.runtime.confidence import MemberSums, Uncertainty

__all__ = ["FailedModule", "FailureKind", "Partial", "Prediction", "SpecialistAnswer"]

# error (raised, misshapen), timeout, nonfinite: the module's run; unavailable: not served here (another
# shard's, quarantined, or its breaker open); shard_*: a gateway lost the shard that holds it.
FailureKind = Literal[
    "error", "timeout", "nonfinite", "unavailable", "shard_unreachable", "shard_timeout", "shard_error"
]


@dataclass(frozen=True)
class FailedModule:
    id: int
    reason: str
    kind: FailureKind = "error"
    injected: bool = False  # put there by a fault plan (a rehearsal), not a real failure


@dataclass
class Partial:
    """A shard's share of an answer: the sum of the outputs of the modules it ran (a gateway adds
    the shards' sums and divides by the modules used)."""

    sum: np.ndarray  # (N, K) float32: the sum over `used` of each module's outputs; zeros if none
    used: list[int]
    failed: list[FailedModule] = field(default_factory=list)
    unfinished: list[int] = field(default_factory=list)  # cut off by the deadline (not failures)
    latency_ms: float = 0.0
    members: MemberSums | None = None  # the used modules' sums for the disagreement (None: not known)


@dataclass
class SpecialistAnswer:
    """The one-vs-all answer of a class's specialist subset: "is it class c?"."""

    class_index: int
    class_name: str
    subset: list[int]  # the class's specialist modules, in selection order
    val_f1: float  # the subset's F1 on the validation split, where it was chosen
    is_class: np.ndarray  # (N,) bool: the subset's argmax is the class
    probability: np.ndarray  # (N,) float32: the subset's probability of the class


@dataclass(slots=True)
class Prediction:
    """The combined answer of the modules used.

    `values` is what the task's combiner makes of the mean of their outputs. `probabilities`,
    `labels` and `class_names` are the classification view: empty (size 0) for tasks without
    classes (regression, counts). `specialist` is set for a specialist query.
    """

    task: str  # the bundle's task kind (quorum.core.tasks)
    values: np.ndarray  # (N, K) class probabilities | (N, D) predicted values or expected counts
    probabilities: np.ndarray  # (N, K) float32, softmax of the mean of the used modules' logits; (N, 0) if no classes
    labels: np.ndarray  # (N,) int64 argmax; (0,) if no classes
    class_names: list[str]  # (N,) name of each label; [] if no classes
    requested: int  # modules asked for (the budget, or all modules of the order)
    used: list[int]  # ids whose logits were combined, in anytime (or selection) order
    dropped: list[int] = field(default_factory=list)  # made unavailable by fault injection
    failed: list[FailedModule] = field(default_factory=list)  # ran but gave no usable answer
    unfinished: list[int] = field(default_factory=list)  # not done by the request's deadline (not failures)
    degraded: bool = False  # fewer modules answered than were requested
    latency_ms: float = 0.0
    specialist: SpecialistAnswer | None = None
    per_input: np.ndarray | None = None  # (N,) budget=auto: modules each input used, the first of `used`
    uncertainty: Uncertainty | None = None  # classification: entropy, mutual information, vote share per input
