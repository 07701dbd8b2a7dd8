"""The TVM backend: parity with ONNX Runtime on the zoo, every bitfold op routed to its kernel (and the same
outputs as the op's ONNX function under ORT), the fallbacks, and the Runnable contract."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import fresh
from models import token_calibration

import bitfold
from bitfold.backends.ort import OrtRunnable
from bitfold.backends.tvm import lower
from bitfold.errors import BitfoldError
from bitfold.passes.canonical import CANONICAL

ZOO = ["mlp", "cnn-bn", "shared-bn-input", "encoder-layernorm", "decoder-rmsnorm-swiglu-rope", "tiny-lm", "tiny-lm-layernorm", "dynamic-batch-cnn"]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))


def _parity(model, feeds) -> tuple[float, object]:
    expected = OrtRunnable(model, device="cpu", optimization="none").run(feeds)
    runnable = bitfold.compile(model, backend="tvm", device="cpu")
    got = runnable.run(feeds)
    assert list(got) == list(expected)
    return max(_rel(got[k], expected[k]) for k in expected), runnable


@pytest.mark.parametrize("name", ZOO)
def test_zoo_matches_onnx_runtime(zoo_protos, name):
    model = fresh(zoo_protos, name)
    error, runnable = _parity(model, bitfold.sample_feeds(model))
    assert error <= 1e-4
    assert runnable.kernel_nodes == 0


@pytest.fixture(scope="module")
def lm(zoo_protos):
    model, _ = bitfold.optimize(fresh(zoo_protos, "tiny-lm"), [*CANONICAL, "fold-norm-affine"])
    return model


STEPS = {
    "int4-matmulnbits": ([{"name": "quantize-weights", "format": "matmulnbits", "bits": 4, "group_size": 16, "accuracy_level": 0}], "MatMulNBits"),
    "shift": ([{"name": "shift"}], "ShiftMatMul"),
    "shiftadd": ([{"name": "shiftadd", "q": 3, "group_size": 16}], "BCQMatMul"),
    "binary": ([{"name": "binarize", "center": True}], "BinaryMatMul"),
    "pb-llm": ([{"name": "binarize", "salient_ratio": 0.1, "salience": "magnitude"}], "BinaryMatMul"),
    "xnor": ([{"name": "binarize", "binarize_input": True}], "BinaryMatMul"),
    "ternary": ([{"name": "ternarize"}], "TernaryMatMul"),
    "2:4": ([{"name": "prune", "pattern": "nm:2:4", "format": "sparse"}], "SparseMatMul"),
    "csr": ([{"name": "prune", "pattern": "unstructured:0.6", "format": "sparse"}], "CSRMatMul"),
    "block": ([{"name": "prune", "pattern": "block:4x4:0.5", "format": "sparse"}], "BlockCSRMatMul"),
    "dense-sparse": ([{"name": "split-outliers", "ratio": 0.02, "bits": 3, "group_size": 16}], "DenseSparseMatMul"),
    "hadamard": ([{"name": "rotate", "online": True}], "Hadamard"),
}


@pytest.mark.parametrize("key", STEPS)
def test_every_bitfold_op_runs_on_its_kernel_with_the_functions_outputs(lm, key):
    steps, op_type = STEPS[key]
    model, _ = bitfold.optimize(bitfold.clone(lm), steps, token_calibration(4))
    emitted = [node for node in model.graph if node.op_type == op_type]
    assert emitted
    if key == "xnor":
        # binarized activations flip sign on 1e-7 differences upstream, so compare one node on shared inputs
        model = _single_node(model, emitted[0])
        emitted = emitted[:1]
    error, runnable = _parity(model, bitfold.sample_feeds(model))
    assert runnable.kernel_nodes == len(emitted)
    assert error <= 1e-4


def _single_node(model, node):
    import onnx_ir as ir

    x = ir.Value(name="x", shape=node.inputs[0].shape, type=ir.TensorType(ir.DataType.FLOAT))
    weights = [ir.Value(name=v.name, shape=v.shape, type=v.type, const_value=v.const_value) for v in node.inputs[1:]]
    copy = ir.node(node.op_type, [x, *weights], domain=node.domain, attributes={k: a.value for k, a in node.attributes.items()})
    copy.outputs[0].name, copy.outputs[0].dtype = "y", ir.DataType.FLOAT
    graph = ir.Graph([x], copy.outputs, nodes=[copy], initializers=weights, opset_imports=dict(model.opset_imports))
    return ir.Model(graph, ir_version=model.ir_version, functions=list(model.functions.values()))


def test_computed_weights_fall_back_to_the_inlined_function(lm):
    model, _ = bitfold.optimize(bitfold.clone(lm), [{"name": "ternarize"}], token_calibration(4))
    import onnx_ir as ir

    node = next(n for n in model.graph if n.op_type == "TernaryMatMul")
    peak = ir.node("ReduceMax", [node.inputs[0]], attributes={"keepdims": 0})
    factor = ir.val("zero_factor", const_value=ir.tensor(np.float32(0.0)))
    model.graph.register_initializer(factor)
    zero = ir.node("Mul", [peak.outputs[0], factor])
    scale = ir.node("Add", [node.inputs[2], zero.outputs[0]])  # the scale becomes a computed value
    for new in (peak, zero, scale):
        model.graph.insert_before(node, new)
    node.replace_input_with(2, scale.outputs[0])
    prepared, routed = lower.prepare(model, {"input_ids": (1, 8)})
    assert routed == sum(1 for n in model.graph if n.op_type == "TernaryMatMul") - 1
    assert not any(n.op_type == "TernaryMatMul" for n in prepared.graph)
    error, _ = _parity(model, bitfold.sample_feeds(model))
    assert error <= 1e-4


def test_input_is_not_modified_and_shapes_get_their_own_build(zoo_protos):
    model = fresh(zoo_protos, "dynamic-batch-cnn")
    before = bitfold.clone(model)
    runnable = bitfold.compile(model, backend="tvm", device="cpu")
    for batch in (1, 3):
        feeds = bitfold.sample_feeds(model, {"x": (batch, 3, 16, 16)})
        expected = OrtRunnable(model, device="cpu").run(feeds)
        got = runnable.run(feeds)
        assert _rel(next(iter(got.values())), next(iter(expected.values()))) <= 1e-4
    assert len(runnable._sessions) == 2
    import onnx_ir as ir

    assert ir.to_proto(model).SerializeToString() == ir.to_proto(before).SerializeToString()


def test_bench_and_errors(zoo_protos):
    import tvm

    model = fresh(zoo_protos, "mlp")
    stats = bitfold.compile(model, "tvm", "cpu").bench(bitfold.sample_feeds(model), warmup=2, iters=10)
    assert stats["iters"] == 10 and 0 < stats["min"] <= stats["p50"] <= stats["p90"]
    with pytest.raises(BitfoldError, match="unknown device 'tpu'"):
        bitfold.compile(model, "tvm", "tpu")
    if not tvm.cuda().exist:
        with pytest.raises(BitfoldError, match="finds no CUDA GPU"):
            bitfold.compile(model, "tvm", "cuda")


def _scheduled_matmul(rows: int, k: int = 40, n: int = 48, batch: tuple[int, ...] = (2, 3)):
    """The scheduled PrimFunc of x[*batch, rows, k] @ w[k, n] after ``ScheduleStandardOps``, and its build."""
    import onnx
    import onnx.helper as h
    import onnx_ir as ir
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from bitfold.backends.tvm import adapter
    from bitfold.backends.tvm.schedule import ScheduleStandardOps
    from bitfold.kernels import build

    w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    graph = h.make_graph([h.make_node("MatMul", ["x", "w"], ["y"])], "g", [h.make_tensor_value_info("x", 1, [*batch, rows, k])],
                         [h.make_tensor_value_info("y", 1, [*batch, rows, n])], [onnx.numpy_helper.from_array(w, "w")])  # fmt: skip
    model = ir.from_proto(h.make_model(graph, opset_imports=[h.make_opsetid("", 21)], ir_version=10))
    target = build.target("cpu")
    x = np.random.default_rng(1).standard_normal((*batch, rows, k)).astype(np.float32)
    mod = adapter.import_model(ir.to_proto(model), {"x": x}, target)
    with target:
        scheduled = tvm.transform.Sequential([*cpu.library_dispatch_passes(target), *cpu.legalize_passes(target), ScheduleStandardOps(target)])(mod)
    func = next(f for _, f in scheduled.functions_items() if isinstance(f, tvm.tirx.PrimFunc))
    got = bitfold.compile(model, backend="tvm", device="cpu").run({"x": x})["y"]
    return func, got, x @ w


def _update_loops(func, suffix: str = "_update") -> list:
    """Loops around the MatMul's update block (or the block whose name ends with ``suffix``), outermost first."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    block = next(b for b in sch.get_child_blocks(sch.get_sblock("root")) if sch.get(b).name_hint.endswith(suffix))
    return [sch.get(loop) for loop in sch.get_loops(block)]


