"""Per-module ONNX graphs from torch modules, written fast.

The modules of one ensemble share one architecture, so their graphs differ only in their
initializers. We export module 0 once with torch's exporter (a few seconds), then write
every module's weights into a copy of that template (milliseconds each); where the exporter
folded parameters into other constants, each module is exported on its own. Every graph is
then checked on its own: `onnx.checker`, and parity against torch on real inputs.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from collections.abc import Iterator

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from quorum.exporter.errors import ExportError
from quorum.exporter.graphs import INPUT_NAME, OPSET, OUTPUT_NAME

__all__ = ["export_graph", "export_template", "with_weights"]


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """torch.onnx prints progress and its passes log at INFO; keep the CLI's output readable."""
    loggers = [logging.getLogger(n) for n in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export")]
    levels = [lg.level for lg in loggers]
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            for lg in loggers:
                lg.setLevel(logging.WARNING)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export_graph(module: nn.Module, example: torch.Tensor, output_name: str = OUTPUT_NAME) -> onnx.ModelProto:
    """Export one standalone module with a dynamic batch axis: (N, *in) -> (N, …)."""
    module = module.eval()
    batch = torch.export.Dim("batch", min=1)
    with _quiet_exporter():
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[output_name],
            dynamic_shapes=({0: batch},),
            opset_version=OPSET,
            optimize=True,
            verbose=False,
        )
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    proto: onnx.ModelProto = program.model_proto
    return proto


SMALL_CONSTANT = 64  # elements: an initializer this small that is no parameter is a shape or an axis


def export_template(module: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    """Export one module as the template of all: every parameter an initializer of its own name
    and shape, which `with_weights` replaces. ExportError when the exporter folded a parameter
    into another constant: such an architecture is exported module by module."""
    proto = export_graph(module, example)
    params = module.state_dict()
    names = {init.name: tuple(init.dims) for init in proto.graph.initializer}
    for name, value in params.items():
        if names.get(name) != tuple(value.shape):
            raise ExportError(f"parameter {name!r} is not an initializer of the exported graph")
    for init in proto.graph.initializer:
        if init.name not in params and np.prod(init.dims) > SMALL_CONSTANT:
            raise ExportError(f"initializer {init.name!r} {tuple(init.dims)} of the exported graph is no parameter")
    return proto


def with_weights(template: onnx.ModelProto, module: nn.Module, doc: str) -> onnx.ModelProto:
    """A copy of `template` carrying `module`'s weights."""
    params = module.state_dict()
    proto = copy.deepcopy(template)
    for i, init in enumerate(proto.graph.initializer):
        if init.name not in params:
            continue  # a shape or an axis, the same in every module
        array = params[init.name].detach().cpu().numpy()
        proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), init.name))
    proto.doc_string = doc
    return proto
