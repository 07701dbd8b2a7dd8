from __future__ import annotations

import numpy as np
import pytest
from conftest import fresh

import bitfold
from bitfold.errors import BitfoldError
from bitfold.passes.canonical import CANONICAL
from bitfold.quant.calibration import CalibrationData


@pytest.fixture(scope="module")
def cnn(zoo_protos):
    model, _ = bitfold.optimize(fresh(zoo_protos, "cnn-bn"), list(CANONICAL))
    return bitfold.clone(model)


def _calibration(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return CalibrationData([{"x": rng.standard_normal((2, 3, 16, 16)).astype(np.float32)} for _ in range(n)])


def _out(model, feeds):
    return next(iter(bitfold.compile(model, "ort", "cpu").run(feeds).values()))


@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse"])
@pytest.mark.parametrize("activation_dtype", ["uint8", "int8"])
def test_w8a8_qdq_structure_and_bounded_error(cnn, observer, activation_dtype):
    model, report = bitfold.optimize(
        bitfold.clone(cnn),
        [{"name": "quantize-activations", "observer": observer, "activation_dtype": activation_dtype, "graph_inputs": True}],
        _calibration(),
    )
    # targets: 2 Conv + 1 Gemm. Q/DQ pairs: x; conv1's output taken after its Relu, which is also the depthwise
    # conv's input (one shared pair); the depthwise output after its Relu; the Gemm input. The Gemm output is a
    # graph output. DequantizeLinear also on 3 int8 weights and 3 int32 biases.
    assert report.passes[0].ops_added == {"QuantizeLinear": 4, "DequantizeLinear": 10}
    relu_outputs = [n.outputs[0] for n in model.graph if n.op_type == "Relu"]
    assert all(any(u.op_type == "QuantizeLinear" for u, _ in v.uses()) for v in relu_outputs[:2])
    for node in model.graph:
        if node.op_type in ("Conv", "Gemm"):
            assert all(v.producer() is not None and v.producer().op_type == "DequantizeLinear" for v in node.inputs[:2])
    feeds = _calibration(1, seed=9).__iter__().__next__()
    ref, got = _out(cnn, feeds), _out(model, feeds)
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()
    _, again = bitfold.optimize(model, [{"name": "quantize-activations"}], _calibration())
    assert not again.passes[0].modified


def test_inputs_only_mode(cnn):
    _, report = bitfold.optimize(bitfold.clone(cnn), [{"name": "quantize-activations", "outputs": False, "graph_inputs": True}], _calibration())
    assert report.passes[0].ops_added == {"QuantizeLinear": 3, "DequantizeLinear": 6}


def test_graph_input_readers_stay_float_by_default(cnn):
    model, report = bitfold.optimize(bitfold.clone(cnn), [{"name": "quantize-activations"}], _calibration())
    convs = [n for n in model.graph if n.op_type in ("Conv", "Gemm")]
    first, rest = convs[0], convs[1:]
    assert first.inputs[0] is model.graph.inputs[0] and first.inputs[1].producer() is None  # float input and weight
    for node in rest:
        assert all(v.producer() is not None and v.producer().op_type == "DequantizeLinear" for v in node.inputs[:2])
    assert report.passes[0].ops_added["QuantizeLinear"] == 3  # conv1's Relu output, conv2's Relu output, Gemm input


def test_qdq_pair_matches_numpy_quantization(cnn):
    model, _ = bitfold.optimize(bitfold.clone(cnn), [{"name": "quantize-activations", "weights": False, "graph_inputs": True}], _calibration())
    q = next(n for n in model.graph if n.op_type == "QuantizeLinear")
    scale, zero = q.inputs[1].const_value.numpy(), q.inputs[2].const_value.numpy()
    stats = _calibration().collect(cnn, [q.inputs[0].name], progress=False)[q.inputs[0].name]
    lo, hi = min(stats.min, 0), max(stats.max, 0)
    assert scale == pytest.approx((hi - lo) / 255, rel=1e-6) and zero == round(-lo / scale)


def test_mse_observer_never_worse_than_minmax_on_its_sample():
    from bitfold.passes.quant.quantize_activations import QuantizeActivations
    from bitfold.quant.calibration import TensorStats

    stats = TensorStats()
    stats.update(np.random.default_rng(0).standard_t(2, (4096, 8)), gram=False, reservoir=100_000, rng=np.random.default_rng(0))
    errs = {}
    for dtype in ("uint8", "fp8-e4m3"):
        for observer in ("minmax", "mse"):
            p = QuantizeActivations(observer=observer, activation_dtype=dtype)
            x = stats.reservoir
            errs[dtype, observer] = float(np.sum((p.round_trip(x, *p.observe(stats)) - x) ** 2))
        assert errs[dtype, "mse"] <= errs[dtype, "minmax"]
    assert errs["uint8", "mse"] < errs["uint8", "minmax"]
    x = stats.reservoir  # the uint8 round trip is the textbook one
    scale, zero = (stats.max - stats.min) / 255, round(-stats.min / ((stats.max - stats.min) / 255))
    reference = (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale
    np.testing.assert_allclose(QuantizeActivations().round_trip(x, stats.min, stats.max), reference, atol=1e-6)


@pytest.mark.parametrize("dtype", ["fp8-e4m3", "fp8-e5m2"])
def test_fp8_activations_and_weights_run_in_ort_as_numpy_predicts(cnn, dtype):
    import ml_dtypes

    from bitfold.passes.quant.quantize_activations import QuantizeActivations

    fp8 = {"fp8-e4m3": ml_dtypes.float8_e4m3fn, "fp8-e5m2": ml_dtypes.float8_e5m2}[dtype]
    step = {"name": "quantize-activations", "activation_dtype": dtype, "graph_inputs": True}
    model, report = bitfold.optimize(bitfold.clone(cnn), [step], _calibration())
    assert model.opset_imports[""] >= 19
    assert report.passes[0].ops_added == {"QuantizeLinear": 4, "DequantizeLinear": 7}  # weights, no int32 biases
    for node in model.graph:
        if node.op_type == "QuantizeLinear":
            assert node.inputs[2].const_value.numpy().dtype == fp8
        if node.op_type in ("Conv", "Gemm"):
            w = node.inputs[1].producer().inputs[0].const_value.numpy()
            assert w.dtype == fp8 and node.inputs[2].producer() is None  # float bias
    # the first Q/DQ pair alone, under ORT, equals the numpy round trip on the graph input
    model, _ = bitfold.optimize(bitfold.clone(cnn), [{**step, "weights": False, "outputs": False}], _calibration())
    q = next(n for n in model.graph if n.op_type == "QuantizeLinear")
    probe = bitfold.clone(model)
    dq_out = next(n for n in probe.graph if n.op_type == "DequantizeLinear").outputs[0]
    probe.graph.outputs.append(dq_out)
    feeds = next(iter(_calibration(1, seed=9)))
    got = bitfold.compile(probe, "ort", "cpu").run(feeds)[dq_out.name]
    stats = _calibration().collect(cnn, [q.inputs[0].name], progress=False)[q.inputs[0].name]
    expected = QuantizeActivations(activation_dtype=dtype).round_trip(feeds["x"], stats.min, stats.max)
    np.testing.assert_array_equal(got, expected.astype(np.float32))
    ref, out = _out(cnn, feeds), _out(model, feeds)
    assert np.abs(out - ref).max() <= (0.05 if dtype == "fp8-e4m3" else 0.15) * np.abs(ref).max()


def test_needs_calibration(cnn):
    with pytest.raises(BitfoldError, match="needs calibration data"):
        bitfold.optimize(bitfold.clone(cnn), ["quantize-activations"])


def test_bias_correction_removes_the_mean_output_shift_of_weight_rounding(zoo_protos):
    model, _ = bitfold.optimize(fresh(zoo_protos, "cnn-bn"), list(CANONICAL))
    rng = np.random.default_rng(3)
    offset = rng.uniform(-2, 2, (1, 3, 1, 1))  # non-zero input means make the shift visible
    make = lambda: {"x": (rng.standard_normal((2, 3, 16, 16)) + offset).astype(np.float32)}  # noqa: E731
    calib, held_out = CalibrationData([make() for _ in range(32)]), [make() for _ in range(8)]
    drift = {}
    for correct in (False, True):
        quantized, _ = bitfold.optimize(
            bitfold.clone(model), [{"name": "quantize-activations", "bias_correction": correct}], calib
        )
        diffs = [_out(quantized, f) - _out(model, f) for f in held_out]
        drift[correct] = float(np.abs(np.mean(diffs, axis=(0, 1))).mean())
    assert drift[True] < 0.7 * drift[False], drift


def test_chained_targets_share_one_qdq_pair():
    """MatMul → MatMul: the first output's Q/DQ is the second's input; nothing is quantized twice."""
    import onnx_ir as ir

    rng = np.random.default_rng(0)
    x = ir.val("x", ir.DataType.FLOAT, [4, 16])
    w1, w2 = (ir.Value(name=n, const_value=ir.tensor(rng.standard_normal((16, 16)).astype(np.float32))) for n in ("w1", "w2"))
    first = ir.node("MatMul", [x, w1], name="first")
    second = ir.node("MatMul", [first.outputs[0], w2], name="second")
    y = second.outputs[0]
    y.name, y.dtype, y.shape = "y", ir.DataType.FLOAT, ir.Shape([4, 16])
    graph = ir.Graph([x], [y], nodes=[first, second], initializers=[w1, w2], opset_imports={"": 21}, name="chain")
    calib = CalibrationData([{"x": rng.standard_normal((4, 16)).astype(np.float32)} for _ in range(8)])
    quantized, report = bitfold.optimize(
        ir.Model(graph, ir_version=10), [{"name": "quantize-activations", "graph_inputs": True}], calib, verify=True
    )
    assert report.passes[0].ops_added["QuantizeLinear"] == 2  # x, and first's output (y is a graph output)
    assert report.passes[0].max_rel < 0.05


def test_fp8_after_relu6_loads_in_ort():
    """Conv → ReLU6 (Clip) → fp8 QuantizeLinear: ORT's Clip/QuantizeLinear rule rejects fp8 zero points at session
    load unless the backend switches it off; with it off the graph runs and stays close to fp32."""
    import torch

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU6(), torch.nn.Conv2d(8, 4, 3)).eval()
    example = (torch.randn(1, 3, 12, 12),)
    model, _ = bitfold.optimize(bitfold.from_torch(module, example), list(CANONICAL))
    assert "Clip" in [n.op_type for n in model.graph]
    rng = np.random.default_rng(0)
    calibration = CalibrationData([{model.graph.inputs[0].name: rng.standard_normal((1, 3, 12, 12)).astype(np.float32)} for _ in range(4)])
    fp8, _ = bitfold.optimize(bitfold.clone(model), [{"name": "quantize-activations", "activation_dtype": "fp8-e4m3", "graph_inputs": True}], calibration)
    feeds = next(iter(calibration))
    ref = next(iter(bitfold.compile(model, "ort", "cpu").run(feeds).values()))
    out = next(iter(bitfold.compile(fp8, "ort", "cpu").run(feeds).values()))
    assert np.abs(out - ref).max() <= 0.1 * np.abs(ref).max()


def _gemm_model(alpha, beta, trans_a, trans_b, *, k=32, n=24, m=8, seed=0):
    """y = Gemm(x, B, C) with the given attributes; x is (m, k), or (k, m) with transA."""
    import onnx_ir as ir

    rng = np.random.default_rng(seed)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    c = rng.standard_normal(n).astype(np.float32)
    x = ir.val("x", ir.DataType.FLOAT, [k, m] if trans_a else [m, k])
    weight, bias = (ir.Value(name=name, const_value=ir.tensor(a, name=name)) for name, a in (("B", b), ("C", c)))
    attributes = {"alpha": float(alpha), "beta": float(beta), "transA": trans_a, "transB": trans_b}
    gemm = ir.node("Gemm", [x, weight, bias], attributes=attributes, name="gemm")
    y = gemm.outputs[0]
    y.name, y.dtype, y.shape = "y", ir.DataType.FLOAT, ir.Shape([m, n])
    graph = ir.Graph([x], [y], nodes=[gemm], initializers=[weight, bias], opset_imports={"": 17}, name="gemm")
    return ir.Model(graph, ir_version=10), b, c


def _gemm_feeds(trans_a, samples=32, k=32, m=8, seed=1):
    rng = np.random.default_rng(seed)
    offset = rng.uniform(1.0, 3.0, k) * rng.choice([-1, 1], k)  # non-zero input means make the weight error's shift visible
    feeds = [(rng.standard_normal((m, k)) + offset).astype(np.float32) for _ in range(samples)]
    return [{"x": np.ascontiguousarray(f.T) if trans_a else f} for f in feeds]


@pytest.mark.parametrize(
    ("alpha", "beta", "trans_a", "trans_b"),
    [(2.0, 0.5, 0, 0), (0.5, 3.0, 0, 1), (2.0, 0.5, 1, 0), (0.5, 3.0, 1, 1), (2.0, 1.0, 0, 1), (1.5, 0.0, 0, 0)],
)
def test_gemm_bias_correction_honours_alpha_beta_and_transposes(alpha, beta, trans_a, trans_b):
    """Gemm computes alpha·A'·B' + beta·C: the corrected C is C - alpha·ΔB·E[x] / beta (C replaced, beta set to 1
    when beta = 0), so under ONNX Runtime the mean output over the calibration set loses the weight error's shift."""
    model, b, c = _gemm_model(alpha, beta, trans_a, trans_b)
    feeds = _gemm_feeds(trans_a)
    calibration = CalibrationData(feeds)
    reference = np.stack([_out(model, f) for f in feeds])
    drift, corrected = {}, None
    for correct in (False, True):
        step = {"name": "quantize-activations", "graph_inputs": True, "bias_correction": correct}
        quantized, _ = bitfold.optimize(bitfold.clone(model), [step], calibration)
        got = np.stack([_out(quantized, f) for f in feeds])
        assert np.abs(got - reference).max() <= 0.05 * np.abs(reference).max()  # the int8 grids' error
        drift[correct] = float(np.abs((got - reference).mean(axis=(0, 1))).mean())
        corrected = quantized
    assert drift[True] < 0.1 * drift[False], drift
    gemm = next(n for n in corrected.graph if n.op_type == "Gemm")
    assert gemm.attributes.get_float("beta", 1.0) == (beta or 1.0)
    w_dq = gemm.inputs[1].producer()
    codes, scale = (v.const_value.numpy().astype(np.float64) for v in w_dq.inputs[:2])
    delta = codes * np.expand_dims(scale, 1 - w_dq.attributes.get_int("axis")) - b
    x_mean = np.mean([f["x"].T if trans_a else f["x"] for f in feeds], axis=(0, 1), dtype=np.float64)
    shift = alpha * (delta @ x_mean if trans_b else x_mean @ delta)
    expected = (c if beta else 0.0) - shift / (beta or 1.0)
    bias = gemm.inputs[2]
    if bias.producer() is None:  # a float C: exactly the corrected bias
        np.testing.assert_allclose(bias.const_value.numpy(), expected, rtol=1e-5, atol=1e-5)  # float32 ΔB
    else:  # int32 C (beta = 1): within half a step of its grid
        dq = bias.producer()
        step = dq.inputs[1].const_value.numpy()
        assert np.all(np.abs(dq.inputs[0].const_value.numpy() * step - expected) <= 0.5 * step + 1e-6)
