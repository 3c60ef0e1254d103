"""Merging the modules of an ensemble into one network of a module's size (the permAVG thesis):
naive weight averaging, weight matching, permAVG (Sinkhorn-learned soft permutations) and
knowledge distillation. Every method takes and gives plain MLP weights (`Layers`)."""

from __future__ import annotations

from quorum.trainer.merge.distill import DistillConfig, distill
from quorum.trainer.merge.layers import Layers, as_module, average, forward, member_layers
from quorum.trainer.merge.matching import match_average, permute, weight_matching
from quorum.trainer.merge.permavg import PermAvg, PermAvgConfig, permavg
from quorum.trainer.merge.sinkhorn import sinkhorn

__all__ = [
    "DistillConfig",
    "Layers",
    "PermAvg",
    "PermAvgConfig",
    "as_module",
    "average",
    "distill",
    "forward",
    "match_average",
    "member_layers",
    "permavg",
    "permute",
    "sinkhorn",
    "weight_matching",
]
