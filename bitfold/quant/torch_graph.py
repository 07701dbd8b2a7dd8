"""A differentiable interpreter of an ONNX graph (onnx-ir) in torch.

:class:`TorchGraph` runs a graph, or the block of it that a set of its nodes forms, node by node with the torch ops
of :data:`OPS`, so autograd reaches every float tensor: a block-reconstruction pass can learn quantizer parameters
over any block of any ONNX graph without a second model definition per architecture.

What it guarantees: ONNX semantics (opsets 17–21) for every op in :data:`OPS`, equal to ONNX Runtime up to float
rounding. Every float tensor is computed in ``dtype`` (float32 by default) whatever its type in the graph; a Cast to
float16 or bfloat16 rounds through that type, a Cast to another float type leaves a float tensor as it is. Integer
tensors are int64, booleans bool. Ops that take axes, split sizes or bounds as an input in newer opsets (ReduceMean, Split,
Squeeze, Unsqueeze, Clip, ...) also read the attribute of older opsets.

Constants (initializers, ``const_value``\\ s, Constant nodes' outputs) become buffers, or
:class:`torch.nn.Parameter`\\ s where ``trainable(value)`` is true; :attr:`TorchGraph.parameters_by_name` maps ONNX
names to those parameters. A graph input that is also an initializer is fed, as ONNX Runtime would let it be.

QuantizeLinear / DequantizeLinear (integer types, per tensor, per axis or per block) are fake quantization: the
codes stay a float tensor and rounding passes gradients straight through (zero outside the clamp), so a pass can
learn weights under the activation quantization of a QDQ graph; with :attr:`TorchGraph.fake_quantize` off, every
Q/DQ pair on a float tensor passes it through: the same module computes the float model.

What it refuses, at construction and with a :class:`~bitfold.errors.BitfoldError`: ops outside :data:`OPS` (control
flow, contrib ops), non-numeric constants, trainable integer constants. At run time: fp8 QuantizeLinear, Conv
``auto_pad`` SAME_*, ConvTranspose ``output_shape``, training-mode BatchNormalization. It infers no shapes: they
come from the tensors fed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from bitfold.errors import BitfoldError, InputSpecError

Tensors = list[torch.Tensor | None]
Op = Callable[[ir.Node, Tensors], list[torch.Tensor]]

#: (domain, op_type) → op; domain "" is ONNX. An op takes the node and its input tensors (None for a missing optional
#: input) and returns its output tensors; float outputs may be of any float type, the interpreter brings them to
#: its ``dtype``.
OPS: dict[tuple[str, str], Op] = {}

_NARROW_FLOATS = {ir.DataType.FLOAT16: torch.float16, ir.DataType.BFLOAT16: torch.bfloat16}
_NARROW_INTS = {ir.DataType.INT8: torch.int8, ir.DataType.UINT8: torch.uint8, ir.DataType.INT16: torch.int16,
                ir.DataType.INT32: torch.int32}  # fmt: skip


class TorchGraph(torch.nn.Module):
    """``graph``, or the block formed by ``nodes``, as a torch module: ``forward`` takes the input tensors
    (positionally in :attr:`input_names` order, or by ONNX name) and returns {output name: tensor}.

    With ``nodes``, ``inputs`` default to the values the nodes read that none of them produces and that are not
    constant, and ``outputs`` to the values they produce that are read outside the set or are graph outputs.
    """

    def __init__(
        self, graph: ir.Graph, *, nodes: Sequence[ir.Node] | None = None, inputs: Sequence[ir.Value] | None = None,
        outputs: Sequence[ir.Value] | None = None, trainable: Callable[[ir.Value], bool] = lambda v: False,
        dtype: torch.dtype = torch.float32,
    ) -> None:  # fmt: skip
        super().__init__()
        self.dtype = dtype
        #: False: each QuantizeLinear of a float tensor, and the DequantizeLinear that reads its codes, pass the
        #: tensor through unchanged: the float model the Q/DQ pairs were inserted into
        self.fake_quantize = True
        block = _block(graph, nodes)
        if nodes is None:
            inputs = graph.inputs if inputs is None else inputs
            outputs = graph.outputs if outputs is None else outputs
        found, constants = _boundary(block, inputs)
        self.input_names = [v.name for v in (found if inputs is None else inputs)]
        self.output_names = [v.name for v in (_block_outputs(block) if outputs is None else outputs)]
        self._nodes = [node for node in block if not _is_constant(node)]
        self._ops = [_op(node) for node in self._nodes]
        # the names each node reads, as built: a pass may rewire the graph's nodes (emit a block's quantized weights)
        # while the module still runs the block it was built from
        self._reads = [[None if v is None else v.name for v in node.inputs] for node in self._nodes]
        known = {*self.input_names, *(v.name for v in constants), *(v.name for n in self._nodes for v in n.outputs)}
        for name in self.output_names:
            if name not in known:
                raise BitfoldError(f"output '{name}' is not computed by the block; name a value its nodes produce.")
        self._needed = {v.name for n in self._nodes for v in n.inputs if v is not None} | set(self.output_names)
        self._attrs = {value.name: self._hold(i, value, trainable(value)) for i, value in enumerate(constants)}

    def _hold(self, index: int, value: ir.Value, trainable: bool) -> str:
        """Registers constant ``value`` as a buffer or a parameter; returns the attribute name it lives under."""
        tensor = _to_torch(ir.convenience.get_const_tensor(value), self.dtype, value.name)
        if not trainable:
            self.register_buffer(f"const_{index}", tensor)
            return f"const_{index}"
        if not tensor.is_floating_point():
            raise BitfoldError(f"constant '{value.name}' is not a float tensor and cannot be trained; leave it out of trainable.")
        self.register_parameter(f"param_{index}", torch.nn.Parameter(tensor))
        return f"param_{index}"

    @property
    def parameters_by_name(self) -> dict[str, torch.nn.Parameter]:
        """ONNX value name → the parameter that holds it (the constants ``trainable`` chose)."""
        return {name: p for name, attr in self._attrs.items() if isinstance(p := getattr(self, attr), torch.nn.Parameter)}

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        env = {name: getattr(self, attr) for name, attr in self._attrs.items()}
        env.update(self._feeds(args, kwargs))
        passed: set[str] = set()  # Q outputs that carry a float tensor through (fake_quantize off)
        for node, op, reads in zip(self._nodes, self._ops, self._reads, strict=True):
            xs = [None if name is None else env[name] for name in reads]
            if not self.fake_quantize and not node.domain and node.op_type in ("QuantizeLinear", "DequantizeLinear") and (
                    node.op_type == "QuantizeLinear" or reads[0] in passed):  # fmt: skip
                passed.add(node.outputs[0].name)
                env[node.outputs[0].name] = xs[0]
                continue
            results = op(node, xs)
            for value, tensor in zip(node.outputs, results):
                env[value.name] = tensor.to(self.dtype) if tensor.is_floating_point() else tensor
            for value in node.outputs[len(results) :]:
                if value.name in self._needed:
                    raise BitfoldError(f"{node.op_type} node '{node.name}' output {value.index()} ('{value.name}') is not supported; only its first {len(results)} are.")
        return {name: env[name] for name in self.output_names}

    def _feeds(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        if len(args) > len(self.input_names):
            raise InputSpecError(f"the block takes {len(self.input_names)} inputs ({', '.join(self.input_names)}) but got {len(args)}.")
        feeds = dict(zip(self.input_names, args))
        for name, x in kwargs.items():
            if name not in self.input_names or name in feeds:
                raise InputSpecError(f"input '{name}' is {'given twice' if name in feeds else 'not an input of the block'}; the inputs are {', '.join(self.input_names)}.")
            feeds[name] = x
        missing = [f"'{name}'" for name in self.input_names if name not in feeds]
        if missing:
            raise InputSpecError(f"input {', '.join(missing)} of the block was not fed; pass it positionally or by name.")
        return {name: self._lift(torch.as_tensor(x)) for name, x in feeds.items()}

    def _lift(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():
            return x.to(self.dtype)
        return x if x.dtype == torch.bool else x.to(torch.int64)


def _block(graph: ir.Graph, nodes: Sequence[ir.Node] | None) -> list[ir.Node]:
    if nodes is None:
        return list(graph)
    chosen = set(nodes)
    block = [node for node in graph if node in chosen]
    if len(block) != len(chosen):
        raise BitfoldError("some of the nodes given to TorchGraph are not in the graph's top level; pass nodes of that graph.")
    return block


def _boundary(block: Sequence[ir.Node], inputs: Sequence[ir.Value] | None) -> tuple[list[ir.Value], list[ir.Value]]:
    """(the values the block reads from outside that are not constant, the constants it reads or makes), in order of
    first use; with ``inputs`` given, a value of the first kind that is not among them is refused."""
    skip = {v.name for v in inputs or ()} | {v.name for node in block if not _is_constant(node) for v in node.outputs}
    found: dict[str, ir.Value] = {}
    constants: dict[str, ir.Value] = {}
    for node in block:
        for value in node.outputs if _is_constant(node) else node.inputs:
            if value is None or value.name in skip or value.name in found or value.name in constants:
                continue
            if ir.convenience.get_const_tensor(value) is not None:
                constants[value.name] = value
            elif inputs is None:
                found[value.name] = value
            else:
                raise BitfoldError(f"value '{value.name}' read by the block is neither fed, computed nor constant; add it to the inputs.")
    return list(found.values()), list(constants.values())


def _block_outputs(nodes: Sequence[ir.Node]) -> list[ir.Value]:
    inside = set(nodes)
    return [
        value for node in nodes for value in node.outputs
        if value.is_graph_output() or any(user not in inside for user, _ in value.uses())
    ]  # fmt: skip


def _is_constant(node: ir.Node) -> bool:
    return node.op_type == "Constant" and node.domain in ("", "ai.onnx")


def _op(node: ir.Node) -> Op:
    domain = "" if node.domain == "ai.onnx" else node.domain
    if (domain, node.op_type) not in OPS:
        raise BitfoldError(f"TorchGraph has no torch version of op '{node.op_type}'{f' (domain {domain})' if domain else ''} at node '{node.name}'; leave the node out of the block or add the op to OPS.")
    return OPS[(domain, node.op_type)]


def _to_torch(tensor: ir.TensorProtocol, dtype: torch.dtype, name: str) -> torch.Tensor:
    kind = tensor.dtype
    if kind.is_floating_point():
        return torch.tensor(np.asarray(tensor.numpy(), np.float64)).to(dtype)
    if kind.is_integer():
        return torch.tensor(np.asarray(tensor.numpy(), np.int64))
    if kind == ir.DataType.BOOL:
        return torch.tensor(np.asarray(tensor.numpy(), np.bool_))
    raise BitfoldError(f"constant '{name}' has type {kind.name}, which TorchGraph cannot hold; only numeric constants are supported.")


# ---- the op table -------------------------------------------------------------------------------------------------


def register(*op_types: str, domain: str = "") -> Callable[[Op], Op]:
    """Decorator adding an op to :data:`OPS` under each of ``op_types``."""

    def add(fn: Op) -> Op:
        for op_type in op_types:
            OPS[(domain, op_type)] = fn
        return fn

    return add


def _elementwise(fn: Callable[..., torch.Tensor]) -> Op:
    return lambda node, xs: [fn(*xs)]


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a / b if a.is_floating_point() else torch.div(a, b, rounding_mode="trunc")


_ELEMENTWISE: dict[str, Callable[..., torch.Tensor]] = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": _div, "Pow": lambda a, b: torch.pow(a, b).to(a.dtype),
    "Neg": torch.neg, "Sqrt": torch.sqrt, "Reciprocal": torch.reciprocal, "Exp": torch.exp, "Log": torch.log,
    "Abs": torch.abs, "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Erf": torch.erf,
    "Cos": torch.cos, "Sin": torch.sin, "Floor": torch.floor, "Ceil": torch.ceil, "Round": torch.round,
    "MatMul": torch.matmul, "Where": torch.where, "Equal": torch.eq, "Less": torch.lt, "LessOrEqual": torch.le,
    "Greater": torch.gt, "GreaterOrEqual": torch.ge, "Not": torch.logical_not, "And": torch.logical_and,
    "Or": torch.logical_or, "Xor": torch.logical_xor, "Identity": lambda x: x,
    "Max": lambda *xs: functools.reduce(torch.maximum, xs), "Min": lambda *xs: functools.reduce(torch.minimum, xs),
    "Sum": lambda *xs: functools.reduce(torch.add, xs),
}  # fmt: skip
OPS.update({("", op_type): _elementwise(fn) for op_type, fn in _ELEMENTWISE.items()})


def _ints(node: ir.Node, xs: Tensors, index: int, name: str) -> list[int] | None:
    """Integers given as input ``index`` (newer opsets) or as attribute ``name`` (older ones); None if neither."""
    if len(xs) > index and xs[index] is not None:
        return [int(v) for v in xs[index].reshape(-1).tolist()]
    values = node.attributes.get_ints(name)
    return None if values is None else list(values)


@register("Constant")
def _constant(node: ir.Node, xs: Tensors) -> list[torch.Tensor]:
    return [_to_torch(ir.convenience.get_const_tensor(node.outputs[0]), torch.float64, node.outputs[0].name)]


@register("Gelu")
def _gelu(node: ir.Node, xs: Tensors) -> list[torch.Tensor]:
    return [F.gelu(xs[0], approximate=node.attributes.get_string("approximate", "none"))]


@register("Softmax", "LogSoftmax")
def _softmax(node: ir.Node, xs: Tensors) -> list[torch.Tensor]:
    fn = F.softmax if node.op_type == "Softmax" else F.log_softmax
    return [fn(xs[0], dim=node.attributes.get_int("axis", -1))]


@register("Gemm")
def _gemm(node: ir.Node, xs: Tensors) -> list[torch.Tensor]:
    a, b, c = (*xs, None)[:3]
    a = a.T if node.attributes.get_int("transA", 0) else a
    b = b.T if node.attributes.get_int("transB", 0) else b
    y = (a @ b) * node.attributes.get_float("alpha", 1.0)
    return [y if c is None else y + c * node.attributes.get_float("beta", 1.0)]


def _conv_geometry(node: ir.Node, rank: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """(strides, dilations, pads at the start, pads at the end) of a Conv or ConvTranspose over ``rank`` axes."""
    auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID"):
        raise BitfoldError(f"{node.op_type} node '{node.name}' uses auto_pad {auto_pad}, which TorchGraph does not support; export it with explicit pads.")
    if rank not in (1, 2, 3):
        raise BitfoldError(f"{node.op_type} node '{node.name}' convolves over {rank} axes; TorchGraph supports 1 to 3.")
    pads = list(node.attributes.get_ints("pads", [0] * 2 * rank)) if auto_pad == "NOTSET" else [0] * 2 * rank
    strides = list(node.attributes.get_ints("strides", [1] * rank))
    return strides, list(node.attributes.get_ints("dilations", [1] * rank)), pads[:rank], pads[rank:]


def _pad_arg(begin: Sequence[int], end: Sequence[int]) -> list[int]:
    """F.pad's argument (last axis first) for per-axis ``begin`` and ``end`` pads."""
    return [p for axis in reversed(range(len(begin))) for p in (begin[axis], end[axis])]


