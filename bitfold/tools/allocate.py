"""Mixed-precision weight allocation: measure each layer's sensitivity to each candidate format, solve the integer
program (``bitfold.quant.allocate``) under an average bits-per-weight budget, and write the result as an editable
recipe (one ``quantize-weights`` step per format, each excluding the layers assigned elsewhere).

Sensitivity of (layer l, format f): the squared relative L2 error (noise-to-signal power) of the graph outputs on
calibration samples when only layer l is quantized to f, with the quantizer the recipe will use (RTN, or GPTQ on
the calibration Gram matrices). Independent rounding noise adds in power, so the
summed sensitivities the integer program minimises estimate the mixed model's output noise. The L · F rounds share
one ONNX Runtime session: the candidate weights are graph inputs that default to their initializers, and a round
feeds the one weight it quantizes. Cost: the layer's weight count times the format's bits per weight including
its fp32 scales (``FORMATS``).
"""

from __future__ import annotations

import dataclasses
import glob
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from bitfold.backends.ort import OrtRunnable
from bitfold.errors import BitfoldError
from bitfold.passes.quant.quantize_weights import QuantizeWeights
from bitfold.pipeline import Recipe
from bitfold.quant.allocate import allocate
from bitfold.quant.calibration import CalibrationData

#: name → (quantize-weights parameters, bits per weight including scales for K inputs)
FORMATS = {
    "int8": ({"bits": 8, "group_size": -1, "symmetric": True}, lambda k: 8 + 32 / k),
    "int4": ({"bits": 4, "group_size": 128, "symmetric": True}, lambda k: 4 + 32 / 128),
    "int3": ({"bits": 3, "group_size": 128, "symmetric": True}, lambda k: 3 + 32 / 128),
    "int2": ({"bits": 2, "group_size": 128, "symmetric": False}, lambda k: 2 + 34 / 128),
}


@dataclasses.dataclass
class Allocation:
    """Layers (node names), candidate formats, the measured sensitivity and cost (L, F), and the choice (L,)."""

    layers: list[str]
    formats: list[str]
    sensitivity: np.ndarray
    cost: np.ndarray
    weights: np.ndarray
    choice: np.ndarray

    @property
    def bits_per_weight(self) -> float:
        return float(self.cost[np.arange(len(self.layers)), self.choice].sum() / self.weights.sum())

    def recipe(self, **params) -> Recipe:
        """One ``quantize-weights`` step per format used, excluding every other layer; ``params`` (method, format,
        clip, ...) apply to every step (default: RTN, fake-quantized)."""
        steps = []
        for f, name in enumerate(self.formats):
            others = [glob.escape(layer) for layer, c in zip(self.layers, self.choice, strict=True) if c != f]
            if len(others) < len(self.layers):
                step = {"name": "quantize-weights", "method": "rtn", "format": "fake", **params, **FORMATS[name][0]}
                steps.append({**step, "exclude": list(params.get("exclude", [])) + others})
        return Recipe.from_list(steps)


def _power(outputs: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """Squared relative L2 error of the concatenated outputs over all samples."""
    num = sum(float(np.sum((o - r) ** 2)) for o, r in zip(outputs, reference, strict=True))
    return num / sum(float(np.sum(r**2)) for r in reference)


def measure(
    model: ir.Model,
    calibration: CalibrationData,
    formats: list[str],
    samples: int = 4,
    exclude: Sequence[str] = (),
    params: Mapping[str, Any] | None = None,
) -> Allocation:
    """Sensitivity and cost of every (layer, format) pair over the first ``samples`` calibration feeds; layers
    matching ``exclude`` (globs, as quantize-weights takes them) stay out. ``params`` are the quantize-weights
    settings the recipe will use (default RTN): a layer is quantized for its sensitivity as that method would do
    it, GPTQ and output clipping on the Gram matrices of all calibration samples. The choice is left empty."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise BitfoldError(f"unknown format '{unknown[0]}'; choose from {', '.join(FORMATS)}.")
    nodes = QuantizeWeights(exclude=tuple(exclude)).collect(model)
    if not nodes:
        raise BitfoldError("the model has no MatMul with a constant weight to allocate bits to; run fold-constants first.")
    probe = ir.from_proto(ir.to_proto(model))
    position = {id(node): i for i, node in enumerate(model.graph)}
    targets = [list(probe.graph)[position[id(n)]] for n in nodes]
    for weight in dict.fromkeys(node.inputs[1] for node in targets):
        probe.graph.inputs.append(weight)  # overridable: an initializer that is also a graph input
    session = OrtRunnable(probe, device="cpu", optimization="basic").session
    feeds = [dict(f) for f in list(calibration)[:samples]]

    def outputs(override: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [np.concatenate([v.ravel() for v in session.run(None, {**f, **override})]).astype(np.float64) for f in feeds]

    reference = outputs({})
    layers = [n.name for n in nodes]
    shapes = [n.inputs[1].const_value.shape for n in nodes]
    weights = np.array([k * n for k, n in shapes], np.float64)
    sensitivity = np.zeros((len(layers), len(formats)))
    cost = np.array([[w * FORMATS[f][1](k) for f in formats] for w, (k, _) in zip(weights, shapes, strict=True)])
    settings = {k: v for k, v in (params or {}).items() if k not in ("name", "exclude", "format")}
    if settings.get("method") == "awq":
        raise BitfoldError("allocate-bits measures layers one at a time; AWQ rescales shared inputs, so measure with rtn or gptq.")
    quantizers = [QuantizeWeights(**{**settings, "format": "fake", **FORMATS[f][0]}) for f in formats]
    hessians = {}
    if any(q.needs_calibration for q in quantizers):
        inputs = sorted({n.inputs[0].name for n in nodes})
        stats = calibration.collect(model, inputs, gram=inputs, sink_weight=quantizers[0].config.sink_weight)
        hessians = {name: s.gram for name, s in stats.items()}
    with tqdm(total=len(layers) * len(formats), desc="sensitivity", leave=False) as bar:
        for i, node in enumerate(nodes):
            w = node.inputs[1].const_value.numpy()
            for j, quantizer in enumerate(quantizers):
                q = quantizer.solve(w.astype(np.float32).T, hessians.get(node.inputs[0].name))[0].T.astype(w.dtype)
                sensitivity[i, j] = _power(outputs({node.inputs[1].name: np.ascontiguousarray(q)}), reference)
                bar.update()
    return Allocation(layers, list(formats), sensitivity, cost, weights, np.zeros(len(layers), int))


def solve(allocation: Allocation, bits_per_weight: float) -> Allocation:
    """The allocation minimising total sensitivity at ``bits_per_weight`` on average (scales included)."""
    try:
        choice = allocate(allocation.sensitivity, allocation.cost, bits_per_weight * allocation.weights.sum())
    except ValueError as e:
        raise BitfoldError(f"{e}.") from None
    return dataclasses.replace(allocation, choice=choice)
