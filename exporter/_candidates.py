"""Scoring many candidate sub-ensembles side by side, the machinery of `selection` and `specialists`.

Every module's logits (N, M, K) become slabs (M, K, N): a chunk of candidates is a slice, and a
reduction over the K classes is elementwise work over K rows of N. Chunks small enough to stay
in cache are scored on one worker thread per torch thread, each running torch on one thread.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch

__all__ = ["ArrayLike", "as_slabs", "check", "flush_subnormals", "over_chunks", "scratch", "side_by_side", "threads"]

ArrayLike = np.ndarray | torch.Tensor


def check(logits: ArrayLike, y: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, M, K) as float32 and labels (N,) as int64; ValueError for other shapes."""
    logits = torch.as_tensor(logits, dtype=torch.float32)
    y = torch.as_tensor(y).long()
    if logits.ndim != 3 or tuple(y.shape) != (logits.shape[0],):
        raise ValueError(f"need logits (N, M, K) and labels (N,), got {tuple(logits.shape)} and {tuple(y.shape)}")
    return logits, y


def as_slabs(logits: torch.Tensor) -> torch.Tensor:
    """(N, M, K) -> (M, K, N): each module one contiguous slab, so that a chunk of candidates is a
    slice and a reduction over K is elementwise work over K rows of N."""
    return logits.permute(1, 2, 0).contiguous()


_local = threading.local()


def scratch(shape: tuple[int, ...]) -> torch.Tensor:
    """This thread's float32 scratch tensor of `shape`, reused: a fresh allocation of a few MB faults its
    pages in again on every call, which costs as much as the arithmetic."""
    numel = math.prod(shape)
    buf = getattr(_local, "scratch", None)
    if buf is None or buf.numel() < numel:
        buf = _local.scratch = torch.empty(numel)
    return buf[:numel].view(shape)


@contextmanager
def flush_subnormals() -> Iterator[None]:
    """Subnormal floats read and written as zero on this thread while it lasts (where the CPU can): exp of
    arguments far below the largest is several times slower where its results are subnormal."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def _worker() -> None:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # the thread ends with the pool


@contextmanager
def threads() -> Iterator[Executor | None]:
    """One worker thread per torch thread, each running torch on one thread with subnormals flushed to zero,
    for scoring chunks of candidates side by side: many small ops, and no barrier between threads after each
    (None: one thread, the caller's, flushing subnormals while it lasts)."""
    n = torch.get_num_threads()
    if n == 1:
        with flush_subnormals():
            yield None
        return
    with ThreadPoolExecutor(n, initializer=_worker) as workers:
        yield workers


@contextmanager
def side_by_side() -> Iterator[Executor]:
    """A one-thread executor for a second selection to run beside the calling thread's, each with half of
    torch's threads while it lasts: on 2 cores, two selections on one thread each finish sooner than one
    after the other on two (docs/RESULTS.md, "Choosing the anytime order and the specialists")."""
    n = torch.get_num_threads()
    half = max(1, n // 2)
    torch.set_num_threads(half)
    try:
        with ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(half,)) as side:
            yield side
    finally:
        torch.set_num_threads(n)


def over_chunks(
    score: Callable[[slice], torch.Tensor], count: int, per_chunk: int, workers: Executor | None
) -> torch.Tensor:
    """score(part) for consecutive parts of `per_chunk` of `count` candidates, concatenated in order."""
    parts = [slice(a, min(a + per_chunk, count)) for a in range(0, count, per_chunk)]
    return torch.cat(list(workers.map(score, parts) if workers is not None else map(score, parts)))
