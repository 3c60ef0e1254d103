"""Loads and verifies bundles, plans and runs budgeted predictions. Knows nothing of HTTP.

The names below are imported on first use: a process that plans and combines without running
modules (a gateway over shards) uses the manifest, planning, heads and results without loading
ONNX Runtime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from quorum.runtime.engine import Engine
    from quorum.runtime.errors import BundleError, InvalidRequest, NoModulesAvailable, QuorumError
    from quorum.runtime.manifest import Manifest
    from quorum.runtime.options import PredictOptions
    from quorum.runtime.results import FailedModule, Partial, Prediction, SpecialistAnswer
    from quorum.runtime.stats import ModuleState

__all__ = [
    "BundleError",
    "Engine",
    "FailedModule",
    "InvalidRequest",
    "Manifest",
    "ModuleState",
    "NoModulesAvailable",
    "Partial",
    "PredictOptions",
    "Prediction",
    "QuorumError",
    "SpecialistAnswer",
]

_WHERE = {
    "Engine": "engine",
    "BundleError": "errors",
    "InvalidRequest": "errors",
    "NoModulesAvailable": "errors",
    "QuorumError": "errors",
    "Manifest": "manifest",
    "PredictOptions": "options",
    "FailedModule": "results",
    "Partial": "results",
    "Prediction": "results",
    "SpecialistAnswer": "results",
    "ModuleState": "stats",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'quorum.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(f"quorum.runtime.{_WHERE[name]}"), name)
