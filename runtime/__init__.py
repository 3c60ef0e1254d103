"""Loads and verifies bundles, plans and runs budgeted predictions. Knows nothing of HTTP."""

from __future__ import annotations

from quorum.runtime.engine import Engine, FailedModule, ModuleState, Prediction
from quorum.runtime.errors import BundleError, InvalidRequest, NoModulesAvailable, QuorumError
from quorum.runtime.manifest import Manifest

__all__ = [
    "BundleError",
    "Engine",
    "FailedModule",
    "InvalidRequest",
    "Manifest",
    "ModuleState",
    "NoModulesAvailable",
    "Prediction",
    "QuorumError",
]
