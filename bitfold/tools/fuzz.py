"""Random ONNX graphs for every pass, a checker of each pass's contract on them, and a shrinker for what fails.

**Generator.** :func:`build_graph` turns a stream of small integer choices into a shape-consistent onnx-ir model
over the ops bitfold rewrites: Conv and ConvTranspose (1-D/2-D, groups, dilations, strides, pads),
BatchNormalization, MatMul (weight right or left, or two activations), Gemm (alpha, beta, transA/B, every bias
shape), Add and Mul (constants of every broadcast shape, or two activations), LayerNormalization, RMS norms written
out (Pow or x·x, ReduceMean, Add ε, Sqrt, then Div or Reciprocal·Mul, then γ), Relu, Clip, Sigmoid, Softmax,
Reshape, Transpose, Concat, Split and Gather, plus the motifs passes look for (linear → bias → BatchNormalization,
two MatMuls summed into a BatchNormalization, a pre-norm residual MLP block, gated or not). Weights are shared
between layers, values have several readers, intermediate values become graph outputs; graphs are float32 or
float16, opset 17 to 21, weights in initializers or ``Constant`` nodes, intermediate types annotated or not,
nodes named or not (exporters often leave names empty).
Every dimension is static and tensors stay small (at most :data:`MAX_ELEMENTS` elements), so one graph runs in
milliseconds. Choices shrink toward simple graphs: index 0 is always the plainest option.

:func:`graphs` is the same generator as a hypothesis strategy, so a failing test shrinks to a minimal graph;
:class:`RandomChoices` drives it from a seeded generator without hypothesis (and records the choices), and
:func:`shrink` reduces a recorded choice list that still fails the same way.

**Checker.** :func:`check` runs one :class:`PassCase` (a recipe of one or more steps) through the public
``bitfold.optimize(model, steps, calibration)`` on a copy of the graph, with calibration samples drawn like the
feeds, and classifies the outcome:

- ``decline``: the pipeline raised a :class:`~bitfold.errors.BitfoldError` (a stated refusal, not a bug);
- ``crash``: any other exception, an ``onnx.checker`` failure of the rewritten model, or ONNX Runtime failing to
  load or run it;
- ``contract``: the input model or the feed/calibration arrays changed, the report has no record per step, the
  graph outputs changed name, or ``modified`` disagrees with whether the model changed;
- ``mismatch``: for an exact case, an output differs from the input model's beyond :func:`tolerance` (relative to
  the output's largest magnitude) or changed shape or type; for a lossy case, an output is non-finite where the
  input model's is finite, or changed shape;
- ``ok`` otherwise.

Both models run under ONNX Runtime on the CPU with the same feeds. Positions where the input model's output is
not finite are not compared (a rewrite may remove an intermediate overflow).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
import os
import random
import re
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import onnx
import onnx_ir as ir

from bitfold.errors import BitfoldError

#: The largest tensor (elements) the generator builds; operations that would exceed it are skipped.
MAX_ELEMENTS = 4096
#: Generation steps per graph (a motif is one step of several nodes).
MAX_STEPS = 12
OPSETS = (17, 18, 19, 20, 21)
#: Calibration samples drawn per graph for the passes that calibrate.
CALIBRATION_SAMPLES = 4

_DTYPES = {"float32": (ir.DataType.FLOAT, np.float32), "float16": (ir.DataType.FLOAT16, np.float16)}

#: Relative tolerance of an exact rewrite on a float32 graph.
FLOAT32_TOLERANCE = 1e-5
#: Relative tolerance of an exact rewrite on a float16 graph: 16 units of float16 rounding (u = 2^-11 each),
#: 7.8e-3. ONNX Runtime rounds every float16 intermediate to 11 significant bits, so a rewrite that folds one op
#: into another changes which values get rounded: the folded weight w·s is rounded once where the input graph
#: rounded x·w and then (x·w)·s, about one unit of the output's scale per rewritten op; a generated graph has at
#: most ~16 ops on one path, so the rounding differences add up to at most ~16 u. The float32 bound, 1e-5, is
#: ~170 units of float32 rounding (2^-24). ``benchmarks/fuzz.py`` records, per exact case and dtype, the largest
#: relative error where the case held (``max_relative_error``), to compare with these bounds.
FLOAT16_TOLERANCE = 16 * 2.0**-11
#: Where an output is far smaller than the terms that make it (a bias that cancels a product), one unit of the
#: terms' rounding is many units of the output's, and folding rounds new constants: an exact rewrite of a float16
#: graph may then also move an output by this many times as far as re-rounding the graph's own float16 constants
#: does (the largest move over ``ROUNDING_DRAWS`` draws that scale every float16 constant by 1 + δ, |δ| ≤ 2^-11).
ROUNDING_FLOOR = 4.0
ROUNDING_DRAWS = 3


def tolerance(dtype: str) -> float:
    """The relative error an exact rewrite may introduce on a graph of element type ``dtype``."""
    return FLOAT16_TOLERANCE if dtype == "float16" else FLOAT32_TOLERANCE


# ---- choices -----------------------------------------------------------------------------------------------------


class Choices(Protocol):
    def below(self, n: int) -> int:
        """An integer in [0, n); 0 is the simplest option."""


class RandomChoices:
    """Uniform choices from a seeded generator, recorded so that a graph can be rebuilt and shrunk."""

    def __init__(self, seed: int | str) -> None:
        self._rng = random.Random(seed)
        self.record: list[int] = []

    def below(self, n: int) -> int:
        value = self._rng.randrange(n) if n > 1 else 0
        self.record.append(value)
        return value


class ReplayChoices:
    """Choices read back from a list (clamped to the range asked for; 0 once the list runs out)."""

    def __init__(self, values: Sequence[int]) -> None:
        self._values = list(values)
        self.record: list[int] = []

    def below(self, n: int) -> int:
        index = len(self.record)
        value = min(self._values[index], n - 1) if index < len(self._values) and n > 1 else 0
        self.record.append(value)
        return value


class _DrawChoices:
    def __init__(self, draw: Callable, integers: Callable) -> None:
        self._draw, self._integers = draw, integers
        self.record: list[int] = []

    def below(self, n: int) -> int:
        value = self._draw(self._integers(0, n - 1)) if n > 1 else 0
        self.record.append(value)
        return value


# ---- the generated graph -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FuzzGraph:
    """A generated model with its feeds and calibration samples; the model is never modified by :func:`check`."""

    model: ir.Model
    feeds: dict[str, np.ndarray]
    calibration: list[dict[str, np.ndarray]]
    dtype: str
    #: The output shapes the generator computed, by output name.
    shapes: dict[str, tuple[int, ...]]
    choices: tuple[int, ...] = ()
    #: The [start, end) range of the choices of each generation step (a node or a motif), for shrinking.
    steps: tuple[tuple[int, int], ...] = ()
    _reference: dict[str, np.ndarray] | None = dataclasses.field(default=None, repr=False)

    def text(self) -> str:
        """The model in ``onnx.printer`` syntax (``onnx.parser.parse_model`` reads it back)."""
        return onnx.printer.to_text(ir.to_proto(self.model))

    def reference(self) -> dict[str, np.ndarray]:
        """The input model's outputs on :attr:`feeds` under ONNX Runtime (CPU), computed once."""
        if self._reference is None:
            from bitfold.backends.ort import OrtRunnable

            self._reference = OrtRunnable(self.model, device="cpu").run(self.feeds)
        return self._reference

    def rounding_move(self) -> dict[str, float]:
        """Per output, the largest absolute move of the input model's outputs over :data:`ROUNDING_DRAWS` copies
        whose every float16 constant (initializer or Constant node) is scaled by 1 + δ, δ uniform in ±2^-11: how
        far float16 rounding of the constants alone moves them."""
        from bitfold.backends.ort import OrtRunnable
        from bitfold.frontend.onnx_io import clone

        reference, moves = self.reference(), dict.fromkeys(self.reference(), 0.0)
        rng = np.random.default_rng(0)
        for _ in range(ROUNDING_DRAWS):
            model = clone(self.model)
            constants = [v for v in model.graph.initializers.values() if v.const_value is not None]
            for value in constants:
                value.const_value = _jitter(value.const_value, rng)
            for node in model.graph:
                if node.op_type == "Constant" and not node.domain and "value" in node.attributes:
                    node.attributes["value"] = ir.AttrTensor("value", _jitter(node.attributes["value"].value, rng))
            outputs = OrtRunnable(model, device="cpu").run(self.feeds)
            for name, ref in reference.items():
                finite = np.isfinite(ref) & np.isfinite(outputs[name])
                if finite.any():
                    move = np.abs(outputs[name][finite].astype(np.float64) - ref[finite].astype(np.float64)).max()
                    moves[name] = max(moves[name], float(move))
        return moves

    def runnable(self) -> bool:
        """Whether ONNX Runtime (default optimizations) runs the input model. Every generated graph is valid ONNX
        and runs unoptimized, but ORT's graph optimizer rejects a few (a fused Transpose that another node still
        reads), and without a reference there is nothing to compare a rewrite with."""
        try:
            self.reference()
        except BitfoldError:
            return False
        return True

    def __repr__(self) -> str:
        return f"FuzzGraph({self.dtype}, opset {self.model.opset_imports['']}, choices {list(self.choices)}):\n{self.text()}"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # how hypothesis prints a falsifying example
        printer.text(repr(self))


