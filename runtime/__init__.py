"""Loads and verifies bundles, plans and runs budgeted predictions. Knows nothing of HTTP."""

from __future__ import annotations

from quorum.runtime.engine import Engine
from quorum.runtime.errors import BundleError, InvalidRequest, NoModulesAvailable, QuorumError
from quorum.runtime.manifest import Manifest
from quorum.runtime.options import PredictOptions
from quorum.runtime.results import FailedModule, Prediction, SpecialistAnswer
from quorum.runtime.stats import ModuleState

__all__ = [
    "BundleError",
    "Engine",
    "FailedModule",
    "InvalidRequest",
    "Manifest",
    "ModuleState",
    "NoModulesAvailable",
    "PredictOptions",
    "Prediction",
    "QuorumError",
    "SpecialistAnswer",
]
