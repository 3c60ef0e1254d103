"""Blocks of contiguous modules: the block of an ensemble that one rank trains, cut from the
whole ensemble's weights, and the whole ensemble joined back from its blocks.

Every registered architecture stores each per-module tensor module-major along its first axis
(M·c rows; module j's are [j·c, (j+1)·c)), so a batched model of modules [a, b) is the same
architecture built with b − a modules, holding rows [a·c, b·c) of each such tensor. A tensor
that does not grow with M (a TreeNet's trunk, a BatchNorm step counter) is shared: every
block holds all of it. `module_rows` tells the two apart from the shapes alone, so that any
architecture of the registry splits without code of its own. Optimizer state (SGD momentum)
is per parameter, so it splits and joins with the parameters.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from quorum.trainer.errors import ConfigError

__all__ = [
    "Rows",
    "block_bounds",
    "block_of",
    "join_optimizer_states",
    "join_states",
    "module_rows",
    "slice_optimizer_state",
    "slice_state",
]

Rows = dict[str, int | None]  # per state-dict entry: rows of one module along axis 0, or None (shared)
State = dict[str, torch.Tensor]


def block_bounds(num_modules: int, world_size: int) -> list[tuple[int, int]]:
    """Modules [start, stop) of each rank: contiguous, in rank order; the first M mod W ranks hold one more."""
    if not 1 <= world_size <= num_modules:
        raise ConfigError(
            f"{world_size} processes cannot split {num_modules} modules (each process trains at least one): "
            f"start at most {num_modules} processes, or train more --modules"
        )
    base, extra = divmod(num_modules, world_size)
    bounds, start = [], 0
    for rank in range(world_size):
        stop = start + base + (rank < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def module_rows(build: Callable[[int], nn.Module]) -> Rows:
    """Which state entries of the architecture `build(num_modules)` are per module, and their rows per module.

    Built with 1 and 2 modules on the meta device (no memory, no init cost): an entry whose
    first axis doubles is per module; one whose shape does not change is shared.
    """
    with torch.device("meta"):
        one, two = build(1).state_dict(), build(2).state_dict()
    rows: Rows = {}
    for name, a in one.items():
        b = two[name]
        if a.shape == b.shape:
            rows[name] = None
            continue
        if a.dim() == 0 or b.shape[1:] != a.shape[1:] or b.shape[0] != 2 * a.shape[0]:
            raise AssertionError(f"{name}: {tuple(a.shape)} at M=1, {tuple(b.shape)} at M=2 is not module-major")
        rows[name] = a.shape[0]
    return rows


def _cut(t: torch.Tensor, rows: int | None, start: int, stop: int) -> torch.Tensor:
    # clone: the block must not keep the whole ensemble's storage alive
    return (t if rows is None else t[start * rows : stop * rows]).detach().clone()


def slice_state(state: State, rows: Rows, start: int, stop: int) -> State:
    """The state of modules [start, stop) from the whole ensemble's `state` (copies)."""
    return {name: _cut(t, rows[name], start, stop) for name, t in state.items()}


def join_states(states: Sequence[State], rows: Rows) -> State:
    """The whole ensemble's state from its blocks' states, in module order; shared entries from the first."""
    return {
        name: states[0][name] if r is None else torch.cat([s[name] for s in states])
        for name, r in rows.items()
        if name in states[0]
    }


def block_of(full: nn.Module, build: Callable[[int], nn.Module], rows: Rows, start: int, stop: int) -> nn.Module:
    """A batched model of modules [start, stop) of `full`, holding their weights (copied)."""
    block = build(stop - start)
    block.load_state_dict(slice_state(full.state_dict(), rows, start, stop))
    return block


def _per_param(opt_state: dict[str, Any], names: Sequence[str], rows: Rows, fn: Callable[..., Any]) -> dict[int, Any]:
    """Apply fn(index, key, row count) to each tensor of an optimizer state that has the parameter's shape."""
    out: dict[int, Any] = {}
    for i, entry in opt_state["state"].items():
        r = rows[names[i]]
        out[i] = {k: fn(i, k, r) if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in entry.items()}
    return out


def slice_optimizer_state(
    opt_state: dict[str, Any], names: Sequence[str], rows: Rows, start: int, stop: int
) -> dict[str, Any]:
    """The optimizer state of modules [start, stop) from the whole ensemble's `opt_state`.

    Args:
        opt_state: `optimizer.state_dict()` of an optimizer over the whole ensemble's parameters.
        names: the parameter names in the optimizer's order (`model.named_parameters()`).
        rows: `module_rows` of the architecture.
    """
    state = _per_param(opt_state, names, rows, lambda i, k, r: _cut(opt_state["state"][i][k], r, start, stop))
    return {"state": state, "param_groups": copy.deepcopy(opt_state["param_groups"])}


def join_optimizer_states(states: Sequence[dict[str, Any]], names: Sequence[str], rows: Rows) -> dict[str, Any]:
    """The whole ensemble's optimizer state from its blocks' states, in module order."""

    def join(i: int, k: str, r: int | None) -> torch.Tensor:
        parts = [s["state"][i][k] for s in states]
        return parts[0] if r is None else torch.cat(parts)

    return {"state": _per_param(states[0], names, rows, join), "param_groups": copy.deepcopy(states[0]["param_groups"])}
