"""Minimal graphs of the failures the graph fuzzer (``bitfold.tools.fuzz``, ``benchmarks/fuzz.py``) found.

Each test builds its graph explicitly (ONNX text) and asserts what the pass must do: an exact pass keeps every
output (``fuzz.check`` → "ok"), a lossy pass produces a model that loads and runs with finite outputs or refuses
with a :class:`~bitfold.errors.BitfoldError` ("ok" or "decline"), and ``modified`` tells the truth (the pipeline's
``verify`` mode raises otherwise). A test marked ``xfail(strict=True)`` documents a defect that is still open: it
turns into a failure the day the defect is fixed, so the mark goes with the fix.
"""

from __future__ import annotations

import numpy as np
import onnx.parser
import onnx_ir as ir
import pytest

import bitfold
from bitfold.errors import PassPreconditionError
from bitfold.tools import fuzz


def _floats(array) -> str:
    return "{" + ",".join(repr(float(v)) for v in np.asarray(array, np.float32).ravel()) + "}"


def _halves(array) -> str:
    """float16 values as the ONNX text format writes them (their bit patterns)."""
    return "{" + ",".join(str(int(v)) for v in np.asarray(array, np.float16).view(np.uint16).ravel()) + "}"


def _weights(shape: tuple[int, ...], seed: int, half: bool = False) -> str:
    w = np.random.default_rng(seed).standard_normal(shape) / np.sqrt(shape[0])
    return _halves(w) if half else _floats(w)


def _graph(text: str, *, samples: int = 5, shift: dict[str, float] | None = None) -> fuzz.FuzzGraph:
    """``text`` as a fuzz graph with seeded feeds and calibration samples (floats standard normal, plus
    ``shift[name]`` on channel 0 of that input; int64 inputs in [0, 4))."""
    model = ir.from_proto(onnx.parser.parse_model(text))
    rng = np.random.default_rng(1)
    dtype = "float16" if any(v.dtype == ir.DataType.FLOAT16 for v in model.graph.inputs) else "float32"

    def sample() -> dict[str, np.ndarray]:
        feeds = {}
        for value in model.graph.inputs:
            shape = [int(d) for d in value.shape]
            if value.dtype == ir.DataType.INT64:
                feeds[value.name] = rng.integers(0, 4, shape).astype(np.int64)
                continue
            x = rng.standard_normal(shape)
            x[..., 0] += (shift or {}).get(value.name, 0.0)
            feeds[value.name] = x.astype(np.float16 if dtype == "float16" else np.float32)
        return feeds

    feeds = [sample() for _ in range(samples)]
    outputs = {v.name: tuple(int(d) for d in v.shape) for v in model.graph.outputs}
    return fuzz.FuzzGraph(model, feeds[0], feeds[1:], dtype, outputs)


def _assert_ok(graph: fuzz.FuzzGraph, case: fuzz.PassCase) -> None:
    outcome = fuzz.check(graph, case)
    assert outcome.kind in (("ok",) if case.exact else ("ok", "decline")), f"{outcome.kind} ({outcome.reason}): {outcome.detail}"


# ---- canonical passes ---------------------------------------------------------------------------------------------


def test_remove_dead_counts_the_training_mode_attribute_it_drops() -> None:
    """onnx-ir's unused-node removal deletes an explicit ``training_mode = 0``; remove-dead must count that change
    (else ``verify`` raises PassContractError on a model with nothing dead in it)."""
    model = ir.from_proto(onnx.parser.parse_model("""
        <ir_version: 10, opset_import: ["" : 17]>
        bn (float[1,2] x) => (float[1,2] y) <float[2] s = {1, 2}, float[2] b = {0, 1}, float[2] m = {0, 0}, float[2] v = {1, 1}> {
            [bn] y = BatchNormalization <training_mode = 0> (x, s, b, m, v)
        }"""))
    _, report = bitfold.optimize(model, ["remove-dead"], verify=True)
    assert report.passes[0].modified


def test_remove_identity_keeps_both_outputs_of_an_identity_between_two_outputs() -> None:
    text = """
        <ir_version: 10, opset_import: ["" : 17]>
        outputs (float[4] x) => (float[4] y, float[4] r) {
            [relu] r = Relu (x)
            [copy] y = Identity (r)
        }"""
    model, _ = bitfold.optimize(ir.from_proto(onnx.parser.parse_model(text)), ["remove-identity"])
    assert [v.name for v in model.graph.outputs] == ["y", "r"]
    _assert_ok(_graph(text), fuzz.pass_case("remove-identity", True))


# ---- equivalent transforms ----------------------------------------------------------------------------------------

