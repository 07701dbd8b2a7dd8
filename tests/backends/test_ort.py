from __future__ import annotations

import numpy as np
import pytest
from conftest import fresh

import bitfold
from bitfold.errors import BitfoldError


def test_run_matches_numpy_for_an_mlp(zoo_protos):
    model = fresh(zoo_protos, "mlp")
    runnable = bitfold.compile(model, backend="ort", device="cpu")
    assert runnable.device == "cpu" and runnable.input_names == ["x"]
    x = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
    w = {k: v.const_value.numpy() for k, v in model.graph.initializers.items()}
    expected = np.maximum(x @ w["net.0.weight"].T + w["net.0.bias"], 0) @ w["net.3.weight"].T + w["net.3.bias"]
    np.testing.assert_allclose(next(iter(runnable.run({"x": x}).values())), expected, rtol=1e-5, atol=1e-5)


def test_bench_statistics_are_ordered(zoo_protos):
    model = fresh(zoo_protos, "mlp")
    stats = bitfold.compile(model, "ort", "cpu").bench(bitfold.sample_feeds(model), warmup=2, iters=15)
    assert stats["iters"] == 15 and 0 < stats["min"] <= stats["p50"] <= stats["p90"]


def test_auto_device_falls_back_to_cpu_and_cuda_is_explicit(zoo_protos):
    import onnxruntime as ort

    model = fresh(zoo_protos, "mlp")
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    assert bitfold.compile(model, "ort", "auto").device == ("cuda" if has_cuda else "cpu")
    if not has_cuda:
        with pytest.raises(BitfoldError, match="no CUDA provider"):
            bitfold.compile(model, "ort", "cuda")


def test_unknown_backend_and_device(zoo_protos):
    model = fresh(zoo_protos, "mlp")
    with pytest.raises(BitfoldError, match="unknown backend 'tensorrt'"):
        bitfold.compile(model, "tensorrt")
    with pytest.raises(BitfoldError, match="unknown device 'tpu'"):
        bitfold.compile(model, "ort", "tpu")


def test_float_weights_between_qdq_stay_float():
    """A Conv read through DequantizeLinear and written through QuantizeLinear keeps its float weight: with every
    ORT optimization on, the output equals the unoptimized run (ORT's own weight quantization would move it)."""
    import onnx
    import onnx.helper as h
    import onnx_ir as ir

    from bitfold.backends.ort import OrtRunnable

    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 64, 1, 1)).astype(np.float32)
    w[:, 0] *= 100  # one large input channel: a per-tensor int8 grid would crush the rest
    inits = [onnx.numpy_helper.from_array(a, n) for a, n in
             ((w, "w"), (np.float32(0.05), "s"), (np.float32(2.0), "s2"), (np.uint8(128), "z"))]  # fmt: skip
    nodes = [h.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), h.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
             h.make_node("Conv", ["d", "w"], ["c"]),
             h.make_node("QuantizeLinear", ["c", "s2", "z"], ["q2"]), h.make_node("DequantizeLinear", ["q2", "s2", "z"], ["y"])]  # fmt: skip
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", 1, [1, 64, 4, 4])],
                         [h.make_tensor_value_info("y", 1, None)], inits)  # fmt: skip
    model = ir.from_proto(h.make_model(graph, opset_imports=[h.make_opsetid("", 21)], ir_version=9))
    feeds = {"x": rng.standard_normal((1, 64, 4, 4)).astype(np.float32)}
    plain = OrtRunnable(model, device="cpu", optimization="none").run(feeds)["y"]
    optimized = OrtRunnable(model, device="cpu", optimization="all").run(feeds)["y"]
    np.testing.assert_array_equal(optimized, plain)


@pytest.mark.parametrize("bits,group", [(8, -1), (4, 32)])
def test_weight_only_qdq_keeps_float_activations(bits, group):
    """ORT fuses DequantizeLinear → MatMul into MatMulNBits and, by default, computes it with int8 activations. A
    weight-only QDQ graph must run as written: the optimized session equals the unoptimized one."""
    import onnx
    import onnx.helper as h
    import onnx_ir as ir

    from bitfold.backends.ort import OrtRunnable

    rng = np.random.default_rng(0)
    k, n = 256, 64
    graph = h.make_graph([h.make_node("MatMul", ["x", "w"], ["y"])], "g", [h.make_tensor_value_info("x", 1, [8, k])],
                         [h.make_tensor_value_info("y", 1, [8, n])],
                         [onnx.numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")])  # fmt: skip
    model = ir.from_proto(h.make_model(graph, opset_imports=[h.make_opsetid("", 21)], ir_version=10))
    step = {"name": "quantize-weights", "method": "rtn", "bits": bits, "group_size": group, "format": "qdq"}
    model, _ = bitfold.optimize(model, [step])
    x = rng.standard_normal((8, k)).astype(np.float32)
    x[:, 0] *= 50  # one large channel: int8 activations would lose the small ones
    plain = OrtRunnable(model, device="cpu", optimization="none").run({"x": x})["y"]
    optimized = OrtRunnable(model, device="cpu", optimization="all").run({"x": x})["y"]
    np.testing.assert_allclose(optimized, plain, rtol=1e-5, atol=1e-4 * np.abs(plain).max())


def test_optimization_level_from_the_environment(zoo_protos, monkeypatch):
    from bitfold.backends.ort import OrtRunnable

    monkeypatch.setenv("BITFOLD_ORT_OPTIMIZATION", "fastest")
    with pytest.raises(BitfoldError, match="unknown ONNX Runtime optimization level 'fastest'"):
        OrtRunnable(fresh(zoo_protos, "mlp"), device="cpu")
