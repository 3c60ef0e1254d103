"""Selection on the validation split: which modules to run first."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["ANYTIME_CRITERION", "anytime_order"]

ANYTIME_CRITERION = "modules sorted by validation error, ascending (ties by id)"


def anytime_order(module_val_errors: Sequence[float]) -> list[int]:
    """Module ids ordered so that each prefix holds the individually strongest modules."""
    return sorted(range(len(module_val_errors)), key=lambda j: (module_val_errors[j], j))