_RMS_NORM_POSITIVE_AXIS = f"""
    <ir_version: 10, opset_import: ["" : 17]>
    norm (float[2,4] x) => (float[2,3] y) <float two = {{2}}, float eps = {{1e-6}}, float[4] g = {{1.5, 0.5, 1, 2}}, float[4,3] w = {_weights((4, 3), 0)}> {{
        [act] r = Relu (x)
        [square] r2 = Pow (r, two)
        [mean] ms = ReduceMean <axes = [1]> (r2)
        [addeps] mse = Add (ms, eps)
        [root] rms = Sqrt (mse)
        [divide] n = Div (r, rms)
        [gamma] ng = Mul (n, g)
        [linear] y = MatMul (ng, w)
    }}"""


def test_rms_norm_with_a_positive_axis_and_no_shapes() -> None:
    """An RMSNorm reducing axis 1 (not -1) of an intermediate value whose shape no value_info states (the same
    helper crashes rotate and affine on larger graphs)."""
    _assert_ok(_graph(_RMS_NORM_POSITIVE_AXIS), fuzz.pass_case("fold-norm-affine", True))


def test_smooth_shift_and_explicit_scale_on_two_chained_linears() -> None:
    """x·g → MatMul → MatMul: the first group is centred (its z·W moves into mm1's bias), the second gets an
    explicit Mul on mm1's output; that Mul must scale the biased value, not the value before the bias."""
    text = f"""
        <ir_version: 10, opset_import: ["" : 17]>
        chain (float[8,4] x) => (float[8,4] y) <float[4] g = {{1, 0.5, 2, 1.5}}, float[4,4] w1 = {_weights((4, 4), 1)}, float[4,4] w2 = {_weights((4, 4), 2)}> {{
            [scale] n = Mul (x, g)
            [mm1] h = MatMul (n, w1)
            [mm2] y = MatMul (h, w2)
        }}"""
    graph = _graph(text, shift={"x": 8.0})  # a one-signed outlier channel: centring it pays
    _assert_ok(graph, fuzz.pass_case("smooth", True, shift=True, explicit=True))


_GATED_MLP_UP_IS_OUTPUT = f"""
    <ir_version: 10, opset_import: ["" : 18]>
    mlp (float[3,4] x) => (float[3,4] y, float[3,6] u) <float[4,6] wg = {_weights((4, 6), 3)}, float[4,6] wu = {_weights((4, 6), 4)}, float[6,4] wd = {_weights((6, 4), 5)}> {{
        [gate] g = MatMul (x, wg)
        [up] u = MatMul (x, wu)
        [sig] s = Sigmoid (g)
        [silu] a = Mul (g, s)
        [glu] h = Mul (a, u)
        [down] y = MatMul (h, wd)
    }}"""


@pytest.mark.parametrize("case", [fuzz.pass_case("smooth", True), fuzz.pass_case("affine", True, steps=2, rows=32)], ids=lambda c: c.label)
def test_up_projection_absorbs_no_scale_when_its_output_is_read_elsewhere(case: fuzz.PassCase) -> None:
    _assert_ok(_graph(_GATED_MLP_UP_IS_OUTPUT, shift={"x": 8.0}), case)


def test_rotate_leaves_a_stream_whose_writer_output_is_a_graph_output() -> None:
    """Embedding → RMSNorm → gated MLP → bias: the MLP output o is a graph output, the residual sum is unused."""
    text = f"""
        <ir_version: 10, opset_import: ["" : 18]>
        block (int64[1,3] ids) => (float[1,3,4] o) <float[8,4] emb = {_weights((8, 4), 6)}, int64[1] axes = {{-1}}, float eps = {{1e-6}}, float[4,6] wg = {_weights((4, 6), 7)}, float[4,6] wu = {_weights((4, 6), 8)}, float[6,4] wd = {_weights((6, 4), 9)}, float[4] b = {{0.1, -0.2, 0.3, 0}}> {{
            [embed] x = Gather (emb, ids)
            [square] x2 = Mul (x, x)
            [mean] ms = ReduceMean (x2, axes)
            [addeps] mse = Add (ms, eps)
            [root] rms = Sqrt (mse)
            [norm] n = Div (x, rms)
            [gate] g = MatMul (n, wg)
            [up] u = MatMul (n, wu)
            [sig] s = Sigmoid (g)
            [silu] a = Mul (g, s)
            [glu] h = Mul (a, u)
            [down] d = MatMul (h, wd)
            [bias] o = Add (d, b)
            [residual] y = Add (o, x)
        }}"""
    _assert_ok(_graph(text), fuzz.pass_case("rotate", True, online=False))


