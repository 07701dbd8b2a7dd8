"""PyTorch → onnx-ir through ``torch.onnx.export(..., dynamo=True)``.

The exporter's own graph optimizer is off by default: bitfold's canonical passes do that work where the pipeline
can time, count and verify it (for instance BatchNorm folding, which the exporter would otherwise do silently).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import onnx_ir as ir

from bitfold.errors import ExportError


def from_torch(
    module: Any,
    example_inputs: Sequence[Any] | Any,
    dynamic_shapes: Mapping[str, Any] | Sequence[Any] | None = None,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    optimize: bool = False,
    opset: int | None = None,
) -> ir.Model:
    """Export a ``torch.nn.Module`` in eval mode to an onnx-ir model.

    ``example_inputs`` is a tensor or a tuple of tensors, passed positionally to ``forward``. ``dynamic_shapes``
    follows ``torch.export``: e.g. ``{"x": {0: "batch"}}`` keyed by forward's parameter names.
    ``optimize=True`` lets the exporter run onnxscript's optimizer as well.
    """
    import torch

    if not isinstance(module, torch.nn.Module):
        raise ExportError(f"from_torch expects a torch.nn.Module, got {type(module).__name__}; pass the model object.")
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    module = module.eval()
    quiet = io.StringIO()
    torch_logger = logging.getLogger("torch")
    level = torch_logger.level
    torch_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                tuple(example_inputs),
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                input_names=list(input_names) if input_names else None,
                output_names=list(output_names) if output_names else None,
                optimize=optimize,
                opset_version=opset,
                verbose=False,
            )
    except Exception as e:  # the exporter raises many unrelated types
        raise ExportError(
            f"torch.onnx.export failed for {type(module).__name__}: {str(e).strip().splitlines()[0]}"
        ) from e
    finally:
        torch_logger.setLevel(level)
    model = program.model
    model.producer_name = "bitfold"
    return model
