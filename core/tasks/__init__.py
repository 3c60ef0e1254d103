"""Target tasks (classification, regression, counts): one file each, registered by kind.

task = get_task(manifest.task.kind)       # or task_of_family("poisson")
probs = task.combine(mean_logits, scale, shift)
loss = task.modular_loss(eta, y, lam)     # torch tensors, in the trainer
"""

from __future__ import annotations

from quorum.core.tasks import classification as _classification  # noqa: F401  (registers "classification")
from quorum.core.tasks import count as _count  # noqa: F401  (registers "count")
from quorum.core.tasks import regression as _regression  # noqa: F401  (registers "regression")
from quorum.core.tasks._base import Task, get_task, list_tasks, register, task_of_family
from quorum.core.tasks.classification import softmax

__all__ = ["Task", "get_task", "list_tasks", "register", "softmax", "task_of_family"]
