"""The `Task` base class and the registry of tasks: `register`, `get_task`, `list_tasks`.

A task is what a bundle's targets are (classes, real values, counts) and everything that
follows from it: the exponential family of the modular loss, its inverse link (the
combiner that turns the mean of the modules' outputs into an answer), the metric that
`val_error` reports, and whether answers carry classes. Trainer, exporter, runtime and
server ask the task instead of comparing names; adding a family is one file in this folder.

The serving half (`combine`) is numpy. The training half (`nll`, `modular_loss`,
`mean_prediction`, `evaluate`) takes torch tensors and uses only their methods, or imports
torch when called, so the serving side never loads torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar, TypeVar

import numpy as np

from quorum.core.errors import QuorumError

if TYPE_CHECKING:
    import torch

__all__ = ["Evaluation", "Task", "get_task", "list_tasks", "register", "task_of_family"]

Evaluation = tuple[float, float, "torch.Tensor"]  # ensemble error, ensemble NLL, per-module errors (M,)


class Task:
    """One kind of target. Subclasses set the class attributes and implement the methods."""

    kind: ClassVar[str]  # the manifest's task.kind: classification | regression | count
    family: ClassVar[str]  # the targets' exponential family in the modular loss: categorical | gaussian | poisson
    combiner: ClassVar[str]  # the manifest's output.combiner: how the mean of module outputs becomes an answer
    metric: ClassVar[str]  # what `val_error` and `test_error` measure: "error" (a rate) or "RMSE"
    has_classes: ClassVar[bool]  # answers are class probabilities and labels (else values per target)
    standardizes_targets: ClassVar[bool] = False  # targets are trained as (y - shift) / scale
    lr_per_module: ClassVar[float | None] = None  # default SGD rate per module; None: the architecture's

    # ------------------------------------------------------------------ serving (numpy)

    def combine(self, mean: np.ndarray, target_scale: np.ndarray, target_shift: np.ndarray) -> np.ndarray:
        """The answer from the mean of the modules' outputs (N, K): class probabilities, or values (N, D)
        in the targets' units (`target_scale`, `target_shift`: (1, D), used where targets were standardized).
        `mean` is the caller's to give away: the answer may be computed in its place."""
        raise NotImplementedError

    # ------------------------------------------------------------------ training (torch tensors)

    def nll(self, eta: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of targets y under natural parameters eta, up to constants in y,
        per example: eta (..., K) against y (...) labels or (..., D) values -> (...)."""
        raise NotImplementedError

    def modular_loss(self, eta: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
        """Batch mean of L_λ = λ·NLL(mean_j η_j, y) + (1 − λ)·mean_j NLL(η_j, y); eta (B, M, K)."""
        raise NotImplementedError

    def combined_nll(self, means: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """NLL of S combined predictions per example (sub-ensembles' mean natural parameters): means
        (B, S, K), or (B, S) for one output, against the batch's targets y -> (B, S). This default serves
        families with one natural parameter per output (NLL summed over them)."""
        out = self.nll(means, y.unsqueeze(1).to(means.dtype))
        return out.sum(dim=-1) if means.dim() == 3 else out

    def mean_prediction(self, eta: torch.Tensor) -> torch.Tensor:
        """The ensemble's conditional mean g(mean_j η_j): (B, M, ...) -> (B, ...)."""
        raise NotImplementedError

    def evaluate(self, eta: torch.Tensor, y: torch.Tensor, target_scale: Sequence[float] = ()) -> Evaluation:
        """The ensemble's error (`metric`) and NLL, and each module's error, from every module's outputs (N, M, K)."""
        raise NotImplementedError

    def initial_eta(self, y_train: torch.Tensor) -> torch.Tensor | None:
        """Natural parameters (D,) that predict the training targets' mean, to start output biases at;
        None where zero does (classes, standardized targets)."""
        return None

    def __repr__(self) -> str:
        return f"<task {self.kind}: {self.family} targets, combiner {self.combiner}>"


_T = TypeVar("_T", bound=type[Task])
_TASKS: dict[str, Task] = {}


def register(cls: _T) -> _T:
    """Class decorator: make a task available to `get_task(kind)`."""
    if cls.kind in _TASKS:
        raise ValueError(f"task {cls.kind!r} is registered twice")
    _TASKS[cls.kind] = cls()
    return cls


def list_tasks() -> list[str]:
    """Every registered task kind, sorted."""
    return sorted(_TASKS)


def get_task(kind: str) -> Task:
    """The task registered as `kind` (the manifest's task.kind)."""
    try:
        return _TASKS[kind]
    except KeyError:
        raise QuorumError(f"unknown task {kind!r}; known tasks: {', '.join(list_tasks())}") from None


def task_of_family(family: str) -> Task:
    """The task whose targets are of exponential family `family` (categorical, gaussian, poisson)."""
    for task in _TASKS.values():
        if task.family == family:
            return task
    known = ", ".join(sorted(t.family for t in _TASKS.values()))
    raise QuorumError(f"unknown target family {family!r}; known families: {known}")


def glm_modular_loss(
    nll: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], eta: torch.Tensor, target: torch.Tensor, lam: float
) -> torch.Tensor:
    """The modular loss of a family with one natural parameter per output and elementwise `nll`:
    eta (B, M) or (B, M, D), target (B,) or (B, D); sum over D, mean over B."""
    if eta.dim() == 2:  # (B, M): one output
        eta, target = eta.unsqueeze(-1), target.unsqueeze(-1)
    assert eta.dim() == 3 and target.shape == (eta.shape[0], eta.shape[2]), (eta.shape, target.shape)
    y = target.to(eta.dtype)  # (B, D)
    joint = nll(eta.mean(dim=1), y).sum(-1).mean()
    if lam == 1.0:
        return joint
    members = nll(eta, y.unsqueeze(1)).sum(-1).mean()  # mean over (B, M) = batch mean of mean_j
    if lam == 0.0:
        return members
    return lam * joint + (1.0 - lam) * members


def rmse_evaluation(
    task: Task, eta: torch.Tensor, y: torch.Tensor, module_pred: torch.Tensor, target_scale: Sequence[float]
) -> Evaluation:
    """RMSEs in the targets' units of the ensemble's mean prediction and of each module's (`module_pred`,
    (N, M, D)), and the ensemble's NLL: the evaluation of every task with values as answers."""
    import torch

    scale = torch.tensor(list(target_scale), device=eta.device) if target_scale else torch.ones((), device=eta.device)
    ens_rmse = (((task.mean_prediction(eta) - y) * scale) ** 2).mean().sqrt()
    module_rmse = (((module_pred - y.unsqueeze(1)) * scale) ** 2).mean(dim=(0, 2)).sqrt()
    return float(ens_rmse), float(task.modular_loss(eta, y, 1.0)), module_rmse.cpu()