def graphs(max_steps: int = MAX_STEPS, *, runnable: bool = True):
    """A hypothesis strategy of :class:`FuzzGraph` (failures shrink to fewer, simpler nodes). With ``runnable``,
    graphs ONNX Runtime refuses to load (:meth:`FuzzGraph.runnable`) are filtered out."""
    from hypothesis import assume
    from hypothesis import strategies as st

    @st.composite
    def strategy(draw):
        source = _DrawChoices(draw, st.integers)
        graph = build_graph(source, max_steps=max_steps)
        graph.choices = tuple(source.record)
        if runnable:
            assume(graph.runnable())
        return graph

    return strategy()


def build_graph(choices: Choices, *, max_steps: int = MAX_STEPS) -> FuzzGraph:
    """The graph ``choices`` describe; every choice sequence gives a valid graph."""
    return _Builder(choices).build(max_steps)


def replay(values: Sequence[int], *, max_steps: int = MAX_STEPS) -> FuzzGraph:
    """Rebuild the graph of a recorded choice list."""
    source = ReplayChoices(values)
    graph = build_graph(source, max_steps=max_steps)
    graph.choices = tuple(source.record)
    return graph


class _T(NamedTuple):
    value: ir.Value
    shape: tuple[int, ...]


_OPS = (
    "relu", "add", "mul", "matmul", "gemm", "conv", "conv_transpose", "batchnorm", "layernorm", "rmsnorm",
    "sigmoid", "clip", "softmax", "reshape", "transpose", "concat", "split", "gather",
    "linear_bn", "matmul_pair_bn", "block",
)  # fmt: skip

_ACCEPTS: dict[str, Callable[[tuple[int, ...]], bool]] = {
    "matmul": lambda s: len(s) >= 1,
    "gemm": lambda s: len(s) == 2,
    "conv": lambda s: len(s) in (3, 4),
    "conv_transpose": lambda s: len(s) in (3, 4),
    "batchnorm": lambda s: len(s) >= 2,
    "transpose": lambda s: len(s) >= 2,
    "split": lambda s: any(d >= 2 for d in s),
    "linear_bn": lambda s: len(s) >= 2,
    "matmul_pair_bn": lambda s: len(s) == 2,
    "block": lambda s: len(s) >= 2,
}

_DIMS = (1, 2, 3, 4, 5, 8, 16, 32)


def _numel(shape: Iterable[int]) -> int:
    return math.prod(shape)


