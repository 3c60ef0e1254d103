"""Heads: turn the mean of the used modules' outputs into the task's answer.

Classes: probabilities (softmax of the mean logits), labels and class names. Tasks without
classes: values in the targets' units (regression) or expected counts; an input so far from
the training data that the answer overflows float32 is the caller's mistake.
"""

from __future__ import annotations

import numpy as np

from quorum.runtime.errors import InvalidRequest
from quorum.runtime.manifest import Manifest

__all__ = ["Answer", "Head"]

Answer = tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]  # values, probabilities, labels, class names


class Head:
    """The answer of one bundle's task from mean module outputs (N, K)."""

    def __init__(self, manifest: Manifest):
        self.task = manifest.task.task
        self._class_names = list(manifest.task.class_names)
        out, width = manifest.output, manifest.num_classes
        self._scale = np.asarray(out.target_scale or [1.0] * width, np.float32)[None]  # (1, D)
        self._shift = np.asarray(out.target_shift or [0.0] * width, np.float32)[None]

    def __call__(self, mean: np.ndarray) -> Answer:
        """The answer from mean module outputs (N, K), which this may overwrite."""
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
