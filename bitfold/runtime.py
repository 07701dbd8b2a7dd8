"""ONNX Runtime sessions that compute what the graph says: the ORT backend's, and calibration's statistics
collection's (``bitfold.quant``, which sits below the backends).

Sessions are built from the serialized model in memory; a model over the protobuf limit is written (with external
data) to a temporary directory first. ORT's optimizer fuses ``DequantizeLinear → MatMul`` into ``MatMulNBits`` and by
default gives the fused node ``accuracy_level = 4`` (activations quantized to int8 on the fly): a weight-only QDQ
graph would then be evaluated with int8 activations it never asked for (SmolLM2's W8 per-channel QDQ logits move by
about 5 %). The fused nodes keep float activations here; a model that wants int8 activations says so with its own
``MatMulNBits`` ``accuracy_level``. ``$BITFOLD_ORT_OPTIMIZATION`` (``all``, ``basic``, ``none``) sets the default
graph-optimization level, to check whether ORT's rewrites move a number. ORT 1.31's ``MatmulTransposeFusion``
crashes the process while loading a float16 ``Transpose → MatMul``, and its ``SimplifiedLayerNormFusion`` drops a
value that is still read when it fuses an RMS norm over a 1-D tensor (the model then fails to load); a model that
fails to load that way is loaded again without that fusion. Its QDQ fusion builds ``QLinearConcat`` (and other QLinear ops) with float16 scales, which
fail to load; graphs whose QuantizeLinear takes float16 scales load without QDQ fusion.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import onnx_ir as ir
import onnxruntime as ort

from bitfold.errors import BitfoldError
from bitfold.frontend.onnx_io import serialized

_LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}


def session(
    model: ir.Model,
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    threads: int | None = None,
    spinning: bool | None = None,
    optimization: str | None = None,
    global_pool: bool = False,
    profile: str | None = None,
) -> ort.InferenceSession:
    """An ORT session for ``model`` on ``providers``. ``threads``: intra-op threads (default:
    ``$BITFOLD_ORT_THREADS``, else ORT's); ``spinning``: whether idle threads spin (default: not when
    ``$BITFOLD_ORT_SPINNING`` is 0, else yes); ``optimization``: ``all`` | ``basic`` | ``none`` (default:
    ``$BITFOLD_ORT_OPTIMIZATION``, else ``all``); ``global_pool``: use the process's shared thread pool
    (``set_global_thread_pool_sizes`` before the first session); ``profile``: a file prefix for ORT's per-node
    profiler (``session.end_profiling()`` writes the trace and returns its path)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    optimization = optimization or os.environ.get("BITFOLD_ORT_OPTIMIZATION", "all")
    if optimization not in _LEVELS:
        raise BitfoldError(f"unknown ONNX Runtime optimization level '{optimization}'; choose one of: {', '.join(_LEVELS)}.")
    options.graph_optimization_level = _LEVELS[optimization]
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if threads is None and os.environ.get("BITFOLD_ORT_THREADS"):
        value = os.environ["BITFOLD_ORT_THREADS"]
        if not value.isdigit():
            raise BitfoldError(f"BITFOLD_ORT_THREADS must be a count of threads (0: ONNX Runtime's default), not '{value}'.")
        threads = int(value)
    if spinning is None:
        spinning = os.environ.get("BITFOLD_ORT_SPINNING", "1").lower() not in ("0", "false", "no", "off")
    if threads:
        options.intra_op_num_threads = threads
    if global_pool:
        options.use_per_session_threads = False
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    # A float weight stays float: ORT's WeightBiasQuantization would quantize the float weight (per tensor) and
    # bias of every Conv/Gemm that sits between DequantizeLinear and QuantizeLinear, an error the graph never asked for.
    disabled = ["WeightBiasQuantization"]
    if _has_fp8_qdq(model):  # ORT's QDQ fusion would build QLinearConv/MatMul on fp8, which have no kernels,
        options.add_session_config_entry("session.disable_quant_qdq", "1")
        disabled.append("ClipQuantRewrite")  # and its Clip→QuantizeLinear rule rejects fp8 zero points at load
    elif _has_low_float_qdq_scale(model):  # and QLinearConcat etc. with float16 scales, which fail to load
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    if _has_fp16_transposed_matmul(model):  # ORT 1.31's MatmulTransposeFusion segfaults at load on float16 Transpose → MatMul
        disabled.append("MatmulTransposeFusion")
    return _session(model, options, list(providers), disabled)


_FP8 = (ir.DataType.FLOAT8E4M3FN, ir.DataType.FLOAT8E4M3FNUZ, ir.DataType.FLOAT8E5M2, ir.DataType.FLOAT8E5M2FNUZ)


def _has_fp8_qdq(model: ir.Model) -> bool:
    return any(
        node.op_type == "QuantizeLinear" and not node.domain and len(node.inputs) > 2 and node.inputs[2] is not None
        and node.inputs[2].dtype in _FP8  # the zero point's type is the quantized type
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
    )


def _has_fp16_transposed_matmul(model: ir.Model) -> bool:
    """Whether a MatMul/Gemm reads a Transpose and any tensor at either node is float16 or bfloat16 (types of
    intermediate values may be missing; weights and graph inputs carry theirs)."""
    low = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)

    def typed_low(node: ir.Node) -> bool:
        values = [v for v in (*node.inputs, *node.outputs) if v is not None]
        return any((v.dtype or (v.const_value.dtype if v.const_value is not None else None)) in low for v in values)

    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type in ("MatMul", "Gemm") and not node.domain:
            for value in node.inputs[:2]:
                producer = value.producer() if value is not None else None
                if producer is not None and producer.op_type == "Transpose" and (typed_low(node) or typed_low(producer)):
                    return True
    return False


def _has_low_float_qdq_scale(model: ir.Model) -> bool:
    """Whether a QuantizeLinear takes a float16 or bfloat16 scale."""
    low = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
    return any(
        node.op_type == "QuantizeLinear" and not node.domain and len(node.inputs) > 1 and node.inputs[1] is not None
        and (node.inputs[1].dtype or getattr(node.inputs[1].const_value, "dtype", None)) in low
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
    )


#: How ORT reports a graph whose node reads a value nothing produces (after a faulty fusion, or in the input).
_DROPPED_VALUE = "is not a graph input, initializer, or output of a previous node"


def _session(model: ir.Model, options: ort.SessionOptions, providers: list[str], disabled: list[str]) -> ort.InferenceSession:
    with serialized(model) as source:
        try:
            try:
                return ort.InferenceSession(source, options, providers=providers, disabled_optimizers=disabled)
            except Exception as e:  # SimplifiedLayerNormFusion on a 1-D RMS norm: the graph it leaves reads a dropped value
                if _DROPPED_VALUE not in str(e):
                    raise
                return ort.InferenceSession(source, options, providers=providers, disabled_optimizers=[*disabled, "SimplifiedLayerNormFusion"])
        except Exception as e:  # ORT raises its own exception types for invalid graphs
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BitfoldError(f"ONNX Runtime cannot load the model: {first}") from e
