"""Mixed-precision weight allocation: measure each layer's sensitivity to each candidate format, solve the integer
program (``bitfold.quant.allocate``) under an average bits-per-weight budget, and write the result as an editable
recipe (one ``quantize-weights`` step per format, each excluding the layers assigned elsewhere).

Sensitivity of (layer l, format f): the relative L2 error of the graph outputs on calibration samples when only
layer l is quantized to f (RTN, fake-quantized), so L · F quantize-and-run rounds. Cost: the layer's weight count
times the format's bits per weight including its fp32 scales (``FORMATS``).
"""

from __future__ import annotations

import dataclasses
import glob

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from bitfold.backends.ort import OrtRunnable
from bitfold.errors import BitfoldError
from bitfold.passes.quant.quantize_weights import QuantizeWeights
from bitfold.pipeline import Recipe, optimize
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

    def recipe(self) -> Recipe:
        """One fake-quantized ``quantize-weights`` step per format used, excluding every other layer."""
        steps = []
        for f, name in enumerate(self.formats):
            others = [glob.escape(layer) for layer, c in zip(self.layers, self.choice, strict=True) if c != f]
            if len(others) < len(self.layers):
                steps.append({"name": "quantize-weights", "method": "rtn", "format": "fake", **FORMATS[name][0], "exclude": others})
        return Recipe.from_list(steps)


def _error(model: ir.Model, feeds: list[dict], reference: list[np.ndarray]) -> float:
    runner = OrtRunnable(model, device="cpu", optimization="basic")
    got = [np.concatenate([v.ravel() for v in runner.run(f).values()]) for f in feeds]
    num = sum(float(np.sum((g - r) ** 2)) for g, r in zip(got, reference, strict=True))
    return float(np.sqrt(num / sum(float(np.sum(r**2)) for r in reference)))


def measure(model: ir.Model, calibration: CalibrationData, formats: list[str], samples: int = 4) -> Allocation:
    """Sensitivity and cost of every (layer, format) pair; the choice is left empty."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise BitfoldError(f"unknown format '{unknown[0]}'; choose from {', '.join(FORMATS)}.")
    nodes = QuantizeWeights().collect(model)
    if not nodes:
        raise BitfoldError("the model has no MatMul with a constant weight to allocate bits to; run fold-constants first.")
    feeds = list(calibration)[:samples]
    base = OrtRunnable(model, device="cpu", optimization="basic")
    reference = [np.concatenate([v.ravel() for v in base.run(f).values()]) for f in feeds]
    layers = [n.name for n in nodes]
    shapes = [n.inputs[1].const_value.shape for n in nodes]
    weights = np.array([k * n for k, n in shapes], np.float64)
    sensitivity = np.zeros((len(layers), len(formats)))
    cost = np.array([[w * FORMATS[f][1](k) for f in formats] for w, (k, _) in zip(weights, shapes, strict=True)])
    with tqdm(total=len(layers) * len(formats), desc="sensitivity", leave=False) as bar:
        for i, layer in enumerate(layers):
            others = [glob.escape(x) for x in layers if x != layer]
            for j, f in enumerate(formats):
                step = {"name": "quantize-weights", "method": "rtn", "format": "fake", **FORMATS[f][0], "exclude": others}
                quantized, _ = optimize(ir.from_proto(ir.to_proto(model)), [step])
                sensitivity[i, j] = _error(quantized, feeds, reference)
                bar.update()
    return Allocation(layers, list(formats), sensitivity, cost, weights, np.zeros(len(layers), int))


def solve(allocation: Allocation, bits_per_weight: float) -> Allocation:
    """The allocation minimising total sensitivity at ``bits_per_weight`` on average (scales included)."""
    try:
        choice = allocate(allocation.sensitivity, allocation.cost, bits_per_weight * allocation.weights.sum())
    except ValueError as e:
        raise BitfoldError(f"{e}.") from None
    return dataclasses.replace(allocation, choice=choice)
