"""Offline evaluation: every module's logits on a whole dataset, computed once, for robustness
curves and specialist comparisons that combine subsets afterwards.

Unlike a prediction, a module that is not healthy or that fails raises: an evaluation must
not silently change its subset.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from quorum.runtime.errors import InvalidRequest

__all__ = ["module_logits"]


def module_logits(
    sessions: dict[int, ort.InferenceSession],
    x: np.ndarray,
    ids: list[int],
    input_name: str,
    output_name: str,
    num_outputs: int,
    batch_size: int = 1000,
) -> np.ndarray:
    """Logits (N, len(ids), K) of each module of `ids` on model inputs x (normalized, through the trunk)."""
    if missing := [j for j in ids if j not in sessions]:
        raise InvalidRequest(f"module(s) {missing} are not healthy in this bundle")
    out = np.empty((x.shape[0], len(ids), num_outputs), np.float32)
    for col, j in enumerate(ids):
        for i in range(0, x.shape[0], batch_size):
            out[i : i + batch_size, col] = sessions[j].run([output_name], {input_name: x[i : i + batch_size]})[0]
    return out