@register("Conv")
def _conv(node: ir.Node, xs: Tensors) -> list[torch.Tensor]:
    x, w, b = (*xs, None)[:3]
    rank = w.dim() - 2
    strides, dilations, begin, end = _conv_geometry(node, rank)
    if begin != end:
        x, begin = F.pad(x, _pad_arg(begin, end)), [0] * rank
    fn = (F.conv1d, F.conv2d, F.conv3d)[rank - 1]
    return [fn(x, w, b, strides, begin, dilations, node.attributes.get_int("group", 1))]


@register("ConvTranspose")
def _conv_transpose(node: ir.Node, xs: Tensors) -> list[torch.Tensor]:
    x, w, b = (*xs, None)[:3]
    rank = w.dim() - 2
    if "output_shape" in node.attributes:
        raise BitfoldError(f"ConvTranspose node '{node.name}' sets output_shape, which TorchGraph does not support; give pads instead.")
    strides, dilations, begin, end = _conv_geometry(node, rank)
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[rank - 1]
    y = fn(x, w, None, strides, 0, 0, node.attributes.get_int("group", 1), dilations)
    extra = node.attributes.get_ints("output_padding", [0] * rank)
    y = F.pad(y, _pad_arg([-p for p in begin], [o - p for o, p in zip(extra, end, strict=True)]))
    return [y if b is None else y + b.reshape(1, -1, *[1] * rank)]


