"""ONNX Runtime backend.

``device="auto"`` uses the CUDA execution provider when this onnxruntime build has it, else the CPU. Sessions are
built by :func:`bitfold.runtime.session`, which keeps ORT computing what the graph says (no int8 activations for
fused ``DequantizeLinear → MatMul``, no quantized float weights, no fp8 QDQ fusions) and reads
``$BITFOLD_ORT_OPTIMIZATION`` for the default graph-optimization level. ``MatMulNBits`` with float zero points
(the min-max grid of llama.cpp's Q4_1), which ORT's CPU kernel runs on a slow path, run on its fast path with the
offsets as a separate small product (:func:`split_float_zero_points`, on a copy of the model).
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from bitfold.backends import Timed
from bitfold.errors import BitfoldError
from bitfold.frontend.inputs import check_feeds
from bitfold.frontend.onnx_io import clone
from bitfold.quant import matmulnbits
from bitfold.runtime import session

_DEVICES = ("auto", "cpu", "cuda")
MS = "com.microsoft"


class OrtRunnable(Timed):
    backend = "ort"

    def __init__(
        self,
        model: ir.Model,
        *,
        device: str = "auto",
        threads: int | None = None,
        spinning: bool | None = None,
        optimization: str | None = None,
        global_pool: bool = False,
        profile: str | None = None,
    ) -> None:
        if device not in _DEVICES:
            raise BitfoldError(f"unknown device '{device}' for ONNX Runtime; choose one of: {', '.join(_DEVICES)}.")
        available = ort.get_available_providers()
        has_cuda = "CUDAExecutionProvider" in available
        if device == "cuda" and not has_cuda:
            raise BitfoldError("device 'cuda' requested but this onnxruntime has no CUDA provider; use device 'cpu'.")
        self.device = "cuda" if (device == "cuda" or (device == "auto" and has_cuda)) else "cpu"
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.device == "cuda" else ["CPUExecutionProvider"]
        self._model = model
        self.split_zero_points = 0  # MatMulNBits whose float zero points were split off (see split_float_zero_points)
        if any(_float_zero_points(node) for node in model.graph):
            model = clone(model)
            self.split_zero_points = split_float_zero_points(model.graph)
        self.session = session(model, providers=providers, threads=threads, spinning=spinning, optimization=optimization,
                               global_pool=global_pool, profile=profile)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self._model, feeds)
        outputs = self.session.run(self.output_names, dict(feeds))
        return dict(zip(self.output_names, outputs, strict=True))

    def times(self, feeds: Mapping[str, np.ndarray], iters: int) -> list[float]:
        """Wall seconds of ``iters`` consecutive runs (feeds checked once, outside the timed loop)."""
        check_feeds(self._model, feeds)
        feeds = dict(feeds)
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            self.session.run(self.output_names, feeds)
            times.append(time.perf_counter() - start)
        return times


def split_float_zero_points(graph: ir.Graph) -> int:
    """``MatMulNBits`` with float zero points (a min-max grid, llama.cpp's Q4_1) → the same codes and scales with
    the default zero point, plus a per-group offset term. Returns how many were rewritten.

    ONNX Runtime's CPU kernel has no fast path for float zero points (it dequantizes the whole weight per call). The
    element value ``(q - z) s`` equals ``(q - 2^(bits-1)) s + (2^(bits-1) - z) s``; the second term is constant over a
    group of ``block_size`` inputs, so its product with ``A`` is ``(A G) C``: ``G`` [K, groups] sums each group of
    ``A``'s last axis, ``C`` [groups, N] holds the offsets. Both are small (one float per group and output, as the
    zero points themselves), and ``A G`` is computed once per input for every linear that reads it.
    """
    sums: dict[tuple[int, int, int], ir.Value] = {}
    count = 0
    for node in [n for n in graph if _float_zero_points(n)]:
        inputs = list(node.inputs)
        packed, scales, zeros = (_const(v) for v in inputs[1:])
        if packed is None or scales is None or zeros is None:
            continue
        attrs = {k: a.value for k, a in node.attributes.items()}
        k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
        groups = -(-k // block)
        default = 1 << (bits - 1)
        scales, zeros = scales.reshape(n, groups), zeros.reshape(n, groups)
        offsets = ((default - zeros.astype(np.float64)) * scales).T.astype(scales.dtype)  # [groups, N]
        if k % block:  # the padding of the last group decodes to 0 under the default zero point
            codes = matmulnbits.unpack_bits(packed, bits, block).reshape(n, groups * block)
            codes[:, k:] = default
            packed = matmulnbits.pack_bits(codes.reshape(n, groups, block), bits)
        scope = node.name or f"MatMulNBits_{count}"
        a = inputs[0]
        key = (id(a), k, block)
        if key not in sums:
            indicator = (np.arange(k)[:, None] // block == np.arange(groups)[None, :]).astype(scales.dtype)
            group_sum = ir.Node("", "MatMul", [a, _initializer(graph, f"{scope}/group_indicator", indicator)],
                                name=f"{scope}/group_sum")  # fmt: skip
            graph.insert_before(node, group_sum)
            sums[key] = group_sum.outputs[0]
        codes_value = _initializer(graph, f"{scope}/codes", packed) if k % block else inputs[1]
        plain = ir.Node(MS, "MatMulNBits", [a, codes_value, inputs[2]], node.attributes.values(), name=f"{scope}/default_zero")
        offset = ir.Node("", "MatMul", [sums[key], _initializer(graph, f"{scope}/group_offsets", offsets)], name=f"{scope}/offsets")
        total = ir.Node("", "Add", [plain.outputs[0], offset.outputs[0]], name=f"{scope}/add_offsets")
        graph.insert_before(node, [plain, offset, total])
        out = node.outputs[0]
        total.outputs[0].shape, total.outputs[0].type = out.shape, out.type
        ir.convenience.replace_all_uses_with(out, total.outputs[0], replace_graph_outputs=True)
        total.outputs[0].name, out.name = out.name, f"{out.name}_float_zero"
        graph.remove(node, safe=True)
        count += 1
    return count


def _float_zero_points(node: ir.Node) -> bool:
    """A float32 MatMulNBits with float zero points (float16 ones stay as written: ORT's CPU float16 kernels are
    another path, and the split computed wrongly there with graph optimizations off)."""
    return (node.op_type == "MatMulNBits" and node.domain == MS and len(node.inputs) == 4 and node.inputs[3] is not None
            and node.inputs[3].dtype == ir.DataType.FLOAT)  # fmt: skip


def _const(value: ir.Value | None) -> np.ndarray | None:
    return value.const_value.numpy() if value is not None and value.const_value is not None else None


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array))
    value.shape, value.type = ir.Shape(array.shape), ir.TensorType(ir.DataType.from_numpy(array.dtype))
    graph.register_initializer(value)
    return value