@pytest.mark.parametrize("rows", [1, 24])
def test_standard_matmul_schedule_keeps_gemm_sums_in_registers(rows):
    import tvm

    func, got, expected = _scheduled_matmul(rows)
    assert _rel(got, expected) <= 1e-5
    loops = _update_loops(func)
    kinds = [loop.kind for loop in loops]
    extents = [int(loop.extent) for loop in loops]
    reduction = next(i for i, loop in enumerate(loops) if int(loop.extent) == 40)
    assert kinds[-1] == tvm.tirx.ForKind.VECTORIZED
    if rows == 1:  # GEMV: 16-column tiles, the reduction outside the tile's vectors (one contiguous weight row each)
        assert extents == [2 * 3 * 3, 40, 1, 1, 1, 16]
    else:  # GEMM: 4 rows × 3 column vectors of sums over the whole reduction, parallel over batch, heads and rows
        assert extents[reduction + 1 :] == [4, 3, 16]
        assert kinds[reduction + 1 : -1] == [tvm.tirx.ForKind.UNROLLED] * 2
        assert extents[0] == 2 * 3 * rows // 4


def test_wide_gemm_copies_each_weight_strip_contiguous_once():
    """A weight whose rows lie 64 KiB apart (the LM head's shape) is read through a per-task copy of its column
    strip: one parallel task per strip and batch, the copy inside it, compacted to k × 256 when lowered."""
    import tvm
    from tvm.s_tir import transform as st

    func, got, expected = _scheduled_matmul(8, k=24, n=16384, batch=(2,))
    assert _rel(got, expected) <= 1e-5
    update, copy = _update_loops(func), _update_loops(func, "_global")
    assert update[0].kind == tvm.tirx.ForKind.PARALLEL and int(update[0].extent) == 2 * 16384 // 256
    assert copy[0].same_as(update[0]) and [int(loop.extent) for loop in copy[1:]] == [24, 256]
    lowered = tvm.transform.Sequential([st.LowerInitBlock(), st.PlanAndUpdateBufferAllocationLocation(), st.ConvertBlocksToOpaque(),
                                        st.CompactBufferAllocation()])(tvm.IRModule({"main": func}))  # fmt: skip
    assert "B_global = T.sblock_alloc_buffer((T.int64(24), T.int64(256)))" in lowered.script()