_UNANNOTATED_MATMUL = f"""
    <ir_version: 10, opset_import: ["" : 17]>
    linear (float[1,16] x) => (float[1,16] y) <float[16,16] w = {_weights((16, 16), 10)}, float[16] b = {_weights((16,), 11)}> {{
        [act] a = Relu (x)
        [mm] h = MatMul (a, w)
        [bias] y = Add (h, b)
    }}"""


def test_shape_inference_inside_smooth_is_not_a_modification() -> None:
    """smooth infers the missing shapes, finds nothing to smooth (a Relu absorbs no scale) and says "not
    modified"; the initializers come back reordered, which ``verify`` counts as a change (PassContractError)."""
    graph = _graph(_UNANNOTATED_MATMUL)
    bitfold.optimize(bitfold.clone(graph.model), ["smooth"], graph.calibration, verify=True)


def test_shape_inference_inside_cast_precision_is_not_a_modification() -> None:
    """A float16 graph: nothing to convert, "not modified", but the initializers come back reordered."""
    text = f"""
        <ir_version: 10, opset_import: ["" : 17]>
        linear (float16[1,16] x) => (float16[1,32] y) <float16[16,32] w = {_weights((16, 32), 12, half=True)}, float16[32] b = {_weights((32,), 13, half=True)}> {{
            [mm] h = MatMul (x, w)
            [bias] y = Add (h, b)
        }}"""
    graph = _graph(text)
    bitfold.optimize(bitfold.clone(graph.model), ["cast-precision"], graph.calibration, verify=True)


# ---- quantizers and weight passes ---------------------------------------------------------------------------------

_SHARED_WEIGHT = f"""
    <ir_version: 10, opset_import: ["" : 21]>
    shared (float[4,8] x) => (float[4,8] y, float[4,8] z) <float[8,8] w = {_weights((8, 8), 14)}> {{
        [act] a = Relu (x)
        [mm1] y = MatMul (a, w)
        [mm2] z = MatMul (a, w)
    }}"""


@pytest.mark.parametrize("case", [fuzz.pass_case("quantize-weights", False, group_size=-1), fuzz.pass_case("quantize-activations", False)], ids=lambda c: c.label)
def test_a_weight_shared_by_two_matmuls_is_quantized_with_unique_names(case: fuzz.PassCase) -> None:
    _assert_ok(_graph(_SHARED_WEIGHT), case)


def test_unnamed_nodes_get_unique_new_node_names() -> None:
    """ONNX files from many exporters have empty node names; ORT refuses two nodes both named '_dq'."""
    text = f"""
        <ir_version: 10, opset_import: ["" : 21]>
        unnamed (float[4,8] x) => (float[4,8] y, float[4,8] z) <float[8,8] w = {_weights((8, 8), 15)}, float[8,8] v = {_weights((8, 8), 16)}> {{
            y = MatMul (x, w)
            z = MatMul (x, v)
        }}"""
    _assert_ok(_graph(text), fuzz.pass_case("quantize-weights", False, group_size=-1))


_OPSET17_REDUCE_MEAN = f"""
    <ir_version: 10, opset_import: ["" : 17]>
    old (float[4,8] x) => (float[4,8] y, float[4,1] m) <float[8,8] w = {_weights((8, 8), 17)}> {{
        [mm] y = MatMul (x, w)
        [mean] m = ReduceMean <axes = [-1]> (x)
    }}"""


@pytest.mark.parametrize("case", [fuzz.pass_case("quantize-weights", False, group_size=-1), fuzz.pass_case("binarize", False, keep_ends=False)], ids=lambda c: c.label)
def test_opset_upgrade_keeps_reduce_ops_valid(case: fuzz.PassCase) -> None:
    """quantize-weights (QDQ needs opset 21) and the bitfold ops (18) upgrade an opset-17 model; its ReduceMean
    must become the opset-18 form (axes as an input), else the model fails onnx.checker and ORT."""
    _assert_ok(_graph(_OPSET17_REDUCE_MEAN), case)


_OPSET17_DEAD_MATMUL = f"""
    <ir_version: 10, opset_import: ["" : 17]>
    dead (float[4,8] x) => (float[4,8] y) <float[8,8] w = {_weights((8, 8), 18)}, float[8,8] v = {_weights((8, 8), 19)}> {{
        [mm] y = MatMul (x, w)
        [unused] z = MatMul (x, v)
    }}"""