class _Builder:
    def __init__(self, choices: Choices) -> None:
        self.c = choices
        self.nodes: list[ir.Node] = []
        self.initializers: list[ir.Value] = []
        self.inputs: list[ir.Value] = []
        self.pool: list[_T] = []
        self.shared: dict[tuple, list[ir.Value]] = {}
        self.counter = 0

    # -- choice helpers
    def below(self, n: int) -> int:
        return self.c.below(n)

    def pick(self, options: Sequence) -> Any:
        return options[self.below(len(options))]

    def flag(self, odds: int = 2) -> bool:
        """True with probability 1/odds (False is the simple side)."""
        return self.below(odds) == odds - 1

    def between(self, low: int, high: int) -> int:
        return low + self.below(high - low + 1)

    def dim(self, high: int = 32) -> int:
        return self.pick([d for d in _DIMS if d <= high])

    def node_name(self, op: str) -> str | None:
        return self.fresh(op.lower() + "_") if self.named else None

    def position(self) -> int:
        """How many choices were made so far (0 when the source does not record them)."""
        return len(getattr(self.c, "record", ()))

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    # -- graph pieces
    def build(self, max_steps: int) -> FuzzGraph:
        self.opset = self.pick(OPSETS)
        self.dtype = self.pick(("float32", "float16"))
        self.ir_dtype, self.np_dtype = _DTYPES[self.dtype]
        self.annotate = not self.flag(4)
        self.constant_nodes = self.flag(4)
        self.named = not self.flag(4)  # exporters often leave node names empty
        self.rng = np.random.default_rng(self.below(1 << 16))
        feed_seed = self.below(1 << 16)

        first = self.input_shape()
        self.add_input("x0", first)
        if self.flag(3):
            self.add_input("x1", first if self.flag(2) else self.input_shape())
        vocab = 0
        if self.flag(4):
            vocab = self.pick((8, 4, 16))
            ids_shape = (self.between(1, 2), self.between(1, 4))
            ids = ir.val("ids", ir.DataType.INT64, ids_shape)
            self.inputs.append(ids)
            table = self.weight((vocab, self.dim(16)), fan_in=1, share=False)
            self.emit("Gather", [table, ids], {}, ids_shape + (self.shape_of(table)[1],))

        marks = []
        for step in range(max_steps):
            marks.append(self.position())
            if step and self.below(8) == 0:  # stop (the simple side): about 7 steps on average
                break
            op = self.pick(_OPS)
            accepts = _ACCEPTS.get(op, lambda s: len(s) >= 1)
            candidates = [t for t in self.pool if accepts(t.shape)]
            if candidates:
                getattr(self, "op_" + op)(candidates[-1 - self.below(len(candidates))])
        marks.append(self.position())

        produced = [t for t in self.pool if t.value.producer() is not None]
        if not produced:
            produced = [self.emit("Relu", [self.pool[0].value], {}, self.pool[0].shape)]
        outputs = [produced[-1]]
        for _ in range(self.below(3)):
            extra = produced[-1 - self.below(len(produced))]
            if all(extra.value is not o.value for o in outputs):
                outputs.append(extra)
        for t in outputs:  # graph outputs always carry their type and shape (onnx.checker requires both)
            t.value.dtype, t.value.shape = self.ir_dtype, ir.Shape(t.shape)
        graph = ir.Graph(
            self.inputs, [t.value for t in outputs], nodes=self.nodes, initializers=self.initializers,
            opset_imports={"": self.opset}, name="fuzz",
        )  # fmt: skip
        model = ir.Model(graph, ir_version=10, producer_name="bitfold.tools.fuzz")
        feeds, calibration = self.feeds(feed_seed, vocab)
        graph = FuzzGraph(model, feeds, calibration, self.dtype, {t.value.name: t.shape for t in outputs})
        graph.steps = tuple(zip(marks, marks[1:]))
        return graph

    def input_shape(self) -> tuple[int, ...]:
        kind = self.below(5)
        if kind == 0:
            return (self.between(1, 4), self.dim())
        if kind == 1:
            return (self.between(1, 2), self.between(1, 4), self.dim())
        if kind == 2:
            return (self.between(1, 2), self.dim(8), self.between(1, 6), self.between(1, 6))
        if kind == 3:
            return (self.dim(),)
        return (self.between(1, 2), self.dim(8), self.between(1, 8))

    def add_input(self, name: str, shape: tuple[int, ...]) -> None:
        value = ir.val(name, self.ir_dtype, shape)
        self.inputs.append(value)
        self.pool.append(_T(value, shape))

    def feeds(self, seed: int, vocab: int) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
        rng = np.random.default_rng(seed)

        def sample() -> dict[str, np.ndarray]:
            out = {}
            for value in self.inputs:
                shape = tuple(int(d) for d in value.shape)
                if value.dtype == ir.DataType.INT64:
                    out[value.name] = rng.integers(0, vocab, shape).astype(np.int64)
                else:
                    out[value.name] = rng.standard_normal(shape).astype(self.np_dtype)
            return out

        return sample(), [sample() for _ in range(CALIBRATION_SAMPLES)]

    def shape_of(self, value: ir.Value) -> tuple[int, ...]:
        if value.const_value is not None:
            return tuple(value.const_value.shape)
        for t in self.pool:
            if t.value is value:
                return t.shape
        return tuple(value.producer().attributes["value"].value.shape)  # a Constant node's output

    def emit(self, op: str, inputs: Sequence[ir.Value | None], attributes: Mapping[str, Any], *shapes: tuple[int, ...]) -> _T:
        """Append a node with one output per shape; float outputs join the pool. Returns the first output."""
        outputs = [ir.Value(name=self.fresh("v")) for _ in shapes]
        for value, shape in zip(outputs, shapes, strict=True):
            if self.annotate:
                value.dtype, value.shape = self.ir_dtype, ir.Shape(shape)
        self.nodes.append(ir.node(op, inputs, dict(attributes), outputs=outputs, name=self.node_name(op)))
        produced = [_T(v, s) for v, s in zip(outputs, shapes, strict=True)]
        self.pool.extend(produced)
        return produced[0]

    def constant(self, array: np.ndarray, *, share: bool = False) -> ir.Value:
        """A constant input: an initializer or a ``Constant`` node (reused for another of the same shape when
        ``share`` and the choice say so)."""
        key = (array.shape, str(array.dtype))
        if share and self.shared.get(key) and self.flag(3):
            return self.pick(self.shared[key])
        name = self.fresh("w")
        tensor = ir.tensor(array, name=name)
        if self.constant_nodes:
            value = ir.Value(name=name)
            if self.annotate:
                value.dtype, value.shape = tensor.dtype, ir.Shape(array.shape)
            self.nodes.append(ir.node("Constant", [], {"value": tensor}, outputs=[value], name=self.node_name("Constant")))
        else:
            value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
            self.initializers.append(value)
        if share:
            self.shared.setdefault(key, []).append(value)
        return value

    def floats(self, array: np.ndarray, *, share: bool = False) -> ir.Value:
        return self.constant(np.asarray(array, dtype=self.np_dtype), share=share)

    def ints(self, values: Sequence[int]) -> ir.Value:
        return self.constant(np.asarray(values, dtype=np.int64))

    def weight(self, shape: tuple[int, ...], fan_in: int, *, share: bool = True) -> ir.Value:
        """A weight of ``shape``, normal / √fan_in; some have a zero slice or one outlier channel."""
        w = self.rng.standard_normal(shape) / math.sqrt(max(fan_in, 1))
        flavour = self.below(4)
        if flavour == 2:
            w[self.below(shape[0])] = 0.0
        elif flavour == 3:
            w[..., self.below(shape[-1])] *= 8.0
        return self.floats(w, share=share)

    def scales(self, shape: tuple[int, ...]) -> np.ndarray:
        """Multipliers of magnitude 0.5–1.5 with random signs (sometimes one exact zero)."""
        s = self.rng.uniform(0.5, 1.5, shape) * self.rng.choice((-1.0, 1.0), shape)
        if s.size and self.flag(6):
            s.flat[self.below(s.size)] = 0.0
        return s

    def fits(self, shape: tuple[int, ...]) -> bool:
        return 0 < _numel(shape) <= MAX_ELEMENTS and all(d >= 1 for d in shape)

    # -- elementwise
    def op_relu(self, x: _T) -> _T:
        return self.emit("Relu", [x.value], {}, x.shape)

    def op_sigmoid(self, x: _T) -> _T:
        return self.emit("Sigmoid", [x.value], {}, x.shape)

    def op_clip(self, x: _T) -> _T:
        low = self.floats(np.array(-self.rng.uniform(0.0, 2.0))) if self.flag(2) else None
        high = self.floats(np.array(self.rng.uniform(0.0, 2.0))) if self.flag(2) else None
        inputs = [x.value, low, high]
        while inputs[-1] is None and len(inputs) > 1:
            inputs.pop()
        return self.emit("Clip", inputs, {}, x.shape)

    def broadcast_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        rank = len(shape)
        options = [shape[-1:], (), shape, (1,) * (rank - 1) + shape[-1:]]
        if rank >= 3:
            options.append((shape[1],) + (1,) * (rank - 2))
        if rank >= 2:
            options.append((1,) + shape[1:])
        return self.pick(options)

    def op_add(self, x: _T) -> _T:
        return self.binary("Add", x)

    def op_mul(self, x: _T) -> _T:
        return self.binary("Mul", x)

    def binary(self, op: str, x: _T) -> _T:
        mode = self.below(3)
        if mode == 1:
            others = [t for t in self.pool if t.shape == x.shape and t.value is not x.value]
            if others:
                other = self.pick(others).value
                return self.emit(op, [x.value, other] if self.flag(2) else [other, x.value], {}, x.shape)
        if mode == 2:
            return self.emit(op, [x.value, x.value], {}, x.shape)
        shape = self.broadcast_shape(x.shape)
        array = self.scales(shape) if op == "Mul" else 0.5 * self.rng.standard_normal(shape)
        c = self.floats(array, share=True)
        return self.emit(op, [x.value, c] if not self.flag(2) else [c, x.value], {}, x.shape)

    def bias(self, x: _T, channel_axis: int) -> _T:
        """``Add`` of a per-channel constant along ``channel_axis`` (the form exporters give a linear's bias)."""
        rank = len(x.shape)
        axis = channel_axis % rank
        shape = (x.shape[axis],) + (1,) * (rank - 1 - axis)
        c = self.floats(0.5 * self.rng.standard_normal(shape))
        return self.emit("Add", [x.value, c] if not self.flag(3) else [c, x.value], {}, x.shape)

    # -- linear layers
    def op_matmul(self, x: _T, *, mode: int | None = None, bias: bool | None = None) -> _T | None:
        k = x.shape[-1]
        mode = self.below(3) if mode is None else mode
        if mode == 1 and len(x.shape) >= 2:  # weight on the left: W (M, S) · x (..., S, K)
            m = self.dim()
            shape = x.shape[:-2] + (m, k)
            if not self.fits(shape):
                return None
            return self.emit("MatMul", [self.weight((m, x.shape[-2]), x.shape[-2]), x.value], {}, shape)
        if mode == 2 and len(x.shape) >= 2:
            others = [
                t for t in self.pool
                if len(t.shape) >= 2 and t.shape[-2] == k and (len(t.shape) == 2 or t.shape[:-2] == x.shape[:-2])
            ]  # fmt: skip
            if others:
                other = self.pick(others)
                shape = x.shape[:-1] + other.shape[-1:]
                return self.emit("MatMul", [x.value, other.value], {}, shape) if self.fits(shape) else None
        n = self.dim()
        shape = x.shape[:-1] + (n,)
        if not self.fits(shape):
            return None
        y = self.emit("MatMul", [x.value, self.weight((k, n), k)], {}, shape)
        if self.flag(3) if bias is None else bias:
            y = self.bias(y, -1)
        return y

    def op_gemm(self, x: _T) -> _T | None:
        m, k = x.shape
        n = self.dim()
        if not self.fits((m, n)):
            return None
        attributes: dict[str, Any] = {}
        a = x.value
        if self.flag(3):
            a = self.emit("Transpose", [x.value], {"perm": [1, 0]}, (k, m)).value
            attributes["transA"] = 1
        trans_b = self.flag(2)
        if trans_b or self.flag(4):
            attributes["transB"] = int(trans_b)
        b = self.weight((n, k) if trans_b else (k, n), k)
        c_shape = self.pick((None, (n,), (1, n), (m, n), (), (m, 1)))
        alpha, beta = self.pick((1.0, 0.5, 2.0, -1.5)), self.pick((1.0, 0.5, 2.0, 0.0))
        if alpha != 1.0 or self.flag(4):
            attributes["alpha"] = alpha
        if beta != 1.0 or self.flag(4):
            attributes["beta"] = beta
        inputs = [a, b] if c_shape is None else [a, b, self.floats(0.5 * self.rng.standard_normal(c_shape))]
        return self.emit("Gemm", inputs, attributes, (m, n))

    def spatial(self, nd: int) -> tuple[list[int], list[int], list[int], list[int]]:
        kernel = [self.between(1, 3) for _ in range(nd)]
        dilations = [1 + int(self.flag(3)) for _ in range(nd)]
        strides = [1 + int(self.flag(3)) for _ in range(nd)]
        pads = [self.below(2) for _ in range(2 * nd)]
        return kernel, dilations, strides, pads

    def conv_attributes(self, group: int, kernel, dilations, strides, pads) -> dict[str, Any]:
        attributes: dict[str, Any] = {}
        if group > 1 or self.flag(4):
            attributes["group"] = group
        if self.flag(2):
            attributes["kernel_shape"] = kernel
        for name, values in (("dilations", dilations), ("strides", strides), ("pads", pads)):
            if any(v != (0 if name == "pads" else 1) for v in values) or self.flag(4):
                attributes[name] = values
        return attributes

    def op_conv(self, x: _T) -> _T | None:
        n, c, *size = x.shape
        group = self.pick([g for g in range(1, c + 1) if c % g == 0])
        m = group * self.between(1, 3)
        kernel, dilations, strides, pads = self.spatial(len(size))
        out = []
        for i, length in enumerate(size):
            padded = length + pads[i] + pads[i + len(size)]
            if padded < dilations[i] * (kernel[i] - 1) + 1:
                kernel[i] = dilations[i] = 1
            out.append((padded - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1)
        shape = (n, m, *out)
        if not self.fits(shape):
            return None
        w = self.weight((m, c // group, *kernel), c // group * _numel(kernel))
        inputs = [x.value, w] + ([self.floats(0.5 * self.rng.standard_normal(m))] if self.flag(2) else [])
        return self.emit("Conv", inputs, self.conv_attributes(group, kernel, dilations, strides, pads), shape)

    def op_conv_transpose(self, x: _T) -> _T | None:
        n, c, *size = x.shape
        group = self.pick([g for g in range(1, c + 1) if c % g == 0])
        per_group = self.between(1, 3)
        kernel, dilations, strides, pads = self.spatial(len(size))
        padding = [int(s > 1 and self.flag(3)) for s in strides]
        out = []
        for i, length in enumerate(size):
            full = strides[i] * (length - 1) + padding[i] + dilations[i] * (kernel[i] - 1) + 1
            if full - pads[i] - pads[i + len(size)] < 1:
                pads[i] = pads[i + len(size)] = 0
            out.append(full - pads[i] - pads[i + len(size)])
        shape = (n, group * per_group, *out)
        if not self.fits(shape):
            return None
        w = self.weight((c, per_group, *kernel), c // group * _numel(kernel))
        inputs = [x.value, w] + ([self.floats(0.5 * self.rng.standard_normal(group * per_group))] if self.flag(2) else [])
        attributes = self.conv_attributes(group, kernel, dilations, strides, pads)
        if any(padding):
            attributes["output_padding"] = padding
        return self.emit("ConvTranspose", inputs, attributes, shape)

    # -- normalizations
    def op_batchnorm(self, x: _T) -> _T:
        c = x.shape[1]
        scale = self.scales((c,))
        variance = self.rng.uniform(0.5, 2.0, c) if not self.flag(4) else self.rng.uniform(1e-3, 1e-2, c)
        params = [scale, 0.2 * self.rng.standard_normal(c), 0.5 * self.rng.standard_normal(c), variance]
        attributes: dict[str, Any] = {}
        epsilon = self.pick((None, 1e-3, 1e-5))
        if epsilon is not None:
            attributes["epsilon"] = epsilon
        if self.flag(4):
            attributes["momentum"] = 0.9
        if self.flag(4):
            attributes["training_mode"] = 0
        return self.emit("BatchNormalization", [x.value, *(self.floats(p) for p in params)], attributes, x.shape)

    def op_layernorm(self, x: _T, *, axis: int | None = None) -> _T:
        rank = len(x.shape)
        axis = (-1 if not self.flag(3) else -1 - self.below(rank)) if axis is None else axis
        normalized = x.shape[axis % rank :]
        gamma = 1.0 + 0.2 * self.rng.standard_normal(normalized)
        if self.flag(6):
            gamma.flat[self.below(gamma.size)] = 0.0
        inputs = [x.value, self.floats(gamma, share=True)]
        if not self.flag(3):
            inputs.append(self.floats(0.2 * self.rng.standard_normal(normalized)))
        attributes: dict[str, Any] = {}
        if axis != -1 or self.flag(3):
            attributes["axis"] = axis if self.flag(2) else axis % rank
        if self.flag(2):
            attributes["epsilon"] = self.pick((1e-5, 1e-6))
        return self.emit("LayerNormalization", inputs, attributes, x.shape)

    def op_rmsnorm(self, x: _T, *, gamma: bool | None = None) -> _T:
        rank = len(x.shape)
        reduced = x.shape[:-1] + (1,)
        squared = (
            self.emit("Pow", [x.value, self.floats(np.array(2.0))], {}, x.shape)
            if not self.flag(2)
            else self.emit("Mul", [x.value, x.value], {}, x.shape)
        )
        axis = -1 if not self.flag(3) else rank - 1
        attributes: dict[str, Any] = {} if not self.flag(3) else {"keepdims": 1}
        if self.opset >= 18:
            mean = self.emit("ReduceMean", [squared.value, self.ints([axis])], attributes, reduced)
        else:
            mean = self.emit("ReduceMean", [squared.value], {**attributes, "axes": [axis]}, reduced)
        eps = self.floats(np.array(self.pick((1e-6, 1e-5))))
        shifted = self.emit("Add", [mean.value, eps], {}, reduced)
        root = self.emit("Sqrt", [shifted.value], {}, reduced)
        if not self.flag(2):
            y = self.emit("Div", [x.value, root.value], {}, x.shape)
        else:
            inverse = self.emit("Reciprocal", [root.value], {}, reduced)
            y = self.emit("Mul", [x.value, inverse.value], {}, x.shape)
        if not self.flag(3) if gamma is None else gamma:
            g = self.floats(1.0 + 0.2 * self.rng.standard_normal(x.shape[-1:]), share=True)
            y = self.emit("Mul", [y.value, g] if not self.flag(3) else [g, y.value], {}, x.shape)
        return y

    def op_softmax(self, x: _T) -> _T:
        rank = len(x.shape)
        axis = -1 if not self.flag(3) else self.below(rank)
        return self.emit("Softmax", [x.value], {"axis": axis} if axis != -1 or self.flag(2) else {}, x.shape)

    # -- data movement
    def op_reshape(self, x: _T) -> _T:
        s, rank = x.shape, len(x.shape)
        targets = [(_numel(s),), (1,) + s]
        if rank >= 2:
            targets += [s[:-2] + (s[-2] * s[-1],), (_numel(s[:-1]), s[-1])]
        factors = [a for a in range(2, s[-1]) if s[-1] % a == 0]
        if factors:
            a = self.pick(factors)
            targets.append(s[:-1] + (a, s[-1] // a))
        target = self.pick(targets)
        spec = list(target)
        if self.flag(3):
            spec[self.below(len(spec))] = -1
        for i in range(min(rank, len(spec))):
            if spec[i] == s[i] and self.flag(4):
                spec[i] = 0
        return self.emit("Reshape", [x.value, self.ints(spec)], {}, target)

    def op_transpose(self, x: _T) -> _T:
        rank = len(x.shape)
        if self.flag(4):
            perm = list(range(rank))[::-1]
            attributes = {}
        else:
            perm = list(range(rank))
            for i in range(rank - 1):
                j = i + self.below(rank - i)
                perm[i], perm[j] = perm[j], perm[i]
            attributes = {"perm": perm}
        return self.emit("Transpose", [x.value], attributes, tuple(x.shape[p] for p in perm))

    def op_concat(self, x: _T) -> _T | None:
        rank = len(x.shape)
        axis = self.below(rank)
        parts = [x.value]
        size = x.shape[axis]
        mode = self.below(3)
        if mode == 0:
            parts.append(x.value)
            size += x.shape[axis]
        elif mode == 1:
            others = [
                t for t in self.pool
                if len(t.shape) == rank and all(t.shape[i] == x.shape[i] for i in range(rank) if i != axis)
            ]  # fmt: skip
            other = self.pick(others)
            parts.append(other.value)
            size += other.shape[axis]
        else:
            extra = self.between(1, 3)
            shape = x.shape[:axis] + (extra,) + x.shape[axis + 1 :]
            parts.insert(self.below(2), self.floats(self.rng.standard_normal(shape)))
            size += extra
        shape = x.shape[:axis] + (size,) + x.shape[axis + 1 :]
        if not self.fits(shape):
            return None
        return self.emit("Concat", parts, {"axis": axis - rank if self.flag(3) else axis}, shape)

    def op_split(self, x: _T) -> _T:
        axes = [i for i, d in enumerate(x.shape) if d >= 2]
        axis = self.pick(axes)
        length = x.shape[axis]
        count = self.between(2, min(3, length))
        cuts = sorted(self.rng.choice(np.arange(1, length), count - 1, replace=False).tolist())
        sizes = [b - a for a, b in zip([0, *cuts], [*cuts, length], strict=True)]
        attributes: dict[str, Any] = {"axis": axis} if axis != 0 or self.flag(3) else {}
        inputs = [x.value]
        chunk = -(-length // count)
        if self.opset >= 18 and chunk * (count - 1) < length and self.flag(2):
            attributes["num_outputs"] = count
            sizes = [chunk] * (count - 1) + [length - chunk * (count - 1)]
        elif self.opset < 18 and length % count == 0 and self.flag(2):
            sizes = [length // count] * count
        else:
            inputs.append(self.ints(sizes))
        shapes = [x.shape[:axis] + (s,) + x.shape[axis + 1 :] for s in sizes]
        return self.emit("Split", inputs, attributes, *shapes)

    def op_gather(self, x: _T) -> _T:
        rank = len(x.shape)
        axis = self.below(rank)
        length = x.shape[axis]
        if rank >= 2 and self.flag(3):
            indices: np.ndarray = np.array(self.below(length), dtype=np.int64)
        else:
            indices = self.rng.integers(-length if self.flag(3) else 0, length, self.between(1, 3)).astype(np.int64)
        shape = x.shape[:axis] + indices.shape + x.shape[axis + 1 :]
        attributes = {"axis": axis} if axis != 0 or self.flag(3) else {}
        return self.emit("Gather", [x.value, self.constant(indices)], attributes, shape)

    # -- motifs
    def op_linear_bn(self, x: _T) -> _T | None:
        """A linear (MatMul, Gemm, Conv or ConvTranspose), maybe a bias ``Add`` on its channels, then BN."""
        kinds = ["matmul"] + (["gemm"] if len(x.shape) == 2 else []) + (["conv", "conv_transpose"] if len(x.shape) in (3, 4) else [])
        kind = self.pick(kinds)
        if kind == "matmul":
            y = self.op_matmul(x, mode=0, bias=False)
        else:
            y = getattr(self, "op_" + kind)(x)
        if y is None:
            return None
        if self.flag(2):
            y = self.bias(y, 1 if kind.startswith("conv") else -1)
        return self.op_batchnorm(y)

    def op_matmul_pair_bn(self, x: _T) -> _T | None:
        """BatchNormalization(Add(MatMul(x, W1), MatMul(y, W2))), y another (M, K') activation or x itself."""
        others = [t for t in self.pool if len(t.shape) == 2 and t.shape[0] == x.shape[0]]
        y = self.pick(others)
        n = self.dim()
        if not self.fits((x.shape[0], n)):
            return None
        a = self.emit("MatMul", [x.value, self.weight((x.shape[1], n), x.shape[1])], {}, (x.shape[0], n))
        b = self.emit("MatMul", [y.value, self.weight((y.shape[1], n), y.shape[1])], {}, (x.shape[0], n))
        total = self.emit("Add", [a.value, b.value] if not self.flag(2) else [b.value, a.value], {}, a.shape)
        return self.op_batchnorm(total)

    def op_block(self, x: _T) -> _T | None:
        """x + down(act(up(norm(x)))), or with a gated MLP: x + down(silu(gate(n)) · up(n))."""
        d, hidden = x.shape[-1], self.dim()
        if not self.fits(x.shape[:-1] + (hidden,)):
            return None
        kind = self.below(3)
        n = x if kind == 2 else self.op_layernorm(x, axis=-1) if kind == 0 else self.op_rmsnorm(x, gamma=self.flag(2))
        up_shape = x.shape[:-1] + (hidden,)

        def linear(source: _T, k: int, out: int) -> _T:
            y = self.emit("MatMul", [source.value, self.weight((k, out), k)], {}, source.shape[:-1] + (out,))
            return self.bias(y, -1) if self.flag(3) else y

        if self.flag(2):
            gate, up = linear(n, d, hidden), linear(n, d, hidden)
            sig = self.emit("Sigmoid", [gate.value], {}, up_shape)
            silu = self.emit("Mul", [gate.value, sig.value], {}, up_shape)
            h = self.emit("Mul", [silu.value, up.value], {}, up_shape)
        else:
            h = linear(n, d, hidden)
            if self.flag(2):
                h = self.emit(self.pick(("Relu", "Sigmoid")), [h.value], {}, up_shape)
        out = linear(h, hidden, d)
        return self.emit("Add", [x.value, out.value] if not self.flag(3) else [out.value, x.value], {}, x.shape)


# ---- pass cases ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PassCase:
    """A recipe run as one unit: ``exact`` cases must keep the outputs (to :func:`tolerance`), lossy ones finite."""

    label: str
    steps: tuple[str | Mapping[str, Any], ...]
    exact: bool


def pass_case(name: str, exact: bool, **params: Any) -> PassCase:
    """A one-step case labelled like ``quantize-weights(bits=8)``."""
    label = name + (f"({', '.join(f'{k}={v}' for k, v in params.items())})" if params else "")
    return PassCase(label, ({"name": name, **params} if params else name,), exact)


def pass_cases() -> tuple[PassCase, ...]:
    """Every registered pass (small-graph settings where its defaults would decline everything) and the canonical
    recipe."""
    from bitfold.passes.canonical import CANONICAL

    open_ends = {"keep_ends": False}
    return (
        PassCase("canonical", tuple(CANONICAL), True),
        pass_case("fold-constants", True),
        pass_case("constants-to-initializers", True),
        pass_case("constants-to-initializers", True, lift_all=True),
        pass_case("remove-identity", True),
        pass_case("fold-batchnorm", True),
        pass_case("remove-dead", True),
        pass_case("fold-norm-affine", True),
        pass_case("fold-norm-affine", True, center=True),
        pass_case("lowrank-split", True, rank=1),
        pass_case("smooth", True),
        pass_case("smooth", True, shift=True, explicit=True),
        pass_case("smooth", True, search=True, rows=64),
        pass_case("rotate", True),
        pass_case("rotate", True, online=False),
        pass_case("affine", True, steps=2, rows=32),
        pass_case("quantize-weights", False, group_size=-1),
        pass_case("quantize-weights", False, method="gptq", group_size=16, symmetric=False, op_types=["MatMul", "Conv"]),
        pass_case("quantize-weights", False, method="awq", group_size=-1, awq_grid=4),
        pass_case("quantize-weights", False, format="matmulnbits", group_size=16, bits=8),
        pass_case("quantize-weights", False, dtype="nf4", format="fake", group_size=0, compensate_rank=1),
        pass_case("quantize-activations", False),
        pass_case("quantize-activations", False, activation_dtype="fp8-e4m3", observer="percentile", graph_inputs=True),
        pass_case("quantize-tokens", False),
        pass_case("quantize-tokens", False, bits=4, symmetric=False, search_clip=True),
        pass_case("cast-precision", False),
        pass_case("binarize", False, **open_ends),
        pass_case("binarize", False, gptq=True, format="fake", planes=2, **open_ends),
        pass_case("ternarize", False, **open_ends),
        pass_case("shift", False, **open_ends),
        pass_case("shift", False, gptq=True, format="fake", bits=3, **open_ends),
        pass_case("shiftadd", False, group_size=8, **open_ends),
        pass_case("prune", False, **open_ends),
        pass_case("prune", False, method="magnitude", pattern="nm:2:4", format="sparse", **open_ends),
        pass_case("prune", False, method="wanda", pattern="block:2x2:0.5", compensate_rank=1, **open_ends),
        pass_case("split-outliers", False, ratio=0.05, group_size=8, **open_ends),
        pass_case("reconstruct", False, group_size=8, clip_steps=2, round_steps=2),
        pass_case("reconstruct", False, group_size=8, clip_steps=0, round_steps=0, true_sequential=True, float_inputs=1.0),
        pass_case("reconstruct", False, grid="binary", format="fake", clip_steps=2, round_steps=2),
        pass_case("reconstruct", False, grid="bcq", bits=2, group_size=8, format="fake", clip_steps=2, round_steps=2),
        pass_case("reconstruct", False, grid="ternary", format="fake", clip_steps=2, round_steps=2, tune_steps=2, tune_weights=True),
        pass_case("reconstruct", False, grid="binary", salient_ratio=0.1, salience="hessian", format="fake", clip_steps=2, round_steps=2),
        pass_case("reconstruct", False, grid="binary", format="fake", clip_steps=2, round_steps=2, tune_steps=2, tune_weights=True, tune_match=1.0, tune_schedule="cosine", tune_holdout=1, tune_check=1, start_samples=1, tune_recompute=False),
        pass_case("reconstruct", False, grid="bcq", bits=2, group_size=8, format="fake", clip_steps=0, round_steps=0, tune_steps=2, tune_floats=True, tune_float_lr=1e-3),
        pass_case("reconstruct", False, op_types=["MatMul", "Conv"], group_size=-1, head=True, bias=True, clip_steps=2, round_steps=2),
        pass_case("reconstruct", False, op_types=["MatMul", "Conv"], group_size=-1, head=True, clip_steps=2, round_steps=2, tune_steps=2, tune_batch=2, tune_weights=True, tune_augment=True),
    )


# ---- checking ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Outcome:
    case: str
    #: "ok" | "decline" | "crash" | "contract" | "mismatch"
    kind: str
    #: A short category that stays the same when the graph shrinks: "KeyError at bitfold/x.py:12", "relative
    #: error", "onnx.checker: <message with names and numbers masked>", ...
    reason: str = ""
    detail: str = ""
    #: The graph's element type, and for an exact case that held, its largest relative output error.
    dtype: str = ""
    error: float | None = None

    @property
    def failed(self) -> bool:
        return self.kind in ("crash", "contract", "mismatch")

    @property
    def signature(self) -> tuple[str, str, str]:
        """What makes two failures the same bug: the case, the kind and the reason."""
        return (self.case, self.kind, self.reason)


def fingerprint(model: ir.Model) -> str:
    """Hash of the computation (inferred value_info left out, initializers in name order: their order carries no
    meaning), as the pipeline's ``modified`` check (:func:`bitfold.pipeline.instrument.change_key`) sees it."""
    proto = ir.to_proto(model)
    proto.graph.ClearField("value_info")
    initializers = sorted(proto.graph.initializer, key=lambda t: t.name)
    proto.graph.ClearField("initializer")
    proto.graph.initializer.extend(initializers)
    return hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()


def _arrays_digest(graph: FuzzGraph) -> str:
    digest = hashlib.sha256()
    for sample in [graph.feeds, *graph.calibration]:
        for name in sorted(sample):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(sample[name]).tobytes())
    return digest.hexdigest()


def _where(error: BaseException) -> str:
    frames = [
        f for f in traceback.extract_tb(error.__traceback__)
        if "bitfold" in Path(f.filename).parts and not f.filename.endswith("tools/fuzz.py")
    ]  # fmt: skip
    if not frames:
        return type(error).__name__
    path = Path(frames[-1].filename)
    parts = path.parts
    relative = "/".join(parts[len(parts) - 1 - parts[::-1].index("bitfold") :])
    return f"{type(error).__name__} at {relative}:{frames[-1].lineno}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def _masked(text: str) -> str:
    """``text`` with names and numbers masked, so that the same error on another graph reads the same."""
    text = re.sub(r"\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    return re.sub(r"\b\w*\d\w*\b", "#", text)[:160]


def check(graph: FuzzGraph, case: PassCase, *, optimize: Callable | None = None) -> Outcome:
    """Run ``case`` on a copy of ``graph`` through ``optimize`` (default ``bitfold.optimize``) and classify it."""
    from bitfold.backends.ort import OrtRunnable
    from bitfold.frontend.onnx_io import clone
    from bitfold.pipeline import optimize as default_optimize
    from bitfold.quant.calibration import CalibrationData

    optimize = optimize or default_optimize
    outcome = functools.partial(Outcome, case.label, dtype=graph.dtype)
    reference = graph.reference()
    model_before, arrays_before = fingerprint(graph.model), _arrays_digest(graph)
    work = clone(graph.model)
    work_before = fingerprint(work)
    calibration = CalibrationData(graph.calibration, name="fuzz")
    try:
        result, report = optimize(work, list(case.steps), calibration)
    except BitfoldError as e:
        return outcome("decline", type(e).__name__, _first_line(e))
    except Exception as e:  # anything else is a bug in a pass or the pipeline
        return outcome("crash", _where(e), _first_line(e))
    if fingerprint(graph.model) != model_before or _arrays_digest(graph) != arrays_before:
        return outcome("contract", "input changed", "the input model or its feed/calibration arrays changed")
    if report is None or len(report.passes) != len(case.steps):
        return outcome("contract", "report", "the report has no record per step")
    changed = fingerprint(result) != work_before
    claimed = [record.modified for record in report.passes]
    if changed != any(claimed):
        said = "modified" if any(claimed) else "not modified"
        detail = f"reported {said} ({claimed}) but the model {'did' if changed else 'did not'} change"
        return outcome("contract", "modified claim", detail)
    try:
        onnx.checker.check_model(ir.to_proto(result))
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0]
        return outcome("crash", f"onnx.checker: {_masked(first)}", f"onnx.checker: {first}"[:300])
    try:
        runnable = OrtRunnable(result, device="cpu")
    except Exception as e:
        cause = e.__cause__ or e
        return outcome("crash", f"onnxruntime load: {_masked(str(cause))}", _first_line(cause))
    try:
        outputs = runnable.run(graph.feeds)
    except Exception as e:
        return outcome("crash", f"onnxruntime run: {_masked(str(e))}", _first_line(e))
    if list(outputs) != list(reference):
        return outcome("contract", "outputs renamed", f"graph outputs changed from {list(reference)} to {list(outputs)}")
    for name, ref in reference.items():
        problem = compare(ref, outputs[name], exact=case.exact, tol=tolerance(graph.dtype))
        if problem and problem[0] == "relative error" and graph.dtype == "float16":
            finite = np.isfinite(ref)
            error = float(np.abs(outputs[name][finite].astype(np.float64) - ref[finite].astype(np.float64)).max())
            if error <= ROUNDING_FLOOR * graph.rounding_move()[name]:
                continue  # within what re-rounding the graph's float16 constants moves this output
        if problem:
            return outcome("mismatch", problem[0], f"output '{name}': {problem[1]}")
    if not case.exact:
        return outcome("ok")
    return outcome("ok", error=max((relative_error(ref, outputs[name]) for name, ref in reference.items()), default=0.0))


def _jitter(tensor: ir.TensorProtocol, rng: np.random.Generator) -> ir.TensorProtocol:
    """A float16 tensor scaled elementwise by 1 + δ, δ uniform in ±2^-11 (and rounded back to float16); any other
    tensor as it is."""
    if tensor.dtype != ir.DataType.FLOAT16:
        return tensor
    array = tensor.numpy()
    scaled = array.astype(np.float64) * (1.0 + rng.uniform(-(2.0**-11), 2.0**-11, array.shape))
    return ir.tensor(scaled.astype(np.float16), name=tensor.name)


def relative_error(reference: np.ndarray, output: np.ndarray) -> float:
    """max |output - reference| / max |reference| over the positions where the reference is finite (the absolute
    error when the reference is all zeros there; 0 when nothing is finite)."""
    finite = np.isfinite(reference)
    if not finite.any():
        return 0.0
    ref = np.asarray(reference, dtype=np.float64)[finite]
    error = float(np.abs(np.asarray(output, dtype=np.float64)[finite] - ref).max())
    scale = float(np.abs(ref).max())
    return error / scale if scale > 0 else error


def compare(reference: np.ndarray, output: np.ndarray, *, exact: bool, tol: float) -> tuple[str, str] | None:
    """Why ``output`` is not an acceptable rewrite of ``reference``: (category, sentence), or None when it is."""
    if reference.shape != output.shape:
        return "shape", f"shape {output.shape} instead of {reference.shape}"
    if exact and reference.dtype != output.dtype:
        return "type", f"type {output.dtype} instead of {reference.dtype}"
    finite = np.isfinite(reference)
    out = np.asarray(output, dtype=np.float64)
    lost = finite & ~np.isfinite(out)
    if lost.any():
        return "non-finite", f"{int(lost.sum())} non-finite value(s) where the input model's are finite"
    if not exact:
        return None
    relative = relative_error(reference, output)
    if relative > tol:
        finite_ref = np.asarray(reference, dtype=np.float64)[finite]
        error, scale = float(np.abs(out[finite] - finite_ref).max()), float(np.abs(finite_ref).max())
        return "relative error", f"relative error {relative:.3g} > {tol:.3g} (max abs {error:.3g}, max |ref| {scale:.3g})"
    return None


# ---- shrinking and sweeping ---------------------------------------------------------------------------------------


def shrink(values: Sequence[int], fails: Callable[[Sequence[int]], bool], *, budget: int = 300) -> list[int]:
    """The shortest, then smallest, choice list found by deleting and lowering choices of ``values`` on which
    ``fails`` still holds (``budget`` calls at most)."""
    best = list(values)
    calls = 0

    def better(candidate: list[int]) -> bool:
        nonlocal best, calls
        if calls >= budget or (len(candidate), candidate) >= (len(best), best):
            return False
        calls += 1
        if fails(candidate):
            best = candidate
            return True
        return False

    improved = True
    while improved and calls < budget:
        improved = False
        for size in (8, 4, 2, 1):
            i = len(best) - size
            while i >= 0 and calls < budget:
                if better(best[:i] + best[i + size :]):
                    improved = True
                i -= 1
        for size in (8, 4, 2, 1):
            for i in range(0, max(len(best) - size + 1, 0)):
                if any(best[i : i + size]) and better(best[:i] + [0] * size + best[i + size :]):
                    improved = True
        for i in range(len(best)):
            low, high = 0, best[i]
            while low < high and calls < budget:
                mid = (low + high) // 2
                if better(best[:i] + [mid] + best[i + 1 :]):
                    improved, high = True, mid
                else:
                    low = mid + 1
    return best


@dataclasses.dataclass
class Failure:
    outcome: Outcome
    choices: tuple[int, ...]
    #: The shrunk graph in ``onnx.printer`` syntax, once :func:`minimize` ran.
    reproducer: str = ""
    reproducer_choices: tuple[int, ...] = ()


def minimize(failure: Failure, case: PassCase, *, budget: int = 300) -> Failure:
    """Shrink ``failure`` to the smallest graph failing ``case`` with the same signature; fills in its reproducer."""

    def fails(values: Sequence[int]) -> bool:
        graph = replay(values)
        return graph.runnable() and check(graph, case).signature == failure.outcome.signature

    values = list(failure.choices)
    spent = 0
    deleted = True
    while deleted and spent < budget // 2:  # whole steps first: the cheapest way to a small graph
        deleted = False
        for start, end in reversed(replay(values).steps):
            spent += 1
            candidate = values[:start] + values[end:]
            if fails(candidate):
                values, deleted = candidate, True
                break
    values = shrink(values, fails, budget=budget - spent)
    graph = replay(values)
    failure.reproducer, failure.reproducer_choices = graph.text(), graph.choices
    if graph.runnable() and (outcome := check(graph, case)).signature == failure.outcome.signature:
        failure.outcome = outcome  # the detail (output names, sizes) of the reproducer, not of the first graph
    return failure


@dataclasses.dataclass
class Sweep:
    graphs: int = 0
    #: generated graphs ONNX Runtime's optimizer refuses to load (no reference to compare with; not checked)
    skipped: int = 0
    #: case label → outcome kind → count
    cases: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    #: the first failure of each signature
    failures: dict[tuple, Failure] = dataclasses.field(default_factory=dict)
    #: exact case label → graph dtype → the largest relative output error where the case held
    errors: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

    def add(self, outcome: Outcome, choices: tuple[int, ...]) -> None:
        counts = self.cases.setdefault(outcome.case, {})
        counts[outcome.kind] = counts.get(outcome.kind, 0) + 1
        if outcome.error is not None:
            worst = self.errors.setdefault(outcome.case, {})
            worst[outcome.dtype] = max(worst.get(outcome.dtype, 0.0), outcome.error)
        if outcome.failed and outcome.signature not in self.failures:
            self.failures[outcome.signature] = Failure(outcome, choices)

    def by_kind(self, kind: str) -> dict[str, int]:
        return {case: counts[kind] for case, counts in self.cases.items() if counts.get(kind)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "graphs": self.graphs,
            "graphs_skipped": self.skipped,
            "cases_per_pass": {case: sum(counts.values()) for case, counts in self.cases.items()},
            "crashes": self.by_kind("crash"),
            "mismatches": self.by_kind("mismatch"),
            "contract_violations": self.by_kind("contract"),
            "declines": self.by_kind("decline"),
            "max_relative_error": {case: {d: float(f"{e:.3g}") for d, e in sorted(v.items())} for case, v in self.errors.items()},
            "failures": [
                {
                    "pass": f.outcome.case,
                    "kind": f.outcome.kind,
                    "reason": f.outcome.reason,
                    "detail": f.outcome.detail,
                    "choices": list(f.reproducer_choices or f.choices),
                    "reproducer": f.reproducer,
                }
                for f in self.failures.values()
            ],
        }


def merge_reports(shards: list[dict]) -> dict:
    """One report from the reports of shards of one seed (``benchmarks/fuzz.py``): counts summed, the worst error of each case kept, the first failure
    of each (pass, kind, reason) kept (shards in graph order). Refuses overlapping shards."""
    shards = sorted(shards, key=lambda r: r.get("start", 0))
    for a, b in zip(shards, shards[1:]):
        if a.get("start", 0) + a["graphs"] > b.get("start", 0):
            raise BitfoldError(f"fuzz shards overlap: graphs from {a.get('start', 0)} ({a['graphs']}) and from {b.get('start', 0)}; remove one")
    last = shards[-1]
    merged = {key: last[key] for key in ("command", "commit", "machine", "seed", "tolerance", "exact_cases", "lossy_cases")}
    merged["command"] = "python benchmarks/fuzz.py --start S --graphs N (one shard per range; see shards)"
    merged["shards"] = [{"start": r.get("start", 0), "graphs": r["graphs"], "commit": r["commit"], "command": r["command"],
                         "seconds": r["seconds"]} for r in shards]  # fmt: skip
    merged["graphs"] = sum(r["graphs"] for r in shards)
    merged["graphs_skipped"] = sum(r["graphs_skipped"] for r in shards)
    merged["seconds"] = {key: round(sum(r["seconds"][key] for r in shards), 1) for key in ("sweep", "total")}
    for key in ("cases_per_pass", "crashes", "mismatches", "contract_violations", "declines"):
        merged[key] = {}
        for r in shards:
            for case, n in r[key].items():
                merged[key][case] = merged[key].get(case, 0) + n
    merged["max_relative_error"] = {}
    for r in shards:
        for case, by_dtype in r["max_relative_error"].items():
            worst = merged["max_relative_error"].setdefault(case, {})
            for dtype, error in by_dtype.items():
                worst[dtype] = max(worst.get(dtype, 0.0), error)
    seen, merged["failures"] = set(), []
    for r in shards:
        for failure in r["failures"]:
            signature = (failure["pass"], failure["kind"], failure["reason"])
            if signature not in seen:
                seen.add(signature)
                merged["failures"].append(failure)
    return merged


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence what passes write to ``sys.stderr`` (calibration progress bars) while they run."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        yield


def check_graph(task: tuple[str | int, int, Sequence[PassCase]]) -> tuple[tuple[int, ...], list[Outcome]]:
    """Build graph ``index`` of ``seed`` and check every case on it: (its choices, the outcomes)."""
    seed, index, cases = task
    with _quiet():
        source = RandomChoices(f"{seed}:{index}")
        graph = build_graph(source)
        if not graph.runnable():
            return tuple(source.record), []
        return tuple(source.record), [check(graph, case) for case in cases]


def _minimize_task(task: tuple[Failure, PassCase, int]) -> Failure:
    failure, case, budget = task
    if failure.outcome.reason == DIED:  # checking it again here would kill this process too: keep the whole graph
        graph = replay(failure.choices)
        failure.reproducer, failure.reproducer_choices = graph.text(), graph.choices
        return failure
    with _quiet():
        return minimize(failure, case, budget=budget)


@contextlib.contextmanager
def _mapper(jobs: int) -> Iterator[Callable]:
    """An ordered, lazy ``map`` over ``jobs`` processes (in this process when ``jobs`` is 1)."""
    if jobs <= 1:
        yield map
        return
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        yield pool.imap


def sweep(
    graphs: int,
    seed: str | int = 0,
    cases: Sequence[PassCase] | None = None,
    *,
    jobs: int = 1,
    start: int = 0,
    isolate: bool = False,
    on_graph: Callable[[Sweep], None] | None = None,
) -> Sweep:
    """Check every case on ``graphs`` random graphs, graphs ``start`` .. ``start + graphs - 1`` (graph i built from the
    seed ``f"{seed}:{i}"``), keeping the first failure of each signature (not yet shrunk: see
    :func:`minimize_failures`).

    ``isolate`` runs the checks in ``jobs`` worker processes that may die: a case that kills its process (a
    segfault in a runtime) is found by rerunning that graph one case per process, and counts as a crash with the
    reason :data:`DIED`; the sweep goes on."""
    cases = tuple(pass_cases() if cases is None else cases)
    result = Sweep()
    tasks = [(seed, i, cases) for i in range(start, start + graphs)]
    with contextlib.ExitStack() as stack:
        checked = _isolated_checks(tasks, jobs) if isolate else stack.enter_context(_mapper(jobs))(check_graph, tasks)
        for choices, outcomes in checked:
            for outcome in outcomes:
                result.add(outcome, choices)
            result.graphs += 1
            result.skipped += not outcomes
            if on_graph:
                on_graph(result)
    return result


#: The reason of a crash that killed the checking process (a segfault or abort inside a runtime).
DIED = "the process died (a signal, e.g. a segfault in ONNX Runtime)"


def _isolated_checks(tasks: list[tuple], jobs: int, check: Callable = check_graph) -> Iterator[tuple[tuple[int, ...], list[Outcome]]]:
    """``check`` (:func:`check_graph`) of every task, in order, in ``jobs`` spawned processes. When a process dies, the graphs
    it may have held are rerun alone (:func:`_check_alone`) and the pool is replaced."""
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max(jobs, 1), mp_context=context)
    window: deque = deque()
    queue = iter(tasks)
    try:
        while True:
            while len(window) < 2 * max(jobs, 1) and (task := next(queue, None)) is not None:
                window.append((task, pool.submit(check, task)))
            if not window:
                return
            task, future = window.popleft()
            try:
                yield future.result()
            except BrokenProcessPool:
                pool.shutdown(wait=True, cancel_futures=True)
                redo = [task, *(t for t, _ in window)]
                window.clear()
                for again in redo:
                    yield _check_alone(again, context, check)
                pool = ProcessPoolExecutor(max(jobs, 1), mp_context=context)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _check_alone(task: tuple, context, check: Callable = check_graph) -> tuple[tuple[int, ...], list[Outcome]]:
    """``check(task)`` in a fresh process; if that process dies, each case again in its own, so the case that
    kills it is reported as a crash (:data:`DIED`) and the others keep their outcomes."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(1, mp_context=context) as pool:
        try:
            return pool.submit(check, task).result()
        except BrokenProcessPool:
            pass
    seed, index, cases = task
    outcomes, choices = [], ()
    for case in cases:
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            try:
                choices, found = pool.submit(check, (seed, index, (case,))).result()
                outcomes.extend(found)
            except BrokenProcessPool:
                dtype = replay(choices).dtype if choices else ""
                outcomes.append(Outcome(case.label, "crash", DIED, f"{case.label} killed the process checking graph {seed}:{index}", dtype))
    if not choices:  # every case died: the choices come from building the graph here (building never runs a pass)
        source = RandomChoices(f"{seed}:{index}")
        build_graph(source)
        choices = tuple(source.record)
    return choices, outcomes


def minimize_failures(
    result: Sweep, cases: Sequence[PassCase] | None = None, *, jobs: int = 1, budget: int = 300,
    on_failure: Callable[[Failure], None] | None = None,
) -> None:
    """Shrink every failure of ``result`` in place (see :func:`minimize`)."""
    by_label = {case.label: case for case in (pass_cases() if cases is None else cases)}
    failures = list(result.failures.values())
    with _mapper(jobs) as mapper:
        tasks = [(f, by_label[f.outcome.case], budget) for f in failures]
        for key, shrunk in zip(list(result.failures), mapper(_minimize_task, tasks), strict=True):
            result.failures[key] = shrunk
            if on_failure:
                on_failure(shrunk)
