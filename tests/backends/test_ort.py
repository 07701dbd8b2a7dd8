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