@pytest.mark.parametrize(
    "case",
    [
        fuzz.pass_case("quantize-weights", False, group_size=-1),
        fuzz.pass_case("binarize", False, keep_ends=False),
        fuzz.pass_case("quantize-activations", False, activation_dtype="fp8-e4m3", graph_inputs=True),
    ],
    ids=lambda c: c.label,
)
def test_opset_upgrade_does_not_strand_collected_targets(case: fuzz.PassCase) -> None:
    """A MatMul nobody reads is collected as a target, the opset upgrade removes it, and the pass then reads its
    detached inputs: AttributeError ('NoneType' object has no attribute 'const_value' / 'name')."""
    _assert_ok(_graph(_OPSET17_DEAD_MATMUL), case)


_CHAINED_MATMULS = f"""
    <ir_version: 10, opset_import: ["" : 21]>
    chain (float[4,8] x) => (float[4,8] y) <float[8,8] w = {_weights((8, 8), 20)}, float[8,8] v = {_weights((8, 8), 21)}> {{
        [mm1] h = MatMul (x, w)
        [mm2] y = MatMul (h, v)
    }}"""


@pytest.mark.parametrize(
    "case",
    [
        fuzz.pass_case("quantize-weights", False, format="fake", group_size=-1, compensate_rank=1),
        fuzz.pass_case("prune", False, method="wanda", keep_ends=False, compensate_rank=1),
    ],
    ids=lambda c: c.label,
)
def test_low_rank_compensation_of_two_chained_linears(case: fuzz.PassCase) -> None:
    """KeyError 'h_with_lowrank' (quantize_weights.py) / ValueError "method 'wanda' needs calibration data"
    (multless/base.py passes hessians.get(new name) = None to the solver)."""
    _assert_ok(_graph(_CHAINED_MATMULS), case)


def test_prune_low_rank_compensation_of_a_conv() -> None:
    text = f"""
        <ir_version: 10, opset_import: ["" : 21]>
        conv (float[1,4,5,5] x) => (float[1,4,5,5] y) <float[4,4,1,1] w = {_weights((4, 4, 1, 1), 22)}> {{
            [conv] y = Conv (x, w)
        }}"""
    _assert_ok(_graph(text), fuzz.pass_case("prune", False, method="wanda", keep_ends=False, compensate_rank=1))


@pytest.mark.parametrize(
    "case",
    [
        fuzz.pass_case("quantize-weights", False, format="fake", group_size=-1, compensate_rank=1),
        fuzz.pass_case("prune", False, method="magnitude", keep_ends=False, compensate_rank=1),
    ],
    ids=lambda c: c.label,
)
def test_low_rank_compensation_of_a_linear_whose_input_is_zero(case: fuzz.PassCase) -> None:
    """A float16 linear whose calibration input is all zeros (a gate with zero weights does this): the branch
    must stay finite."""
    text = f"""
        <ir_version: 10, opset_import: ["" : 21]>
        zero (float16[4,8] x) => (float16[4,8] y) <float16[8,8] w = {_weights((8, 8), 23, half=True)}, float16 zero = {{0}}> {{
            [mute] a = Mul (x, zero)
            [mm] y = MatMul (a, w)
        }}"""
    _assert_ok(_graph(text), case)


def test_quantize_tokens_on_an_opset_17_model() -> None:
    text = f"""
        <ir_version: 10, opset_import: ["" : 17]>
        linear (float[4,8] x) => (float[4,8] y) <float[8,8] w = {_weights((8, 8), 24)}> {{
            [mm] y = MatMul (x, w)
        }}"""
    _assert_ok(_graph(text), fuzz.pass_case("quantize-tokens", False))


# ---- float16 graphs -----------------------------------------------------------------------------------------------

_FLOAT16_MLP = f"""
    <ir_version: 10, opset_import: ["" : 21]>
    mlp (float16[4,16] x) => (float16[4,16] y) <float16[16,16] w1 = {_weights((16, 16), 25, half=True)}, float16[16,16] w2 = {_weights((16, 16), 26, half=True)}> {{
        [mm1] h = MatMul (x, w1)
        [act] a = Relu (h)
        [mm2] y = MatMul (a, w2)
    }}"""

#: Lossy passes that keep a float16 graph float16 (scales and constants in the activation's type).
_FLOAT16_PASSES = {
    "quantize-weights": {"group_size": -1},
    "quantize-weights blockwise asymmetric": {"group_size": 8, "symmetric": False},
    "quantize-weights fake": {"format": "fake", "group_size": 8},
    "quantize-weights matmulnbits": {"format": "matmulnbits", "group_size": 16, "bits": 8},
    "quantize-weights matmulnbits float zero": {"format": "matmulnbits", "group_size": 16, "symmetric": False, "zero_point": "float"},
    "quantize-activations": {},
    "quantize-activations int8 outputs": {"activation_dtype": "int8", "outputs": True, "graph_inputs": True},
    "quantize-activations fp8": {"activation_dtype": "fp8-e4m3", "observer": "percentile", "graph_inputs": True},
    "quantize-tokens": {},
    "quantize-tokens asymmetric": {"bits": 4, "symmetric": False, "search_clip": True},
}


