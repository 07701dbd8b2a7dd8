"""Frontends: ONNX files and PyTorch modules in, onnx-ir models out."""

from bitfold.frontend.onnx_io import clone, load, parameter_bytes, save
from bitfold.frontend.torch_export import from_torch

__all__ = ["clone", "from_torch", "load", "parameter_bytes", "save"]
