"""ONNX Runtime backend.

Sessions are built from the serialized model in memory; a model over the protobuf limit is written (with
external data) to a temporary directory first. ``device="auto"`` uses the CUDA execution provider when this
onnxruntime build has it, else the CPU.

Sessions compute what the graph says. ORT's optimizer fuses ``DequantizeLinear → MatMul`` into ``MatMulNBits`` and
by default gives the fused node ``accuracy_level = 4`` (activations quantized to int8 on the fly): a weight-only QDQ
graph would then be evaluated with int8 activations it never asked for (SmolLM2's W8 per-channel QDQ logits move by
about 5 %). The fused nodes keep float activations here; a model that wants int8 activations says so with its own
``MatMulNBits`` ``accuracy_level``. ``$BITFOLD_ORT_OPTIMIZATION`` (``all``, ``basic``, ``none``) sets the default
graph-optimization level, to check whether ORT's rewrites move a number.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from bitfold.backends import Timed
from bitfold.errors import BitfoldError
from bitfold.frontend.inputs import check_feeds
from bitfold.frontend.onnx_io import serialized

_DEVICES = ("auto", "cpu", "cuda")
_LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}


class OrtRunnable(Timed):
    backend = "ort"

    def __init__(
        self,
        model: ir.Model,
        *,
        device: str = "auto",
        threads: int | None = None,
        spinning: bool = True,
        optimization: str | None = None,
        global_pool: bool = False,
    ) -> None:
        if device not in _DEVICES:
            raise BitfoldError(f"unknown device '{device}' for ONNX Runtime; choose one of: {', '.join(_DEVICES)}.")
        available = ort.get_available_providers()
        has_cuda = "CUDAExecutionProvider" in available
        if device == "cuda" and not has_cuda:
            raise BitfoldError("device 'cuda' requested but this onnxruntime has no CUDA provider; use device 'cpu'.")
        self.device = "cuda" if (device == "cuda" or (device == "auto" and has_cuda)) else "cpu"
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.device == "cuda" else ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        optimization = optimization or os.environ.get("BITFOLD_ORT_OPTIMIZATION", "all")
        if optimization not in _LEVELS:
            raise BitfoldError(f"unknown ONNX Runtime optimization level '{optimization}'; choose one of: {', '.join(_LEVELS)}.")
        options.graph_optimization_level = _LEVELS[optimization]
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        if threads:
            options.intra_op_num_threads = threads
        if global_pool:  # the process's shared pool (``set_global_thread_pool_sizes`` before the first session)
            options.use_per_session_threads = False
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # A float weight stays float: ORT's WeightBiasQuantization would quantize the float weight (per tensor) and
        # bias of every Conv/Gemm that sits between DequantizeLinear and QuantizeLinear, an error the graph never asked for.
        disabled = ["WeightBiasQuantization"]
        if _has_fp8_qdq(model):  # ORT's QDQ fusion would build QLinearConv/MatMul on fp8, which have no kernels,
            options.add_session_config_entry("session.disable_quant_qdq", "1")
            disabled.append("ClipQuantRewrite")  # and its Clip→QuantizeLinear rule rejects fp8 zero points at load
        self._model = model
        self.session = _session(model, options, providers, disabled)
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


_FP8 = (ir.DataType.FLOAT8E4M3FN, ir.DataType.FLOAT8E4M3FNUZ, ir.DataType.FLOAT8E5M2, ir.DataType.FLOAT8E5M2FNUZ)


def _has_fp8_qdq(model: ir.Model) -> bool:
    return any(
        node.op_type == "QuantizeLinear" and not node.domain and len(node.inputs) > 2 and node.inputs[2] is not None
        and node.inputs[2].dtype in _FP8  # the zero point's type is the quantized type
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
    )


def _session(model: ir.Model, options: ort.SessionOptions, providers: list[str], disabled: list[str]) -> ort.InferenceSession:
    with serialized(model) as source:
        try:
            return ort.InferenceSession(source, options, providers=providers, disabled_optimizers=disabled)
        except Exception as e:  # ORT raises its own exception types for invalid graphs
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BitfoldError(f"ONNX Runtime cannot load the model: {first}") from e