@pytest.mark.parametrize(("label", "params"), list(_FLOAT16_PASSES.items()), ids=list(_FLOAT16_PASSES))
def test_lossy_pass_keeps_a_float16_mlp_float16(label: str, params: dict) -> None:
    """The rewritten float16 model loads and runs in ONNX Runtime with no float32 value in it."""
    graph, case = _graph(_FLOAT16_MLP), fuzz.pass_case(label.split()[0], False, **params)
    _assert_ok(graph, case)
    result, _ = bitfold.optimize(bitfold.clone(graph.model), list(case.steps), graph.calibration)
    g = result.graph
    values = [*g.inputs, *g.initializers.values(), *(v for node in g for v in node.outputs)]
    wide = {v.name: v.dtype for v in values if v.dtype in (ir.DataType.FLOAT, ir.DataType.DOUBLE)}
    assert not wide, f"float32 values in a float16 graph: {wide}"


#: Passes that emit a bitfold op (whose ONNX function is typed float32) refuse a float16 graph up front.
_FLOAT16_REFUSED = {
    "binarize": {"keep_ends": False},
    "ternarize": {"keep_ends": False},
    "shift": {"keep_ends": False},
    "shiftadd": {"keep_ends": False, "group_size": 8},
    "prune": {"keep_ends": False, "method": "magnitude", "pattern": "nm:2:4", "format": "sparse"},
    "split-outliers": {"keep_ends": False, "group_size": 8},
}


@pytest.mark.parametrize(("name", "params"), list(_FLOAT16_REFUSED.items()), ids=list(_FLOAT16_REFUSED))
def test_bitfold_op_pass_refuses_a_float16_mlp(name: str, params: dict) -> None:
    graph, case = _graph(_FLOAT16_MLP), fuzz.pass_case(name, False, **params)
    outcome = fuzz.check(graph, case)
    assert (outcome.kind, outcome.reason) == ("decline", "PassPreconditionError"), outcome.detail
    model = bitfold.clone(graph.model)
    said = (f"^pass '{name}' emits a bitfold op for node 'mm1', whose weight is float16, and works on float32 graphs: "
            r"run it before cast-precision, or on the float32 model\.$")
    with pytest.raises(PassPreconditionError, match=said):
        bitfold.optimize(model, list(case.steps), graph.calibration)


def test_binarize_fake_keeps_a_float16_mlp_float16() -> None:
    """``format = "fake"`` emits no bitfold op, so it is not refused."""
    _assert_ok(_graph(_FLOAT16_MLP), fuzz.pass_case("binarize", False, keep_ends=False, format="fake"))


@pytest.mark.parametrize("group_size", [-1, 2])
def test_quantize_weights_on_a_float16_conv(group_size: int) -> None:
    text = f"""
        <ir_version: 10, opset_import: ["" : 21]>
        conv (float16[1,4,5,5] x) => (float16[1,8,5,5] y) <float16[8,4,1,1] w = {_weights((8, 4, 1, 1), 27, half=True)}> {{
            [conv] y = Conv (x, w)
        }}"""
    _assert_ok(_graph(text), fuzz.pass_case("quantize-weights", False, group_size=group_size, op_types=["Conv"]))