def _head(n: int, rows: int = 3, k: int = 24):
    """x [1, rows, k] · Transpose(E [n, k]): a tied LM head as exported."""
    import onnx_ir as ir

    table = np.random.default_rng(0).standard_normal((n, k)).astype(np.float32)
    x = ir.Value(name="x", shape=ir.Shape([1, rows, k]), type=ir.TensorType(ir.DataType.FLOAT))
    embedding = ir.Value(name="E", shape=ir.Shape([n, k]), type=ir.TensorType(ir.DataType.FLOAT), const_value=ir.tensor(table, name="E"))
    transpose = ir.node("Transpose", [embedding], attributes={"perm": [1, 0]})
    matmul = ir.node("MatMul", [x, transpose.outputs[0]])
    matmul.outputs[0].name = "y"
    graph = ir.Graph([x], matmul.outputs, nodes=[transpose, matmul], initializers=[embedding], opset_imports={"": 20})
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize("rows", [1, 8])
def test_wide_head_runs_on_the_strip_kernel_and_small_matmuls_stay_standard(rows):
    wide = _head(16384, rows)
    prepared, routed = lower.prepare(wide, {"x": (1, rows, 24)})
    assert routed == 1
    assert [node.op_type for node in prepared.graph] == ["ai.onnx.MatMul"]
    assert prepared.graph.node(0).inputs[1].const_value.numpy().shape == (24, 16384)  # the Transpose folded
    assert [node.op_type for node in wide.graph] == ["Transpose", "MatMul"]  # the input model is untouched
    assert lower.prepare(wide, {"x": (1, rows, 24)}, "cuda")[1] == 0
    feeds = {"x": np.random.default_rng(1).standard_normal((1, rows, 24)).astype(np.float32)}
    error, runnable = _parity(wide, feeds)
    assert runnable.kernel_nodes == 1 and error <= 1e-5
    assert lower.prepare(_head(1024, rows), {"x": (1, rows, 24)})[1] == 0


def test_exp_sigmoid_and_softmax_run_as_vectorizable_polynomials_within_fp32_tolerance():
    """On llvm, exp (alone, in sigmoid and in softmax) becomes TVM's polynomial fast_exp, which vectorizes (libm's
    expf is a scalar call per element); results stay within 5e-6 relative of numpy's."""
    import onnx_ir as ir
    import tvm
    from tvm import relax

    from bitfold.backends.tvm import adapter
    from bitfold.kernels import build

    x = ir.Value(name="x", shape=ir.Shape([4, 64]), type=ir.TensorType(ir.DataType.FLOAT))
    nodes = [ir.node("Sigmoid", [x]), ir.node("Softmax", [x], attributes={"axis": -1}), ir.node("Exp", [x])]
    for node, name in zip(nodes, ("sigmoid", "softmax", "exp"), strict=True):
        node.outputs[0].name = name
    model = ir.Model(ir.Graph([x], [n.outputs[0] for n in nodes], nodes=nodes, opset_imports={"": 20}), ir_version=10)
    feeds = {"x": np.random.default_rng(0).uniform(-30, 30, (4, 64)).astype(np.float32)}
    mod = adapter.import_model(ir.to_proto(model), feeds, build.target("cpu"))
    rewritten = tvm.transform.Sequential([relax.transform.FastMathTransform(), adapter.FastSigmoid()])(mod).script()
    assert "fast_exp" in rewritten and "R.sigmoid" not in rewritten and "R.exp" not in rewritten and "R.nn.softmax" not in rewritten
    got = bitfold.compile(model, "tvm", "cpu").run(feeds)
    v = feeds["x"].astype(np.float64)
    shifted = np.exp(v - v.max(-1, keepdims=True))
    expected = {"sigmoid": 1 / (1 + np.exp(-v)), "softmax": shifted / shifted.sum(-1, keepdims=True), "exp": np.exp(v)}
    for name, reference in expected.items():
        np.testing.assert_allclose(got[name], reference, rtol=5e-6, atol=0, err_msg=name)
