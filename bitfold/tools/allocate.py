"""Mixed-precision weight allocation: measure each layer's sensitivity to each candidate format, solve the integer
program (``bitfold.quant.allocate``) under an average bits-per-weight budget, and write the result as an editable
recipe (one step per format, each excluding the layers assigned elsewhere).

Sensitivity of (layer l, format f): the squared relative L2 error (noise-to-signal power) of the graph outputs on
calibration samples when only layer l is quantized to f, with the quantizer the recipe will use (RTN, or GPTQ on
the calibration Gram matrices). Independent rounding noise adds in power, so the
summed sensitivities the integer program minimises estimate the mixed model's output noise. The L · F rounds share
one ONNX Runtime session: the candidate weights are graph inputs that default to their initializers, and a round
feeds the one weight it quantizes. For a model exported from torch, :func:`hawq` scores instead by HAWQ-V2's
Hessian-trace estimate (no ONNX runs: one Hutchinson pass over the torch model). Cost: the layer's weight count times the format's bits per weight including
its scales: by formula for the integer formats, as the emitted op stores it (codes, scales, side tensors) for the
multiplication-less ones.

Candidate formats (``FORMATS``) are pass steps: ``int8``/``int4``/``int3``/``int2`` (quantize-weights), ``shift4``
(power-of-two weights, 4-bit sign + exponent code), ``bcq3``/``bcq2`` (ShiftAddLLM binary coding, q planes,
groups of 128), ``binary`` (one sign plane, α per output) and ``2:4-int4`` (SparseGPT 2:4 with int4 g128 kept
weights; costed as a packed 2:4 int4 layout stores it, 2 × (4-bit code + 2-bit position) per 4 weights plus one
fp32 scale per 128 inputs, although the recipe writes the weight back dense). The recipe's method carries over:
``gptq`` turns on each pass's GPTQ rounding, ``rtn`` turns it off (SparseGPT always uses the Hessian).

``method = "reconstruct"`` measures each layer with the weight that block reconstruction learns for it (every
format's grid learned once over the whole model: the same blocks, the same calibration), and writes one
``reconstruct`` step per format used, each excluding the layers assigned elsewhere, run in the order of the
formats (fake-quantized: a later step's blocks hold the earlier steps' layers as float weights). A later step learns
with the earlier steps' layers already quantized in both its inputs and its targets, so the deployed weights
approximate, not repeat, the measured ones. ``2:4-int4`` has no reconstruct grid.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import onnx
import onnx_ir as ir
import torch
from tqdm.auto import tqdm

from bitfold import parallel, runtime
from bitfold.frontend.onnx_io import clone
from bitfold.errors import BitfoldError
from bitfold.passes.quant.quantize_weights import QuantizeWeights
from bitfold.passes.registry import BitfoldPass, create, get_pass
from bitfold.pipeline import Recipe
from bitfold.quant.allocate import allocate
from bitfold.quant.calibration import CalibrationData
from bitfold.quant.hutchinson import hessian_traces, output_traces



@dataclasses.dataclass(frozen=True)
class Candidate:
    """A candidate format: the pass step that produces it and its bits per weight for K inputs (None: as the
    pass's op stores it, measured per layer)."""

    step: Mapping[str, Any]
    bits: Callable[[int], float] | None = None
    learned: Mapping[str, Any] | None = None  # the reconstruct pass's grid for this format (None: it has none)


FORMATS = {
    "int8": Candidate({"name": "quantize-weights", "bits": 8, "group_size": -1, "symmetric": True}, lambda k: 8 + 32 / k,
                      {"grid": "int", "bits": 8, "group_size": -1, "symmetric": True}),
    "int4": Candidate({"name": "quantize-weights", "bits": 4, "group_size": 128, "symmetric": True}, lambda k: 4 + 32 / 128,
                      {"grid": "int", "bits": 4, "group_size": 128, "symmetric": True}),
    "int3": Candidate({"name": "quantize-weights", "bits": 3, "group_size": 128, "symmetric": True}, lambda k: 3 + 32 / 128,
                      {"grid": "int", "bits": 3, "group_size": 128, "symmetric": True}),
    "int2": Candidate({"name": "quantize-weights", "bits": 2, "group_size": 128, "symmetric": False}, lambda k: 2 + 34 / 128,
                      {"grid": "int", "bits": 2, "group_size": 128, "symmetric": False}),
    "shift4": Candidate({"name": "shift", "bits": 4}, None, {"grid": "shift", "bits": 4}),
    "bcq3": Candidate({"name": "shiftadd", "q": 3, "group_size": 128}, None, {"grid": "bcq", "bits": 3, "group_size": 128}),
    "bcq2": Candidate({"name": "shiftadd", "q": 2, "group_size": 128}, None, {"grid": "bcq", "bits": 2, "group_size": 128}),
    "binary": Candidate({"name": "binarize"}, None, {"grid": "binary"}),
    "2:4-int4": Candidate({"name": "prune", "method": "sparsegpt", "pattern": "nm:2:4", "bits": 4, "group_size": 128},
                          lambda k: (4 + 2) / 2 + 32 / 128),
}


def candidate(name: str, deploy: str = "fake") -> Candidate:
    """Format ``name`` as a recipe writing ``deploy`` (quantize-weights' ``format``) stores it. MatMulNBits holds
    whole blocks of a power of two along K (K = 576 with groups of 128 stores 640 codes per row), 3-bit codes in
    4-bit storage and zero points packed per row: its integer formats cost exactly those bytes, and per-channel int8
    becomes groups of 128."""
    found = FORMATS[name]
    step = found.step
    if deploy != "matmulnbits" or step["name"] != "quantize-weights":
        return found
    group = 128 if step["group_size"] == -1 else step["group_size"]
    storage = 4 if step["bits"] == 3 else step["bits"]
    symmetric = step["symmetric"]

    def stored(k: int) -> float:  # codes, fp32 scales and packed zero points of one row, per weight
        blocks = -(-k // group)
        zero_points = 0 if symmetric else -(-blocks * storage // 8) * 8
        return (blocks * (group * storage + 32) + zero_points) / k

    learned = {**found.learned, "group_size": group} if found.learned else None
    return Candidate({**step, "group_size": group}, stored, learned)


def step_for(candidate: Candidate, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The candidate's step with the recipe's settings that its pass takes: ``method`` becomes the ``gptq`` switch
    of passes that have one, ``format`` applies to quantize-weights only; weight passes keep no layers back by
    position (``keep_ends`` off). ``method = "reconstruct"``: the ``reconstruct`` pass on the candidate's grid, with
    the settings it takes (its schedule, ``format``)."""
    if settings.get("method") == "reconstruct":
        if candidate.learned is None:
            raise BitfoldError(f"format '{_name_of(candidate)}' has no reconstruct grid; leave it out or measure with rtn or gptq.")
        fields = {f.name for f in dataclasses.fields(get_pass("reconstruct").Config)}
        return {"name": "reconstruct", **candidate.learned, **{k: v for k, v in settings.items() if k in fields and k not in candidate.learned}}
    fields = {f.name for f in dataclasses.fields(get_pass(candidate.step["name"]).Config)}
    own_format = candidate.step["name"] == "quantize-weights"  # the other passes name their emissions differently
    step = {k: v for k, v in settings.items() if k in fields and k not in candidate.step and (k != "format" or own_format)}
    if "gptq" in fields and "method" in settings:
        step["gptq"] = settings["method"] == "gptq"
    if "keep_ends" in fields:
        step["keep_ends"] = False
    return {**candidate.step, **step}


@dataclasses.dataclass
class Allocation:
    """Layers (node names), candidate formats, the measured sensitivity and cost (L, F), and the choice (L,)."""

    layers: list[str]
    formats: list[str]
    sensitivity: np.ndarray
    cost: np.ndarray
    weights: np.ndarray
    choice: np.ndarray
    outside: list[str] = dataclasses.field(default_factory=list)  # other weight-bearing nodes, never touched
    format: str = "fake"  # how the recipe stores the integer formats (quantize-weights' format); costs follow it

    @property
    def bits_per_weight(self) -> float:
        return float(self.cost[np.arange(len(self.layers)), self.choice].sum() / self.weights.sum())

    def recipe(self, **params) -> Recipe:
        """One step per format used, excluding every other layer (and every weight outside the allocation);
        ``params`` (method, clip, ...) apply to every step whose pass takes them (default: RTN; integer formats
        stored as measured: fake-quantized unless ``measure`` was given a ``format``)."""
        if params.get("format", self.format) != self.format:
            raise BitfoldError(f"the allocation was measured for format '{self.format}'; measure again with format "
                               f"'{params['format']}' (its costs differ).")  # fmt: skip
        steps = []
        settings = {"method": "rtn", **params, "format": self.format}
        for f, name in enumerate(self.formats):
            others = [glob.escape(layer) for layer, c in zip(self.layers, self.choice, strict=True) if c != f]
            if len(others) < len(self.layers):
                step = step_for(candidate(name, self.format), settings)
                exclude = list(params.get("exclude", [])) + others + [glob.escape(x) for x in self.outside]
                steps.append({**step, "exclude": exclude})
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
    it, GPTQ and output clipping on the Gram matrices of all calibration samples. With ``method = "reconstruct"``
    each format's candidate weights are those the ``reconstruct`` pass learns with the whole model on that format
    (one run per format, ``params`` its schedule), so the allocation weighs the formats at their best; layers outside
    every block (an LM head) join ``outside``. ``params["format"]`` is how the recipe will store the integer formats
    (``fake`` by default; ``matmulnbits`` holds per-channel int8 in groups of 128, which that op can store, and costs
    it so). The choice is left empty."""
    nodes, outside = _layers(model, formats, exclude)
    deploy = (params or {}).get("format", "fake")
    if deploy not in ("fake", "qdq", "matmulnbits"):
        raise BitfoldError(f"format '{deploy}' is not one quantize-weights writes; use fake, qdq or matmulnbits.")
    settings = {"method": "rtn", **{k: v for k, v in (params or {}).items() if k not in ("name", "exclude", "format")}}
    learned = {}
    if settings["method"] == "reconstruct":
        for name in formats:
            step_for(candidate(name, deploy), settings)  # refuses a format without a grid before anything runs
        learned = _reconstructed(model, calibration, formats, nodes, {**settings, "exclude": tuple(exclude)}, deploy)
        kept = set.intersection(*(set(w) for w in learned.values()))
        outside += [n.name for n in nodes if n.name not in kept]  # outside every block: reconstruct leaves it float
        nodes = [n for n in nodes if n.name in kept]
        if not nodes:
            raise BitfoldError("reconstruct learned no layer of this model (no residual blocks with weights); measure with rtn or gptq.")
    probe = clone(model)
    position = {id(node): i for i, node in enumerate(model.graph)}
    targets = [list(probe.graph)[position[id(n)]] for n in nodes]
    for weight in dict.fromkeys(node.inputs[1] for node in targets):
        probe.graph.inputs.append(weight)  # overridable: an initializer that is also a graph input
    feeds = [dict(f) for f in list(calibration)[:samples]]
    layers = [n.name for n in nodes]
    weights = np.array([np.prod(n.inputs[1].const_value.shape) for n in nodes], np.float64)
    sensitivity, cost = np.zeros((len(layers), len(formats))), np.zeros((len(layers), len(formats)))
    if settings["method"] == "awq":
        raise BitfoldError("allocate-bits measures layers one at a time; AWQ rescales shared inputs, so measure with rtn or gptq.")
    solvers = _solvers(formats, {**settings, "method": "rtn"} if learned else settings, deploy)  # reconstruct: the costs only
    hessians = {}
    if any(s.needs_calibration for s in solvers):
        inputs = sorted({n.inputs[0].name for n in nodes})
        stats = calibration.collect(model, inputs, gram=inputs, sink_weight=settings.get("sink_weight", 1.0))
        hessians = {name: s.gram for name, s in stats.items()}

    def candidates():  # drawn as the executor asks for them: the solves overlap the workers' runs
        for i, node in enumerate(nodes):
            w = node.inputs[1].const_value.numpy()
            found = []
            for j, (name, solver) in enumerate(zip(formats, solvers, strict=True)):
                q, bits = _solve(solver, candidate(name, deploy), node, w.astype(np.float32).T, hessians.get(node.inputs[0].name))
                if learned:
                    q = learned[name][node.name].T
                found.append(np.ascontiguousarray(q.T.astype(w.dtype)))
                cost[i, j] = bits * w.size
            yield node.inputs[1].name, found

    if isinstance(parallel.current(), parallel.Serial):
        shared = (probe, feeds)
    else:  # to other processes as bytes, external data read in (a worker may not see the model's folder)
        for value in probe.graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                value.const_value = ir.Tensor(value.const_value.numpy(), dtype=value.const_value.dtype, name=value.name)
        shared = (ir.to_proto(probe).SerializeToString(), feeds)
    rows = parallel.current().map(_sensitivities, candidates(), setup=_probe_session, shared=shared)
    for i, row in enumerate(tqdm(rows, total=len(layers), desc="sensitivity", leave=False)):
        sensitivity[i] = row
    return Allocation(layers, list(formats), sensitivity, cost, weights, np.zeros(len(layers), int), outside, deploy)


def _probe_session(shared: tuple[ir.Model | bytes, list[dict[str, np.ndarray]]]) -> tuple[Any, list, list[np.ndarray]]:
    """A worker's state: the probe model's session, the feeds and the reference outputs (every weight float)."""
    probe, feeds = shared
    if isinstance(probe, bytes):
        probe = ir.from_proto(onnx.load_from_string(probe))
    session = runtime.session(probe, threads=parallel.worker_threads(), optimization="basic")
    return session, feeds, _outputs(session, feeds, {})


def _outputs(session, feeds: list[dict[str, np.ndarray]], override: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [np.concatenate([v.ravel() for v in session.run(None, {**f, **override})]).astype(np.float64) for f in feeds]


def _sensitivities(state, item: tuple[str, list[np.ndarray]]) -> np.ndarray:
    """One layer's row: the output noise power with its weight replaced by each format's candidate."""
    session, feeds, reference = state
    name, candidates = item
    return np.array([_power(_outputs(session, feeds, {name: q}), reference) for q in candidates])


def hawq(
    model: ir.Model,
    module: torch.nn.Module,
    fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    batches: Sequence[Any],
    formats: list[str],
    exclude: Sequence[str] = (),
    probes: int = 8,
    curvature: Literal["outputs", "loss"] = "outputs",
) -> Allocation:
    """HAWQ-V2 sensitivities for a model exported from ``module``: Tr(H)/n per layer weight times ‖Q(W) - W‖² of
    each format's plain rounding (``bitfold.quant.hutchinson``, ``probes`` Rademacher vectors per batch). With
    ``curvature = "outputs"`` ``fn(module, batch)`` returns the outputs and H is that of their squared distance to
    the unquantized outputs (the quantity ``measure`` scores); with ``"loss"`` ``fn`` returns a scalar task loss.
    Each MatMul weight is matched to the module parameter it equals (a Linear weight, transposed)."""
    nodes, outside = _layers(model, formats, exclude)
    by_value: dict[str, str] = {}
    for name, param in module.named_parameters():
        if param.ndim == 2:
            by_value.setdefault(_digest(param.detach().T.float().numpy()), name)
    matched = {node.name: by_value.get(_digest(node.inputs[1].const_value.numpy().astype(np.float32))) for node in nodes}
    unmatched = [name for name, param in matched.items() if param is None]
    if unmatched:
        raise BitfoldError(f"no parameter of the torch module equals the weight of '{unmatched[0]}'; pass the module the model was exported from.")
    parameters = dict(module.named_parameters())
    estimate = output_traces if curvature == "outputs" else hessian_traces
    traces = estimate(module, fn, batches, {p: parameters[p] for p in dict.fromkeys(matched.values())}, probes=probes)
    negative = {p: t for p, t in traces.items() if t < 0}
    if negative:
        name, value = next(iter(negative.items()))
        raise BitfoldError(f"the loss curves downward at '{name}' (average Hessian diagonal {value:.3g}); give a loss minimised at "
                           "the current weights, or use curvature = \"outputs\".")  # fmt: skip
    solvers = _solvers(formats, {"method": "rtn"})
    needing = [f for f, s in zip(formats, solvers, strict=True) if s.needs_calibration]
    if needing:
        raise BitfoldError(f"format '{needing[0]}' rounds with calibration Hessians; HAWQ-V2 scores plain rounding, so leave it out.")
    sensitivity, cost = np.zeros((len(nodes), len(formats))), np.zeros((len(nodes), len(formats)))
    for i, node in enumerate(tqdm(nodes, desc="hawq", leave=False)):
        wt = node.inputs[1].const_value.numpy().astype(np.float32).T
        for j, (name, solver) in enumerate(zip(formats, solvers, strict=True)):
            q, bits = _solve(solver, FORMATS[name], node, wt, None)
            sensitivity[i, j] = traces[matched[node.name]] * float(np.sum((q.astype(np.float64) - wt) ** 2))
            cost[i, j] = bits * wt.size
    weights = np.array([np.prod(n.inputs[1].const_value.shape) for n in nodes], np.float64)
    return Allocation([n.name for n in nodes], list(formats), sensitivity, cost, weights, np.zeros(len(nodes), int), outside)


def _layers(model: ir.Model, formats: list[str], exclude: Sequence[str]) -> tuple[list[ir.Node], list[str]]:
    """The MatMuls to allocate and the names of every other weight-bearing node (left out of every step)."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise BitfoldError(f"unknown format '{unknown[0]}'; choose from {', '.join(FORMATS)}.")
    nodes = QuantizeWeights(exclude=tuple(exclude)).collect(model)
    if not nodes:
        raise BitfoldError("the model has no MatMul with a constant weight to allocate bits to; run fold-constants first.")
    chosen = {id(n) for n in nodes}
    outside = [n.name for n in model.graph if n.op_type in ("MatMul", "Gemm", "Conv") and id(n) not in chosen
               and len(n.inputs) > 1 and n.inputs[1] is not None and n.inputs[1].const_value is not None]  # fmt: skip
    return nodes, outside


def _solvers(formats: list[str], settings: Mapping[str, Any], deploy: str = "fake") -> list[BitfoldPass]:
    steps = [step_for(candidate(f, deploy), {**settings, "format": "fake"}) for f in formats]
    return [create(step["name"], {k: v for k, v in step.items() if k != "name"}) for step in steps]


def _name_of(candidate: Candidate) -> str:
    return next(name for name, c in FORMATS.items() if c is candidate)


def _reconstructed(model: ir.Model, calibration: CalibrationData, formats: list[str], nodes: list[ir.Node],
                   settings: Mapping[str, Any], deploy: str = "fake") -> dict[str, dict[str, np.ndarray]]:  # fmt: skip
    """Per format, every layer's weight as ``reconstruct`` learns it with the whole model on that format (fake
    quantized, in the graph's layout), keyed by node name; layers outside every block are absent."""
    names = {node.name for node in nodes}
    found = {}
    for name in formats:
        step = step_for(candidate(name, deploy), {**settings, "format": "fake"})
        work = clone(model)
        create("reconstruct", {k: v for k, v in step.items() if k != "name"}, calibration=calibration)(work)
        found[name] = {node.name: node.inputs[1].const_value.numpy() for node in work.graph
                       if node.name in names and node.metadata_props.get("bitfold.quantized", "").startswith("reconstruct-")}  # fmt: skip
    return found


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, np.float32).tobytes()).hexdigest() + str(array.shape)


def _solve(solver: BitfoldPass, candidate: Candidate, node: ir.Node, wt: np.ndarray, hessian: np.ndarray | None) -> tuple[np.ndarray, float]:
    """One layer's Wᵀ (N, K) in the candidate format: the dequantized weight and its bits per weight."""
    if isinstance(solver, QuantizeWeights):
        return solver.solve(wt, hessian)[0], candidate.bits(wt.shape[1])
    encoded = solver.solve_node(node, wt.astype(np.float64), hessian)
    bits = candidate.bits(wt.shape[1]) if candidate.bits else encoded.bits / wt.size
    return np.asarray(encoded.dequantized, np.float32), bits


def solve(allocation: Allocation, bits_per_weight: float) -> Allocation:
    """The allocation minimising total sensitivity at ``bits_per_weight`` on average (scales included)."""
    try:
        choice = allocate(allocation.sensitivity, allocation.cost, bits_per_weight * allocation.weights.sum())
    except ValueError as e:
        raise BitfoldError(f"{e}.") from None
    return dataclasses.replace(allocation, choice=choice)