def test_rotate_online_hadamard_refuses_a_float16_stream() -> None:
    """Embedding → RMSNorm → MLP → residual → RMSNorm → head, all float16: the online Hadamard op's function is
    typed float32, so rotate refuses; with ``online = false`` it rotates the float16 stream (a model ONNX Runtime
    runs)."""
    text = f"""
        <ir_version: 10, opset_import: ["" : 18]>
        lm (int64[1,3] ids) => (float16[1,3,8] logits) <float16[8,4] emb = {_weights((8, 4), 28, half=True)}, int64[1] axes = {{-1}}, float16 eps = {_halves([1e-5])}, float16[4,8] wu = {_weights((4, 8), 29, half=True)}, float16[8,4] wd = {_weights((8, 4), 30, half=True)}, float16[4,8] head = {_weights((4, 8), 31, half=True)}> {{
            [embed] x = Gather (emb, ids)
            [square] x2 = Mul (x, x)
            [mean] ms = ReduceMean (x2, axes)
            [addeps] mse = Add (ms, eps)
            [root] rms = Sqrt (mse)
            [norm] n = Div (x, rms)
            [up] u = MatMul (n, wu)
            [act] a = Relu (u)
            [down] d = MatMul (a, wd)
            [residual] y = Add (d, x)
            [square2] y2 = Mul (y, y)
            [mean2] ms2 = ReduceMean (y2, axes)
            [addeps2] mse2 = Add (ms2, eps)
            [root2] rms2 = Sqrt (mse2)
            [norm2] n2 = Div (y, rms2)
            [lm_head] logits = MatMul (n2, head)
        }}"""
    graph = _graph(text)
    outcome = fuzz.check(graph, fuzz.pass_case("rotate", True))
    assert (outcome.kind, outcome.reason) == ("decline", "PassPreconditionError"), outcome.detail
    said = (r"^pass 'rotate' with online = true inserts a bitfold Hadamard op before node 'down', whose input is float16, "
            r"and works on float32 graphs: run it before cast-precision, or on the float32 model \(or set online = false\)\.$")
    with pytest.raises(PassPreconditionError, match=said):
        bitfold.optimize(bitfold.clone(graph.model), ["rotate"])
    _assert_ok(graph, fuzz.pass_case("rotate", False, online=False))  # runs; equal to float16 rounding


# ---- opset upgrades, float16 scales, initializer order (the 1,000-graph shard 0-1000 of seed 0) -------------------

_EQUAL_SPLIT = f"""
    <ir_version: 10, opset_import: ["" : 17]>
    split (float[2,8] x) => (float[2,4] a, float[2,3] y) <float[4,3] w = {_weights((4, 3), 2)}> {{
        [split] a, b = Split <axis = 1> (x)
        [linear] y = MatMul (b, w)
    }}"""


@pytest.mark.parametrize("case", [fuzz.pass_case("quantize-weights", False, group_size=-1),
                                  fuzz.pass_case("binarize", False, keep_ends=False)], ids=lambda c: c.label)  # fmt: skip
def test_an_equal_split_survives_the_upgrade_to_opset_18(case) -> None:
    """Below opset 18 a Split with neither ``split`` input nor attribute cuts equal parts; from 18 it must say
    ``num_outputs``. Passes that raise the opset (QDQ at 21, bitfold ops at 18) left it unloadable."""
    _assert_ok(_graph(_EQUAL_SPLIT), case)
    model, _ = bitfold.optimize(_graph(_EQUAL_SPLIT).model, [case.steps[0]])
    split = next(n for n in model.graph if n.op_type == "Split")
    assert model.opset_imports[""] >= 18 and split.attributes["num_outputs"].as_int() == 2


def test_float16_activations_quantize_at_an_opset_that_has_float16_scales() -> None:
    """QuantizeLinear/DequantizeLinear take float16 scales from opset 19; a float16 graph at opset 17 is raised."""
    text = f"""
        <ir_version: 10, opset_import: ["" : 17]>
        half (float16[2,4] x) => (float16[2,3] y) <float16[4,3] w = {_weights((4, 3), 3, half=True)}> {{
            [linear] y = MatMul (x, w)
        }}"""
    _assert_ok(_graph(text), fuzz.pass_case("quantize-activations", False))


def test_a_float16_constant_node_gets_float16_scales() -> None:
    """A weight produced by a ``Constant`` node (not an initializer) carries its type in the attribute only."""
    text = f"""
        <ir_version: 10, opset_import: ["" : 19]>
        half (float16[1,1,3] x) => (float16[1,1,3] y) {{
            [constant] w = Constant <value = float16[1,1] w {_halves([0.3])}> ()
            [linear] y = MatMul (w, x)
        }}"""
    for case in (fuzz.pass_case("quantize-activations", False),
                 fuzz.pass_case("quantize-activations", False, activation_dtype="fp8-e4m3", observer="percentile", graph_inputs=True)):  # fmt: skip
        _assert_ok(_graph(text), case)


def test_reordered_initializers_are_no_change() -> None:
    """The pipeline's ``modified`` check ignores initializer order (it carries no meaning); so does the fuzzer's."""
    model, reordered = _graph(_EQUAL_SPLIT).model, _graph(_EQUAL_SPLIT).model
    extra = np.ones(2, np.float32)
    model.graph.initializers["b0"] = ir.Value(name="b0", const_value=ir.tensor(extra, name="b0"))
    reordered.graph.initializers.data = {"b0": ir.Value(name="b0", const_value=ir.tensor(extra, name="b0")), **reordered.graph.initializers.data}
    assert list(model.graph.initializers) != list(reordered.graph.initializers)
    assert fuzz.fingerprint(model) == fuzz.fingerprint(reordered)
    reordered.graph.initializers["b0"].const_value = ir.tensor(2 * extra, name="b0")
    assert fuzz.fingerprint(model) != fuzz.fingerprint(reordered)


