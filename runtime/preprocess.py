"""Preprocessing: validate a batch of raw inputs and normalize it as the manifest says.

    x_model = (x_raw * input.scale - input.mean[c]) / input.std[c]

per channel on axis 1 (per feature for tabular inputs of shape [F]). Every client mistake is
an InvalidRequest naming what was wrong: shape, dtype, non-finite values, values outside the
raw range. Inputs of a bundle without a raw range (tabular data) must lie within
MAX_STANDARD_SCORE training standard deviations of the training mean once normalized: the
modules then give finite outputs, so a module whose output is not finite is at fault, never
the input.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from quorum.runtime.errors import InvalidRequest
from quorum.runtime.manifest import InputSpec

__all__ = ["MAX_STANDARD_SCORE", "Preprocessor", "as_array"]

MAX_STANDARD_SCORE = 1000.0  # |x_model| allowed where the manifest gives no raw range

# Values up to which a table lookup beats the formula's four numpy steps (a few images); past
# it the gather costs more per value than the arithmetic.
_TABLE_MAX = 8192


class Preprocessor:
    """Checks and normalizes raw inputs (N, *input.shape) for one bundle; constants shaped once."""

    def __init__(self, spec: InputSpec):
        self.shape = tuple(spec.shape)
        channels = len(spec.mean)
        bshape = (1, channels) + (1,) * (len(spec.shape) - 1) if channels > 1 else (1,)
        self._scale = np.float32(spec.scale)
        self._mean = np.asarray(spec.mean, dtype=np.float32).reshape(bshape)
        self._std = np.asarray(spec.std, dtype=np.float32).reshape(bshape)
        self.raw_range = spec.raw_range
        self._ndim = len(self.shape) + 1
        # Raw values within 0..255 (pixels): a table of the normalized value of each whole number, per
        # channel, computed with the formula's own float32 steps, so one lookup gives the same bits.
        self._table: np.ndarray | None = None
        if spec.raw_range is not None and spec.raw_range[0] >= 0 and spec.raw_range[1] <= 255:
            levels = np.arange(256, dtype=np.float32)[None] * self._scale  # (1, 256)
            self._table = (levels - self._mean.reshape(-1, 1)) / self._std.reshape(-1, 1)  # (C, 256)
            self._channel = np.arange(channels).reshape(channels, *[1] * (len(self.shape) - 1))
        self._one_table = self._table[0] if self._table is not None and channels == 1 else None

    def __call__(self, x_raw: Any) -> np.ndarray:
        """Validate raw inputs and normalize them: a new float32 array (N, *input.shape)."""
        x = x_raw if type(x_raw) is np.ndarray else as_array(x_raw)
        kind = x.dtype.kind  # i, u: integers; f: floats; anything else is refused
        if kind not in "iuf":
            raise InvalidRequest(f"inputs must be real numbers, got dtype {x.dtype}")
        if x.ndim != self._ndim or x.shape[1:] != self.shape or x.shape[0] < 1:
            raise InvalidRequest(
                f"inputs must have shape (N, {', '.join(map(str, self.shape))}) with N >= 1, got {tuple(x.shape)}"
            )
        if kind == "f" and not np.isfinite(x).all():
            bad = np.argwhere(~np.isfinite(x))[0]
            raise InvalidRequest(f"inputs must be finite; input {bad[0]} holds {x[tuple(bad)]} at {tuple(bad[1:])}")
        if self.raw_range is not None:
            lo, hi = self.raw_range
            fits = kind == "u" and lo <= 0 and 2 ** (8 * x.dtype.itemsize) - 1 <= hi  # e.g. uint8 in [0, 255]
            if not fits and (x.min() < lo or x.max() > hi):
                raise InvalidRequest(
                    f"inputs must be raw values in [{lo:g}, {hi:g}] (found {x.min():g}..{x.max():g}); "
                    "send unnormalized values: the runtime applies the manifest's normalization"
                )
            if self._table is not None and kind in "iu" and x.size <= _TABLE_MAX:  # whole numbers in 0..255
                if self._one_table is not None:
                    return self._one_table.take(x)
                return self._table[self._channel, x]
        with np.errstate(over="ignore"):  # values beyond float32 become inf, and are refused below
            out = x.astype(np.float32)  # a copy, normalized in place: the same float32 steps as the formula
            out *= self._scale
            out -= self._mean
            out /= self._std
        if self.raw_range is None and not (top := float(np.abs(out).max())) <= MAX_STANDARD_SCORE:  # NaN fails too
            bad = np.unravel_index(int(np.nanargmax(np.where(np.isfinite(out), np.abs(out), np.inf))), out.shape)
            raise InvalidRequest(
                f"inputs must lie within {MAX_STANDARD_SCORE:g} standard deviations of the training data's mean; "
                f"input {bad[0]} is {top:.3g} away at {tuple(int(i) for i in bad[1:])} (the value {x[bad].item()!r})"
            )
        return out


def as_array(x_raw: Any) -> np.ndarray:
    """Nested lists of numbers (a JSON body) as one array; InvalidRequest when they are ragged."""
    try:
        return np.asarray(x_raw)
    except (ValueError, TypeError, OverflowError) as e:  # ragged nesting, integers beyond 64 bits
        raise InvalidRequest(f"inputs must be a rectangular array of numbers: {str(e)[:200]}") from None