def _channels(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t.reshape(1, -1, *[1] * (rank - 2))


@register("BatchNormalization")
def _batch_norm(node: ir.Node, xs: Tensors) -> list[torch.Tensor]:
    if node.attributes.get_int("training_mode", 0):
        raise BitfoldError(f"BatchNormalization node '{node.name}' is in training mode; TorchGraph runs inference only.")
    x, scale, bias, mean, var = xs
    inv = torch.rsqrt(var + node.attributes.get_float("epsilon", 1e-5))
    return [(x - _channels(mean, x.dim())) * _channels(inv * scale, x.dim()) + _channels(bias, x.dim())]


@register("LayerNormalization")
def _layer_norm(node: ir.Node, xs: Tensors) -> list[torch.Tensor]:
    x, scale, bias = (*xs, None)[:3]
    dims = tuple(range(node.attributes.get_int("axis", -1) % x.dim(), x.dim()))
    mean = x.mean(dims, keepdim=True)
    inv = torch.rsqrt((x - mean).square().mean(dims, keepdim=True) + node.attributes.get_float("epsilon", 1e-5))
    y = (x - mean) * inv * scale
    return [y if bias is None else y + bias, mean, inv]


def _reduce(fn: Callable[..., torch.Tensor]) -> Op:
    def reduce(node: ir.Node, xs: Tensors) -> list[torch.Tensor]:
        x, axes = xs[0], _ints(node, xs, 1, "axes")
        if not axes:
            if node.attributes.get_int("noop_with_empty_axes", 0):
                return [x]
            axes = list(range(x.dim()))
        return [fn(x, dim=tuple(axes), keepdim=bool(node.attributes.get_int("keepdims", 1)))]

    return reduce


OPS.update({("", "ReduceMean"): _reduce(torch.mean), ("", "ReduceSum"): _reduce(torch.sum),
            ("", "ReduceMax"): _reduce(torch.amax), ("", "ReduceMin"): _reduce(torch.amin),
            ("", "ReduceL2"): _reduce(lambda x, dim, keepdim: torch.linalg.vector_norm(x, 2, dim, keepdim)),
            ("", "ReduceL1"): _reduce(lambda x, dim, keepdim: torch.linalg.vector_norm(x, 1, dim, keepdim)),
            ("", "ReduceSumSquare"): _reduce(lambda x, dim, keepdim: (x * x).sum(dim, keepdim))})  # fmt: skip


@register("Reshape")
def _reshape(node: ir.Node, xs: Tensors) -> list[torch.Tensor]:
    x, shape = xs[0], xs[1].tolist()
    if not node.attributes.get_int("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x.reshape(shape)]


@register("Transpose")
def _transpose(node: ir.Node, xs: Tensors) -> list[torch.Tensor]:
    x = xs[0]
    return [x.permute(list(node.attributes.get_ints("perm", range(x.dim() - 1, -1, -1))))]


@register("Concat")
def _concat(node: ir.Node, xs: Tensors) -> list[torch.Tensor]:
    return [torch.cat(xs, dim=node.attributes.get_int("axis", 0))]


@register("Split")
def _split(node: ir.Node, xs: Tensors) -> list[torch.Tensor]:
    x, axis = xs[0], node.attributes.get_int("axis", 0)
    sizes = _ints(node, xs, 1, "split")
    if sizes is None:
        parts = node.attributes.get_int("num_outputs", len(node.outputs))
        size = -(-x.shape[axis] // parts)
        sizes = [size] * (parts - 1) + [x.shape[axis] - size * (parts - 1)]
    return list(torch.split(x, sizes, dim=axis))


def _clamp_index(i: int, dim: int, step: int) -> int:
    i = i + dim if i < 0 else i
    return min(max(i, 0), dim) if step > 0 else min(max(i, -1), dim - 1)


@register("Slice")
def _slice(node: ir.Node, xs: Tensors) -> list[torch.Tensor]:
    x = xs[0]
    starts, ends = _ints(node, xs, 1, "starts"), _ints(node, xs, 2, "ends")
    axes = _ints(node, xs, 3, "axes") or list(range(len(starts)))
    steps = _ints(node, xs, 4, "steps") or [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis, dim = axis % x.dim(), x.shape[axis]
        start, end = _clamp_index(start, dim, step), _clamp_index(end, dim, step)
        if step > 0:
            x = x[(slice(None),) * axis + (slice(start, end, step),)]
        else:
            x = x.index_select(axis, torch.tensor(range(start, end, step), dtype=torch.int64, device=x.device))
    return [x]


@register("Gather")
def _gather(node: ir.Node, xs: Tensors) -> list[torch.Tensor]:
    x, indices = xs
    axis = node.attributes.get_int("axis", 0) % x.dim()
    indices = torch.where(indices < 0, indices + x.shape[axis], indices)
    y = x.index_select(axis, indices.reshape(-1))
    return [y.reshape(*x.shape[:axis], *indices.shape, *x.shape[axis + 1 :])]


@register("Unsqueeze")
def _unsqueeze(node: ir.Node, xs: Tensors) -> list[torch.Tensor]:
    x, axes = xs[0], _ints(node, xs, 1, "axes")
    for axis in sorted(a % (x.dim() + len(axes)) for a in axes):
        x = x.unsqueeze(axis)
    return [x]


@register("Squeeze")
def _squeeze(node: ir.Node, xs: Tensors) -> list[torch.Tensor]:
    x, axes = xs[0], _ints(node, xs, 1, "axes")
    return [x.squeeze(tuple(a % x.dim() for a in axes)) if axes else x.squeeze()]


@register("Expand")
def _expand(node: ir.Node, xs: Tensors) -> list[torch.Tensor]:
    x, shape = xs
    return [x.expand(torch.broadcast_shapes(x.shape, tuple(shape.tolist())))]


@register("Shape")
def _shape(node: ir.Node, xs: Tensors) -> list[torch.Tensor]:
    dims = xs[0].shape[node.attributes.get_int("start", 0) : node.attributes.get_int("end")]
    return [torch.tensor(dims, dtype=torch.int64)]


@register("ConstantOfShape")
def _constant_of_shape(node: ir.Node, xs: Tensors) -> list[torch.Tensor]:
    value = node.attributes.get_tensor("value")
    fill = torch.zeros(1) if value is None else _to_torch(value, torch.float64, node.name)
    return [torch.full(xs[0].tolist(), fill.reshape(-1)[0].item(), dtype=fill.dtype)]


@register("Range")
def _range(node: ir.Node, xs: Tensors) -> list[torch.Tensor]:
    start, limit, delta = (float(t) for t in xs)
    count = max(math.ceil((limit - start) / delta), 0)
    return [xs[0] + xs[2] * torch.arange(count, dtype=xs[0].dtype)]


def _cast(x: torch.Tensor, to: ir.DataType, node: ir.Node) -> torch.Tensor:
    if to in _NARROW_FLOATS:
        return x.to(_NARROW_FLOATS[to])
    if to.is_floating_point():
        return x if x.is_floating_point() else x.to(torch.float64)
    if to.is_integer():
        return x.to(_NARROW_INTS.get(to, torch.int64)).to(torch.int64)
    if to == ir.DataType.BOOL:
        return x != 0
    raise BitfoldError(f"{node.op_type} node '{node.name}' casts to {to.name}, which TorchGraph does not support; cast to a numeric type.")


@register("Cast")
def _cast_op(node: ir.Node, xs: Tensors) -> list[torch.Tensor]:
    return [_cast(xs[0], ir.DataType(node.attributes.get_int("to")), node)]


@register("IsNaN")
def _isnan(node: ir.Node, xs: Tensors) -> list[torch.Tensor]:
    return [torch.isnan(xs[0])]


@register("IsInf")
def _isinf(node: ir.Node, xs: Tensors) -> list[torch.Tensor]:
    x = xs[0]
    negative, positive = node.attributes.get_int("detect_negative", 1), node.attributes.get_int("detect_positive", 1)
    return [(torch.isneginf(x) if negative else torch.zeros_like(x, dtype=torch.bool)) | (torch.isposinf(x) if positive else False)]


@register("GatherND")
def _gather_nd(node: ir.Node, xs: Tensors) -> list[torch.Tensor]:
    data, indices = xs[0], xs[1]
    b = node.attributes.get_int("batch_dims", 0)
    k = indices.shape[-1]
    batches = math.prod(data.shape[:b])
    flat = data.reshape(batches, *data.shape[b:])
    idx = indices.reshape(batches, -1, k)
    idx = torch.where(idx < 0, idx + torch.tensor(data.shape[b : b + k]), idx)
    rows = torch.arange(batches)[:, None].expand(-1, idx.shape[1])
    return [flat[(rows, *idx.unbind(-1))].reshape(*indices.shape[:-1], *data.shape[b + k :])]


@register("Trilu")
def _trilu(node: ir.Node, xs: Tensors) -> list[torch.Tensor]:
    k = int(xs[1]) if len(xs) > 1 and xs[1] is not None else 0
    return [(torch.triu if node.attributes.get_int("upper", 1) else torch.tril)(xs[0], k)]


@register("Clip")
def _clip(node: ir.Node, xs: Tensors) -> list[torch.Tensor]:
    x, low, high = (*xs, None, None)[:3]
    if len(xs) == 1:
        low, high = node.attributes.get_float("min"), node.attributes.get_float("max")
    return [x if low is None and high is None else torch.clamp(x, low, high)]


@register("Pad")
def _pad(node: ir.Node, xs: Tensors) -> list[torch.Tensor]:
    x = xs[0]
    pads = _ints(node, xs, 1, "pads")
    value = xs[2] if len(xs) > 2 and xs[2] is not None else None
    if value is None and len(xs) < 2:  # opset < 11: the fill value is an attribute
        value = node.attributes.get_float("value", 0.0)
    axes = _ints(node, xs, 3, "axes") or list(range(x.dim()))
    axes = [a % x.dim() for a in axes]
    begin, end = [0] * x.dim(), [0] * x.dim()
    for i, axis in enumerate(axes):
        begin[axis], end[axis] = pads[i], pads[i + len(axes)]
    mode = node.attributes.get_string("mode", "constant")
    if mode == "constant":
        fill = 0.0 if value is None else float(value)
        return [F.pad(x, _pad_arg(begin, end), value=fill)]
    modes = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}
    if mode not in modes:
        raise BitfoldError(f"Pad node '{node.name}' uses mode '{mode}', which TorchGraph does not support.")
    padded = [a for a in range(x.dim()) if begin[a] or end[a]]
    if not padded:
        return [x]
    # torch pads the trailing axes of a (batch, channel, *spatial) tensor: move the padded axes last
    keep = [a for a in range(x.dim()) if a not in padded]
    y = x.permute(keep + padded)
    lead = y.shape[: len(keep)]
    y = y.reshape(1, -1, *y.shape[len(keep) :]) if len(padded) < 3 else y.reshape(-1, *y.shape[len(keep) :])
    y = F.pad(y, _pad_arg([begin[a] for a in padded], [end[a] for a in padded]), mode=modes[mode])
    y = y.reshape(*lead, *y.shape[-len(padded) :])
    return [y.permute(*[(keep + padded).index(a) for a in range(x.dim())])]


@register("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(node: ir.Node, xs: Tensors) -> list[torch.Tensor]:
    dims = tuple(range(2, xs[0].dim()))
    return [xs[0].mean(dims, keepdim=True) if node.op_type == "GlobalAveragePool" else xs[0].amax(dims, keepdim=True)]


@register("Flatten")
def _flatten(node: ir.Node, xs: Tensors) -> list[torch.Tensor]:
    x = xs[0]
    axis = node.attributes.get_int("axis", 1) % (x.dim() + 1)
    return [x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))]


@register("HardSigmoid", "HardSwish")
def _hard(node: ir.Node, xs: Tensors) -> list[torch.Tensor]:
    alpha = node.attributes.get_float("alpha", 0.2 if node.op_type == "HardSigmoid" else 1 / 6)
    gate = torch.clamp(alpha * xs[0] + node.attributes.get_float("beta", 0.5), 0.0, 1.0)
    return [gate if node.op_type == "HardSigmoid" else xs[0] * gate]


@register("MaxPool", "AveragePool")
def _pool(node: ir.Node, xs: Tensors) -> list[torch.Tensor]:
    x = xs[0]
    rank = x.dim() - 2
    kernel = list(node.attributes.get_ints("kernel_shape"))
    strides, dilations, begin, end = _conv_geometry(node, rank)
    ceil = bool(node.attributes.get_int("ceil_mode", 0))
    if node.op_type == "MaxPool":
        if begin != end:
            x, begin = F.pad(x, _pad_arg(begin, end), value=-math.inf), [0] * rank
        fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[rank - 1]
        return [fn(x, kernel, strides, begin, dilations, ceil_mode=ceil)]
    if any(d != 1 for d in dilations):
        raise BitfoldError(f"AveragePool node '{node.name}' is dilated, which TorchGraph does not support.")
    include = bool(node.attributes.get_int("count_include_pad", 0))
    if begin != end or ceil and not include:  # pad explicitly; count only the real elements unless asked otherwise
        ones = torch.ones_like(x[:1, :1])
        x, ones = F.pad(x, _pad_arg(begin, end)), F.pad(ones, _pad_arg(begin, end), value=float(include))
        fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[rank - 1]
        return [fn(x, kernel, strides, 0, ceil, True) / fn(ones, kernel, strides, 0, ceil, True)]
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[rank - 1]
    return [fn(x, kernel, strides, begin, ceil, include)]


_INT_RANGES = {ir.DataType.UINT8: (0, 255), ir.DataType.INT8: (-128, 127), ir.DataType.UINT16: (0, 65535),
               ir.DataType.INT16: (-32768, 32767), ir.DataType.UINT4: (0, 15), ir.DataType.INT4: (-8, 7)}  # fmt: skip


def _per_axis(node: ir.Node, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A Q/DQ scale or zero point broadcast against ``x``: per tensor, per ``axis``, or per block along it."""
    if p.dim() == 0 or p.numel() == 1 and x.dim() == 0:
        return p.reshape(())
    axis = node.attributes.get_int("axis", 1) % x.dim()
    block = node.attributes.get_int("block_size", 0)
    if block:
        p = p.repeat_interleave(block, dim=axis).narrow(axis, 0, x.shape[axis])
        return p
    return p.reshape([-1 if a == axis else 1 for a in range(x.dim())])


def _code_range(node: ir.Node) -> tuple[int, int]:
    """The integer range of a QuantizeLinear's output type (its zero point's, else ``output_dtype``, else uint8)."""
    zero = node.inputs[2] if len(node.inputs) > 2 else None
    kind = None
    if zero is not None:
        const = ir.convenience.get_const_tensor(zero)
        kind = const.dtype if const is not None else zero.dtype
    if kind is None:
        out = node.attributes.get_int("output_dtype", 0)
        kind = ir.DataType(out) if out else ir.DataType.UINT8
    if kind not in _INT_RANGES:
        raise BitfoldError(f"QuantizeLinear node '{node.name}' quantizes to {kind.name}; TorchGraph fake-quantizes integer types only.")
    return _INT_RANGES[kind]


@register("QuantizeLinear")
def _quantize_linear(node: ir.Node, xs: Tensors) -> list[torch.Tensor]:
    """Fake quantization: the integer codes as a float tensor, rounding with a straight-through gradient (zero
    outside the clamp), so gradients reach what feeds the Q/DQ pair."""
    x, scale, zero = (*xs, None)[:3]
    low, high = _code_range(node)
    code = x / _per_axis(node, scale, x)
    code = code + (torch.round(code) - code).detach()  # round half to even, as ONNX, straight through
    if zero is not None:
        code = code + _per_axis(node, zero.to(x.dtype), x)
    return [torch.clamp(code, low, high)]


@register("DequantizeLinear")
def _dequantize_linear(node: ir.Node, xs: Tensors) -> list[torch.Tensor]:
    x, scale, zero = (*xs, None)[:3]
    x = x if x.is_floating_point() else x.to(scale.dtype)
    if zero is not None:
        x = x - _per_axis(node, zero.to(x.dtype), x)
    return [x * _per_axis(node, scale, x)]


@register("Dropout")
def _dropout(node: ir.Node, xs: Tensors) -> list[torch.Tensor]:
    if len(xs) > 2 and xs[2] is not None and bool(xs[2]):
        raise BitfoldError(f"Dropout node '{node.name}' is in training mode; TorchGraph runs inference only.")
    return [xs[0], torch.ones_like(xs[0], dtype=torch.bool)]