def test_float16_transpose_into_matmul_loads_in_onnx_runtime() -> None:
    """ONNX Runtime 1.31's MatmulTransposeFusion segfaults while loading a float16 ``Transpose → MatMul`` (what
    cast-precision makes of a float32 one); bitfold's sessions leave that fusion out. In a child process, so a
    regression fails this test instead of killing the run."""
    import subprocess
    import sys

    code = """
import numpy as np, onnx.parser, onnx_ir as ir, bitfold
model = ir.from_proto(onnx.parser.parse_model('''
    <ir_version: 10, opset_import: ["" : 17]>
    half (float16[2,1,3] x) => (float16[1,3,1] y) <float16[2,1] w = {15360, 15360}> {
        [turn] t = Transpose <perm = [1, 2, 0]> (x)
        [linear] y = MatMul (t, w)
    }'''))
x = np.arange(6, dtype=np.float16).reshape(2, 1, 3)
y = bitfold.compile(model, "ort", "cpu").run({"x": x})["y"]
np.testing.assert_array_equal(y, x.transpose(1, 2, 0) @ np.ones((2, 1), np.float16))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


def test_an_integer_constant_on_the_way_up_does_not_make_a_float16_value_float32() -> None:
    """The float type of an untyped value is searched up its producers; the int64 split sizes of a ``Split`` are no
    answer (they made the scales of a float16 activation float32)."""
    text = f"""
        <ir_version: 10, opset_import: ["" : 17]>
        half (float16[1,2,1] x) => (float16[1,1,1] y) {{
            [constant_w] w = Constant <value = float16[1,4] w {_halves([0.5, -0.3, 0.2, 0.1])}> ()
            [linear] h = MatMul (x, w)
            [constant_sizes] sizes = Constant <value = int64[3] sizes {{2, 1, 1}}> ()
            [split] a, b, c = Split <axis = 2> (h, sizes)
            [constant_k] k = Constant <value = float16[1,2,1] k {_halves([0.7, -0.4])}> ()
            [conv] y = Conv (c, k)
        }}"""
    _assert_ok(_graph(text), fuzz.pass_case("quantize-activations", False))


def test_an_rms_norm_over_a_1d_tensor_loads_after_its_dead_consumer_goes() -> None:
    """ONNX Runtime 1.31's SimplifiedLayerNormFusion fuses ``x / sqrt(mean(x²) + ε) · c`` over a 1-D tensor into a
    node that drops a value still read; while a second (dead) consumer of the division kept the fusion off, the
    graph loaded, and removing the dead node made it fail to load. bitfold's sessions leave that fusion out there."""
    graph = _graph("""
        <ir_version: 10, opset_import: ["" : 21]>
        rms (float[4] x) => (float[4] y) {
            [relu] h = Relu (x)
            [two] two = Constant <value = float two {2}> ()
            [square] p = Pow (h, two)
            [axis] axis = Constant <value = int64[1] axis {-1}> ()
            [mean] m = ReduceMean <keepdims = 1> (p, axis)
            [eps] eps = Constant <value = float eps {1e-6}> ()
            [add] a = Add (m, eps)
            [root] s = Sqrt (a)
            [normed] d = Div (h, s)
            [gain] c = Constant <value = float[1] c {0.6}> ()
            [dead] unused = Mul (c, d)
            [scale] k = Constant <value = float k {1.2}> ()
            [out] y = Mul (d, k)
        }""")
    _assert_ok(graph, fuzz.pass_case("remove-dead", True))
    _assert_ok(graph, next(case for case in fuzz.pass_cases() if case.label == "canonical"))


def test_float16_activation_scales_around_a_concat_load() -> None:
    """ONNX Runtime's QDQ fusion turns ``DequantizeLinear → Concat → QuantizeLinear`` with float16 scales into a
    QLinearConcat that fails its own type check at load; graphs with float16 activation scales load without QDQ
    fusion."""
    graph = _graph(f"""
        <ir_version: 10, opset_import: ["" : 19]>
        half (float16[8,4] x) => (float16[8,1] y) {{
            [relu] r = Relu (x)
            [constant_w] w = Constant <value = float16[3,8] w {_weights((3, 8), 1, half=True)}> ()
            [constant_b] b = Constant <value = float16[1,3] b {_weights((1, 3), 2, half=True)}> ()
            [gemm] h = Gemm <transA = 1, transB = 1> (r, w, b)
            [concat] c = Concat <axis = 0> (h, h)
            [constant_v] v = Constant <value = float16[3,1] v {_weights((3, 1), 3, half=True)}> ()
            [head] y = Gemm (c, v)
        }}""")
    _assert_ok(graph, fuzz.pass_case("quantize-activations", False))


