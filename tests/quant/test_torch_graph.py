"""TorchGraph against ONNX Runtime: op by op, on whole zoo graphs and on a block of one, and its gradients against
finite differences."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from conftest import fresh

import bitfold
from bitfold.backends.ort import OrtRunnable
from bitfold.errors import BitfoldError, InputSpecError
from bitfold.passes.canonical import CANONICAL
from bitfold.quant.calibration import expose
from bitfold.quant.torch_graph import OPS, TorchGraph


def _model(signature: str, body: str, opset: int = 18) -> onnx.ModelProto:
    """A one-graph model from ONNX text; outputs are declared by type only (their shapes are left to inference)."""
    model = onnx.parser.parse_model(f'<ir_version: 10, opset_import: ["" : {opset}]>\ng {signature} {{\n{body}\n}}')
    for output in model.graph.output:
        output.type.tensor_type.ClearField("shape")
    return model


def _feeds(graph: ir.Graph, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded feeds: floats standard normal, or in [0.5, 2) for inputs whose name starts with 'p'; int64 in
    [0, 2); bool fair coins."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in graph.inputs:
        shape = [int(d) for d in value.shape]
        if value.dtype == ir.DataType.INT64:
            feeds[value.name] = rng.integers(0, 2, shape).astype(np.int64)
        elif value.dtype == ir.DataType.BOOL:
            feeds[value.name] = rng.random(shape) < 0.5
        elif value.name.startswith("p"):
            feeds[value.name] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _assert_same(actual: torch.Tensor, expected: np.ndarray, name: str) -> None:
    """Integers and booleans exactly; floats to 1e-5 relative (elementwise, with 1e-5 of the tensor's largest
    magnitude as the floor for elements near zero)."""
    actual = actual.detach().numpy()
    assert actual.shape == expected.shape, name
    if np.issubdtype(expected.dtype, np.floating):
        atol = 1e-5 * float(np.abs(expected).max(initial=0.0))
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=atol, err_msg=name)
    else:
        np.testing.assert_array_equal(actual, expected.astype(actual.dtype), err_msg=name)


UNARY = ["Neg", "Sqrt", "Reciprocal", "Exp", "Log", "Abs", "Relu", "Sigmoid", "Tanh", "Erf", "Cos", "Sin", "Floor",
         "Ceil", "Round", "Identity", "Softmax", "LogSoftmax"]  # fmt: skip

CASES: dict[str, tuple[str, str, int]] = {
    **{op.lower(): (f"(float[3,4] {'p' if op in ('Sqrt', 'Log', 'Reciprocal') else 'x'}) => (float y)",
                    f"y = {op}({'p' if op in ('Sqrt', 'Log', 'Reciprocal') else 'x'})", 18) for op in UNARY},  # fmt: skip
    "add-sub-mul-div": ("(float[2,3] a, float[3] b, float[2,1] p) => (float s, float d, float m, float q)",
                        "s = Add(a, b)\n d = Sub(b, a)\n m = Mul(a, p)\n q = Div(a, p)", 18),
    "pow": ("(float[2,3] p, float[3] b) => (float y, float z) <int64 two = {2}>", "y = Pow(p, b)\n z = Pow(b, two)", 18),
    "int-arithmetic": ("() => (int64 d, int64 s) <int64[4] a = {-7, 7, -3, 5}, int64[4] b = {2, -2, 2, 3}>",
                       "d = Div(a, b)\n s = Sub(a, b)", 18),
    "variadic-max-min-sum": ("(float[2,3] a, float[3] b, float[2,1] c) => (float x, float n, float s)",
                             "x = Max(a, b, c)\n n = Min(a, b)\n s = Sum(a, b, c)", 18),
    "gelu": ("(float[3,4] x) => (float y)", "y = Gelu(x)", 20),
    "gelu-tanh": ("(float[3,4] x) => (float y)", 'y = Gelu <approximate = "tanh"> (x)', 20),
    "softmax-axis": ("(float[2,3,4] x) => (float y, float z)", "y = Softmax <axis = 1> (x)\n z = LogSoftmax <axis = 0> (x)", 18),
    "matmul": ("(float[2,5,3] a, float[3,4] b, float[2,1,4,6] c) => (float y, float z)",
               "y = MatMul(a, b)\n z = MatMul(y, c)", 18),
    "gemm": ("(float[3,4] a, float[4,5] b, float[5] c) => (float y)", "y = Gemm(a, b, c)", 18),
    "gemm-trans-alpha-beta": ("(float[4,3] a, float[5,4] b, float[3,5] c) => (float y)",
                              "y = Gemm <transA = 1, transB = 1, alpha = 0.5, beta = 2.0> (a, b, c)", 18),
    "gemm-no-c": ("(float[3,4] a, float[5,4] b) => (float y)", "y = Gemm <transB = 1, alpha = 3.0> (a, b)", 18),
    "conv2d": ("(float[2,4,9,8] x, float[6,2,3,3] w, float[6] b) => (float y)",
               "y = Conv <group = 2, dilations = [2, 1], strides = [2, 1], pads = [1, 0, 2, 1]> (x, w, b)", 18),
    "conv2d-symmetric": ("(float[1,3,7,7] x, float[4,3,3,3] w) => (float y)", "y = Conv <pads = [1, 1, 1, 1]> (x, w)", 18),
    "conv2d-depthwise": ("(float[1,4,6,6] x, float[4,1,3,3] w) => (float y)",
                         "y = Conv <group = 4, strides = [2, 2], pads = [1, 1, 1, 1]> (x, w)", 18),
    "conv1d": ("(float[2,4,11] x, float[6,4,3] w, float[6] b) => (float y)",
               "y = Conv <dilations = [2], strides = [2], pads = [2, 1]> (x, w, b)", 18),
    "conv-transpose": ("(float[1,4,5,5] x, float[4,3,2,3] w, float[6] b) => (float y)",
                       "y = ConvTranspose <group = 2, strides = [2, 2], pads = [1, 0, 0, 1], output_padding = [1, 0]> (x, w, b)", 18),
    "batchnorm": ("(float[2,3,4,5] x, float[3] s, float[3] b, float[3] m, float[3] pvar) => (float y)",
                  "y = BatchNormalization <epsilon = 0.01> (x, s, b, m, pvar)", 18),
    "batchnorm-rank2": ("(float[4,3] x, float[3] s, float[3] b, float[3] m, float[3] pvar) => (float y)",
                        "y = BatchNormalization(x, s, b, m, pvar)", 18),
    "layernorm": ("(float[2,3,8] x, float[8] s, float[8] b) => (float y)", "y = LayerNormalization(x, s, b)", 18),
    "layernorm-axis-no-bias": ("(float[2,3,8] x, float[3,8] s) => (float y)",
                               "y = LayerNormalization <axis = 1, epsilon = 0.1> (x, s)", 18),
    "reduce-mean-attr-17": ("(float[2,3,4] x) => (float y, float z)",
                            "y = ReduceMean <axes = [1, -1]> (x)\n z = ReduceMean <axes = [0], keepdims = 0> (x)", 17),
    "reduce-mean-input-18": ("(float[2,3,4] x) => (float y, float z, float a) <int64[2] ax = {1, -1}, int64[1] a0 = {0}>",
                             "y = ReduceMean(x, ax)\n z = ReduceMean <keepdims = 0> (x, a0)\n a = ReduceMean <keepdims = 0> (x)", 18),
    "reduce-sum-max-min": ("(float[2,3,4] x) => (float s, float m, float n) <int64[1] ax = {-2}>",
                           "s = ReduceSum(x, ax)\n m = ReduceMax <keepdims = 0> (x, ax)\n n = ReduceMin(x)", 18),
    "reduce-norms": ("(float[2,3,4] x) => (float a, float b, float c) <int64[1] ax = {-1}>",
                     "a = ReduceL2(x, ax)\n b = ReduceL1 <keepdims = 0> (x, ax)\n c = ReduceSumSquare(x)", 18),
    "reduce-sum-attr-11": ("(float[2,3,4] x) => (float s)", "s = ReduceSum <axes = [2], keepdims = 0> (x)", 11),
    "reshape": ("(float[2,3,4] x) => (float y, float z) <int64[2] s = {0, -1}, int64[3] t = {-1, 2, 3}>",
                "y = Reshape(x, s)\n z = Reshape(x, t)", 18),
    "transpose": ("(float[2,3,4] x) => (float y, float z)", "y = Transpose <perm = [1, 2, 0]> (x)\n z = Transpose(x)", 18),
    "concat": ("(float[2,3] a, float[2,1] b) => (float y)", "y = Concat <axis = -1> (a, b, a)", 18),
    "split-sizes": ("(float[2,7] x) => (float a, float b) <int64[2] s = {3, 4}>", "a, b = Split <axis = 1> (x, s)", 18),
    "split-num-outputs": ("(float[2,7] x) => (float a, float b, float c)",
                          "a, b, c = Split <axis = -1, num_outputs = 3> (x)", 18),
    "split-equal": ("(float[6,2] x) => (float a, float b)", "a, b = Split(x)", 17),
    "split-attr-11": ("(float[5,2] x) => (float a, float b)", "a, b = Split <split = [2, 3]> (x)", 11),
    "slice": ("(float[5,6,7] x) => (float y) <int64[2] st = {1, -4}, int64[2] en = {9223372036854775807, -1}, "
              "int64[2] ax = {0, -1}, int64[2] sp = {2, 1}>", "y = Slice(x, st, en, ax, sp)", 18),
    "slice-negative-steps": ("(float[5,6] x) => (float y, float z) <int64[2] st = {-1, 4}, int64[2] en = {-1000, 0}, "
                             "int64[2] sp = {-1, -2}, int64[1] s1 = {100}, int64[1] e1 = {1}, int64[1] a1 = {1}, "
                             "int64[1] m1 = {-2}>", "y = Slice(x, st, en, , sp)\n z = Slice(x, s1, e1, a1, m1)", 18),
    "slice-defaults": ("(float[5,6] x) => (float y) <int64[1] st = {-3}, int64[1] en = {100}>", "y = Slice(x, st, en)", 18),
    "gather": ("(float[5,3] x) => (float y, float z) <int64[2,2] i = {0, -1, 3, 3}, int64 j = {-2}>",
               "y = Gather(x, i)\n z = Gather <axis = 1> (x, j)", 18),
    "unsqueeze-squeeze": ("(float[3,1,4] x) => (float u, float s, float a) <int64[2] ua = {0, -1}, int64[1] sa = {1}>",
                          "u = Unsqueeze(x, ua)\n s = Squeeze(x, sa)\n a = Squeeze(u)", 18),
    "unsqueeze-squeeze-attr-11": ("(float[3,1,4] x) => (float u, float s)",
                                  "u = Unsqueeze <axes = [0, 4]> (x)\n s = Squeeze <axes = [1]> (x)", 11),
    "expand": ("(float[3,1] x) => (float y) <int64[3] s = {2, 1, 4}>", "y = Expand(x, s)", 18),
    "shape-constant-of-shape": ("(float[2,3,4,5] x) => (int64 s, float c, int64 i)",
                                "s = Shape <start = 1, end = -1> (x)\n c = ConstantOfShape <value = float[1] {1.5}> (s)\n"
                                " i = ConstantOfShape <value = int64[1] {7}> (s)", 18),
    "range": ("() => (int64 r, float f) <int64 a = {1}, int64 b = {10}, int64 c = {3}, float d = {0.5}, float e = {-2.0}, "
              "float g = {-0.75}>", "r = Range(a, b, c)\n f = Range(d, e, g)", 18),
    "cast": ("(float[3,4] x) => (int64 i, float h, float f, bool b)",
             "i = Cast <to = 7> (x)\n k = Cast <to = 10> (x)\n h = Cast <to = 1> (k)\n f = Cast <to = 1> (i)\n"
             " b = Cast <to = 9> (i)", 18),
    "compare-logic": ("(float[3,4] x, float[4] y) => (float w, bool e, bool l, bool le, bool g, bool n, bool a)",
                      "l = Less(x, y)\n le = LessOrEqual(x, y)\n g = Greater(x, y)\n xi = Cast <to = 7> (x)\n"
                      " yi = Cast <to = 7> (y)\n e = Equal(xi, yi)\n n = Not(l)\n a = And(g, e)\n w = Where(g, x, y)", 18),
    "isnan-isinf": ("() => (bool n, bool i, bool p, bool m) <float[5] x = {1.0, -inf, inf, nan, 0.0}>",
                    "n = IsNaN(x)\n i = IsInf(x)\n p = IsInf <detect_negative = 0> (x)\n m = IsInf <detect_positive = 0> (x)", 18),
    "gather-nd": ("(float[2,3,4] x) => (float y, float z, float w) <int64[2,2] i = {0, -1, 1, 2}, int64[2,1,1] j = {2, 0}, "
                  "int64[2,3] k = {0, 1, 3, 1, 2, -1}>",
                  "y = GatherND(x, i)\n z = GatherND <batch_dims = 1> (x, j)\n w = GatherND(x, k)", 18),
    "trilu": ("(float[2,4,5] x) => (float u, float l) <int64 k = {1}>", "u = Trilu(x, k)\n l = Trilu <upper = 0> (x)", 18),
    "clip": ("(float[3,4] x, float lo, float hi) => (float y, float z)", "y = Clip(x, lo, hi)\n z = Clip(x, , hi)", 18),
    "pad": ("(float[2,3,4,5] x) => (float c, float v, float a, float r, float e) <int64[8] p = {0, 0, 1, 2, 0, 0, 2, -1}, "
            "float f = {1.5}, int64[4] q = {1, 2, 2, 1}, int64[2] ax = {-1, 1}>",
            "c = Pad(x, p)\n v = Pad(x, p, f)\n a = Pad(x, q, f, ax)\n r = Pad <mode = \"reflect\"> (x, q, , ax)\n"
            " e = Pad <mode = \"edge\"> (x, p)", 18),
    "qdq-tensor-axis": ("(float[2,3,4] x) => (float y, float z, float u) <float s = {0.05}, uint8 zp = {120}, "
                        "float[3] sa = {0.02, 0.04, 0.1}, int8[3] za = {0, -3, 5}>",
                        "q = QuantizeLinear(x, s, zp)\n y = DequantizeLinear(q, s, zp)\n qa = QuantizeLinear <axis = 1> (x, sa, za)\n"
                        " z = DequantizeLinear <axis = 1> (qa, sa, za)\n qs = QuantizeLinear(x, s)\n u = DequantizeLinear(qs, s)", 18),
    "dq-blocked": ("(float[2,4] x) => (float y) <int8[4,4] w = {-8, -1, 0, 7, 3, 2, 1, 0, 5, -5, 6, -6, 1, 1, 1, 1}, "
                        "float[2,4] s = {0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8}>",
                        "d = DequantizeLinear <axis = 0, block_size = 2> (w, s)\n y = MatMul(x, d)", 21),
    "cnn-pools": ("(float[2,3,7,6] x) => (float g, float m, float f, float hs, float hw, float mp, float ap, float ai, float ac)",
                  "g = GlobalAveragePool(x)\n m = GlobalMaxPool(x)\n f = Flatten <axis = 2> (x)\n hs = HardSigmoid <alpha = 0.3> (x)\n"
                  " hw = HardSwish(x)\n mp = MaxPool <kernel_shape = [3, 3], strides = [2, 2], pads = [1, 0, 1, 1]> (x)\n"
                  " ap = AveragePool <kernel_shape = [3, 2], pads = [1, 1, 0, 1]> (x)\n"
                  " ai = AveragePool <kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1], count_include_pad = 1> (x)\n"
                  " ac = AveragePool <kernel_shape = [2, 2], strides = [2, 2], ceil_mode = 1> (x)", 18),
    "constant": ("(float[2] x) => (float y, int64 s)",
                 "c = Constant <value = float[2] {1.5, -2}> ()\n y = Mul(x, c)\n s = Constant <value_ints = [3, 4]> ()", 18),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_op_matches_onnxruntime(case: str) -> None:
    signature, body, opset = CASES[case]
    proto = _model(signature, body, opset)
    graph = ir.from_proto(proto).graph
    feeds = _feeds(graph)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
    actual = TorchGraph(graph)(**feeds)
    assert list(actual) == list(expected)
    for name, value in expected.items():
        _assert_same(actual[name], value, f"{case}: {name}")


def test_the_op_table_covers_what_block_reconstruction_needs() -> None:
    required = ("Add Sub Mul Div Pow Neg Sqrt Reciprocal Exp Log Abs Relu Sigmoid Tanh Erf Gelu Softmax LogSoftmax "
                "MatMul Gemm Conv BatchNormalization LayerNormalization ReduceMean ReduceSum ReduceMax Reshape Transpose "
                "Concat Split Slice Gather Unsqueeze Squeeze Expand Shape ConstantOfShape Range Cast Where Equal Less "
                "LessOrEqual Greater Not And Cos Sin Trilu Clip Identity Constant Pad QuantizeLinear DequantizeLinear")  # fmt: skip
    assert {("", op) for op in required.split()} <= set(OPS)


def _canonical(zoo_protos: dict[str, bytes], name: str) -> ir.Model:
    model, _ = bitfold.optimize(fresh(zoo_protos, name), list(CANONICAL))
    return model


@pytest.mark.parametrize("name", ["decoder-rmsnorm-swiglu-rope", "cnn-bn", "shared-bn-input", "encoder-layernorm", "tiny-lm"])
def test_whole_zoo_graph_matches_onnxruntime(zoo_protos, name: str) -> None:
    model = _canonical(zoo_protos, name)
    feeds = _feeds(model.graph)
    expected = OrtRunnable(model, device="cpu").run(feeds)
    actual = TorchGraph(model.graph)(*feeds.values())
    assert set(actual) == set(expected)
    for output, value in expected.items():
        _assert_same(actual[output], value, f"{name}: {output}")


def _first_matmul_to_next_add(graph: ir.Graph) -> list[ir.Node]:
    nodes = list(graph)
    first = next(i for i, node in enumerate(nodes) if node.op_type == "MatMul")
    last = next(i for i, node in enumerate(nodes) if i > first and node.op_type == "Add")
    return nodes[first : last + 1]


def test_block_matches_onnxruntime_on_the_same_tensors(zoo_protos) -> None:
    model = _canonical(zoo_protos, "decoder-rmsnorm-swiglu-rope")
    block = _first_matmul_to_next_add(model.graph)
    assert len(block) >= 5
    torch_block = TorchGraph(model.graph, nodes=block)
    assert torch_block.input_names == [block[0].inputs[0].name]
    assert block[-1].outputs[0].name in torch_block.output_names
    feeds = _feeds(model.graph)
    values = OrtRunnable(expose(model, torch_block.input_names + torch_block.output_names), device="cpu").run(feeds)
    actual = torch_block(**{name: values[name] for name in torch_block.input_names})
    assert list(actual) == torch_block.output_names
    for name, tensor in actual.items():
        _assert_same(tensor, values[name], name)


def test_block_with_explicit_inputs_and_outputs(zoo_protos) -> None:
    model = _canonical(zoo_protos, "decoder-rmsnorm-swiglu-rope")
    block = _first_matmul_to_next_add(model.graph)
    matmul = block[0]
    torch_block = TorchGraph(model.graph, nodes=block[:1], inputs=[matmul.inputs[0]], outputs=matmul.outputs)
    assert torch_block.input_names == [matmul.inputs[0].name]
    assert torch_block.output_names == [matmul.outputs[0].name]
    with pytest.raises(BitfoldError, match="neither fed"):
        TorchGraph(model.graph, nodes=block[1:3], inputs=[])


def _weight_of_first_matmul(graph: ir.Graph) -> str:
    return next(n.inputs[1].name for n in graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None)


def test_trainable_weight_gets_the_finite_difference_gradient(zoo_protos) -> None:
    model = _canonical(zoo_protos, "decoder-rmsnorm-swiglu-rope")
    weight = _weight_of_first_matmul(model.graph)
    x = torch.from_numpy(_feeds(model.graph)["x"]).double()
    module = TorchGraph(model.graph, trainable=lambda v: v.name == weight, dtype=torch.float64)
    assert list(module.parameters_by_name) == [weight]
    assert [p for p in module.parameters()] == [module.parameters_by_name[weight]]
    probe = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 8, 32)))

    def loss() -> torch.Tensor:
        (y,) = module(x).values()
        return (y * probe).sum()

    loss().backward()
    w = module.parameters_by_name[weight]
    assert torch.isfinite(w.grad).all() and w.grad.abs().max() > 0
    index = tuple(int(i) for i in np.unravel_index(int(w.grad.abs().argmax()), w.shape))
    eps = 1e-6
    with torch.no_grad():
        w[index] += eps
        up = loss().item()
        w[index] -= 2 * eps
        down = loss().item()
        w[index] += eps
    np.testing.assert_allclose(float(w.grad[index]), (up - down) / (2 * eps), rtol=1e-3)


def test_float32_gradient_is_finite_and_buffers_stay_fixed(zoo_protos) -> None:
    model = _canonical(zoo_protos, "decoder-rmsnorm-swiglu-rope")
    weight = _weight_of_first_matmul(model.graph)
    module = TorchGraph(model.graph, trainable=lambda v: v.name == weight)
    assert module.parameters_by_name[weight].dtype == torch.float32
    assert all(not b.requires_grad for b in module.buffers())
    (y,) = module(x=_feeds(model.graph)["x"]).values()
    y.square().mean().backward()
    grad = module.parameters_by_name[weight].grad
    assert torch.isfinite(grad).all() and grad.abs().max() > 0


def test_inputs_by_position_or_name_and_integers_stay_integer() -> None:
    graph = ir.from_proto(_model("(float[2,3] x, int64[2] i) => (float y, int64 j)", "y = Gather <axis = 1> (x, i)\n j = Add(i, i)")).graph
    module = TorchGraph(graph, dtype=torch.float64)
    x, i = np.ones((2, 3), np.float32), np.array([0, 2], np.int32)
    by_position, by_name = module(x, i), module(i=i, x=x)
    assert by_position["y"].dtype == torch.float64 and by_position["j"].dtype == torch.int64
    assert torch.equal(by_position["y"], by_name["y"]) and torch.equal(by_position["j"], by_name["j"])
    with pytest.raises(InputSpecError, match="'i'"):
        module(x)
    with pytest.raises(InputSpecError, match="'z'"):
        module(x, i, z=x)


def test_unsupported_op_is_refused_naming_the_op_and_node() -> None:
    graph = ir.from_proto(_model("(float[2,3] x) => (float y)", "[mystery] y = Hardmax(x)")).graph
    with pytest.raises(BitfoldError, match="'Hardmax'.*'mystery'"):
        TorchGraph(graph)


def test_same_padding_is_refused() -> None:
    graph = ir.from_proto(_model("(float[1,1,4,4] x, float[1,1,3,3] w) => (float y)", 'y = Conv <auto_pad = "SAME_UPPER"> (x, w)')).graph
    with pytest.raises(BitfoldError, match="auto_pad SAME_UPPER"):
        TorchGraph(graph)(np.ones((1, 1, 4, 4), np.float32), np.ones((1, 1, 3, 3), np.float32))


def test_integer_constants_cannot_be_trained() -> None:
    graph = ir.from_proto(_model("(float[2,3] x) => (float y) <int64[2] s = {3, 2}>", "y = Reshape(x, s)")).graph
    with pytest.raises(BitfoldError, match="'s' is not a float tensor"):
        TorchGraph(graph, trainable=lambda v: True)


def test_fake_quantization_passes_gradients_straight_through_and_can_be_switched_off() -> None:
    proto = _model("(float[64] x) => (float y) <float s = {0.05}, uint8 zp = {128}>",
                   "q = QuantizeLinear(x, s, zp)\n d = DequantizeLinear(q, s, zp)\n y = Mul(d, d)", 18)
    module = TorchGraph(ir.from_proto(proto).graph)
    x = torch.linspace(-8.0, 8.0, 64, requires_grad=True)  # the grid covers (-6.4, 6.35): the ends saturate
    y = module(x)["y"]
    fq = torch.clamp(torch.round(x.detach() / 0.05) + 128, 0, 255) * 0.05 - 6.4
    torch.testing.assert_close(y, fq * fq)
    y.sum().backward()
    inside = (x.detach() > -6.4) & (x.detach() < 6.35)
    torch.testing.assert_close(x.grad, torch.where(inside, 2 * fq, torch.zeros(())))  # d(round)/dx taken as 1 inside
    module.fake_quantize = False
    torch.testing.assert_close(module(x)["y"], x.detach() ** 2)