def test_centering_a_layernorm_at_opset_17_gives_reduce_mean_its_axes_as_an_attribute() -> None:
    """fold-norm-affine with ``center = true`` turns a LayerNorm into an RMS norm; below opset 18 ReduceMean takes
    its axes as an attribute, not an input (the input form failed the ONNX checker). The residual stream here ends in
    a dead value, so nothing reads it but the norm and nothing keeps it from being centred."""
    graph = _graph(f"""
        <ir_version: 10, opset_import: ["" : 17]>
        stream (int64[2,1] ids) => (float[2,1,5] y)
            <float[8,16] table = {_weights((8, 16), 1)}, float[16] g = {_weights((16,), 2)}, float[16] b = {_weights((16,), 3)},
             float[16,5] w1 = {_weights((16, 5), 4)}, float[5,16] w2 = {_weights((5, 16), 5)}> {{
            [embed] h = Gather (table, ids)
            [norm] n = LayerNormalization (h, g, b)
            [up] a = MatMul (n, w1)
            [down] o = MatMul (a, w2)
            [residual] r = Add (o, h)
            [out] y = Relu (a)
        }}""")
    case = next(case for case in fuzz.pass_cases() if case.label == "fold-norm-affine(center=True)")
    _assert_ok(graph, case)


_CANCELLING_BN = """
    <ir_version: 10, opset_import: ["" : 17]>
    half (float16[1,4,1] x) => (float16[1,1,1] y)
        <float16[4,1,1] w = {43876,47378,48201,44417}, float16[1] scale = {47788}, float16[1] bias = {44823},
         float16[1] mean = {46130}, float16[1] var = {15451}> {
        [up] h = ConvTranspose (x, w)
        [bn] y = BatchNormalization (h, scale, bias, mean, var)
    }"""


def test_folding_a_cancelling_batchnorm_in_float16_is_held_to_the_graphs_own_rounding() -> None:
    """BatchNormalization whose bias nearly cancels its scaled input leaves an output far smaller than its terms;
    folding it into float16 constants rounds those terms, which is many units of the output's own rounding. The
    fuzz contract allows an exact float16 rewrite what re-rounding the graph's float16 constants moves the output
    (``fuzz.ROUNDING_FLOOR``), and no more: a rewrite that doubles the output is still a mismatch (here the
    constants' rounding alone moves it by a few percent)."""
    x = np.array([15401, 15388, 45751, 48010], np.uint16).view(np.float16).reshape(1, 4, 1)  # the fuzzed input
    graph = fuzz.FuzzGraph(ir.from_proto(onnx.parser.parse_model(_CANCELLING_BN)), {"x": x}, [], "float16", {"y": (1, 1, 1)})
    case = fuzz.pass_case("fold-batchnorm", True)
    assert fuzz.compare(graph.reference()["y"], _folded(graph)["y"], exact=True, tol=fuzz.FLOAT16_TOLERANCE) is not None
    _assert_ok(graph, case)

    def wrong(model, steps, calibration):  # fold, then double the output
        result, report = bitfold.optimize(model, steps, calibration)
        out = result.graph.outputs[0]
        factor = ir.Value(name="factor", const_value=ir.tensor(np.array([2.0], np.float16), name="factor"))
        result.graph.register_initializer(factor)
        scaled = ir.node("Mul", [out.producer().outputs[0], factor])
        result.graph.append(scaled)
        scaled.outputs[0].name, scaled.outputs[0].dtype, scaled.outputs[0].shape = "y_scaled", out.dtype, out.shape
        result.graph.outputs[0] = scaled.outputs[0]
        scaled.outputs[0].name = "y"
        out.name = "y_unscaled"
        return result, report

    assert fuzz.check(graph, case, optimize=wrong).kind == "mismatch"


def _folded(graph: fuzz.FuzzGraph) -> dict[str, np.ndarray]:
    from bitfold.backends.ort import OrtRunnable

    model, _ = bitfold.optimize(bitfold.clone(graph.model), ["fold-batchnorm"])
    return OrtRunnable(model, device="cpu").run(graph.feeds)
