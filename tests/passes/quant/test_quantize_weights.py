from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from conftest import fresh

import bitfold
from bitfold.backends.ort import OrtRunnable
from bitfold.errors import BitfoldError, PassParameterError
from bitfold.passes.canonical import CANONICAL
from bitfold.quant.calibration import CalibrationData


@pytest.fixture(scope="module")
def decoder(zoo_protos):
    model, _ = bitfold.optimize(fresh(zoo_protos, "decoder-rmsnorm-swiglu-rope"), list(CANONICAL))
    return bitfold.clone(model)


def _weight_matmuls(model):
    return [n for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None]


def _out(model, feeds):
    return next(iter(OrtRunnable(model, device="cpu", optimization="none").run(feeds).values()))


def _quantize(model, calibration=None, **params):
    return bitfold.optimize(bitfold.clone(model), [{"name": "quantize-weights", **params}], calibration)


@pytest.mark.parametrize(
    "params",
    [
        {"bits": 4, "group_size": 16},
        {"bits": 4, "group_size": 16, "symmetric": False},
        {"bits": 4, "group_size": 16, "symmetric": False, "zero_point": "float"},
        {"bits": 3, "group_size": 32},
        {"bits": 2, "group_size": 16, "symmetric": False},
        {"bits": 8, "group_size": -1},
        {"bits": 8, "group_size": 0, "symmetric": False},
        {"dtype": "fp8-e4m3", "group_size": -1},
    ],
)
@pytest.mark.parametrize("fmt", ["qdq", "matmulnbits"])
def test_emitted_formats_compute_exactly_the_fake_quantized_weights(decoder, params, fmt):
    if fmt == "matmulnbits" and (params.get("group_size", 128) < 16 or params.get("dtype", "int") != "int"):
        pytest.skip("MatMulNBits needs integer codes and power-of-two groups >= 16")
    if fmt == "qdq" and params.get("zero_point") == "float":
        pytest.skip("DequantizeLinear holds integer zero points only")
    feeds = bitfold.sample_feeds(decoder)
    extra = {"accuracy_level": 0} if fmt == "matmulnbits" else {}
    emitted, report = _quantize(decoder, format=fmt, **params, **extra)
    fake, _ = _quantize(decoder, format="fake", **params)
    count = len(_weight_matmuls(decoder))
    op = "com.microsoft::MatMulNBits" if fmt == "matmulnbits" else "DequantizeLinear"
    assert report.output["ops"][op] == count == 7
    got, want = _out(emitted, feeds), _out(fake, feeds)
    if params.get("zero_point") == "float":  # ORT evaluates (q - z)·s in another order: float rounding only
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    else:
        np.testing.assert_array_equal(got, want)
    assert report.output["parameter_bytes"] < report.input["parameter_bytes"]


def test_float_zero_point_keeps_a_min_max_grid_exactly(decoder):
    """Weights already on a min-max grid per group (llama.cpp Q4_1's x = s·q + min) survive RTN with float zero
    points exactly; an integer zero point moves the grid."""
    model = bitfold.clone(decoder)
    rng = np.random.default_rng(0)
    for node in _weight_matmuls(model):
        w = node.inputs[1].const_value.numpy()
        k, n = w.shape
        groups = rng.integers(0, 16, (n, k // 16, 16)).astype(np.float32)
        groups[..., 0], groups[..., 1] = 0, 15  # every group spans its grid
        step, low = rng.random((n, k // 16, 1)) * 0.01 + 1e-3, rng.standard_normal((n, k // 16, 1)) * 0.05
        grid = (groups * step + low).reshape(n, k).T.astype(np.float32)
        node.inputs[1].const_value = ir.tensor(grid, name=node.inputs[1].name)
    feeds = bitfold.sample_feeds(model)
    want = _out(model, feeds)
    minmax, _ = _quantize(model, format="matmulnbits", bits=4, group_size=16, symmetric=False, zero_point="float", accuracy_level=0)
    widened, _ = _quantize(model, format="matmulnbits", bits=4, group_size=16, symmetric=False, accuracy_level=0)
    exact = np.abs(_out(minmax, feeds) - want).max() / np.abs(want).max()
    moved = np.abs(_out(widened, feeds) - want).max() / np.abs(want).max()
    assert exact < 1e-5 and moved > 100 * exact, (exact, moved)


def test_error_shrinks_with_bits_and_rerun_is_a_no_op(decoder):
    feeds = bitfold.sample_feeds(decoder)
    ref = _out(decoder, feeds)
    errors = []
    for bits in (2, 3, 4, 8):
        model, _ = _quantize(decoder, bits=bits, group_size=16, format="fake")
        errors.append(float(np.abs(_out(model, feeds) - ref).max()))
        _, again = bitfold.optimize(model, [{"name": "quantize-weights", "bits": bits, "group_size": 16, "format": "fake"}], verify=True)
        assert not again.passes[0].modified
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.05 * errors[0]


def test_exclude_globs_match_torch_scope_and_names(decoder):
    model, report = _quantize(decoder, exclude=["*/down: *", "*/o: *"], group_size=16)
    assert report.output["ops"]["DequantizeLinear"] == 5
    left = [n.metadata_props["namespace"] for n in _weight_matmuls(model)]
    assert len(left) == 2 and any("down" in s for s in left)


def test_gptq_needs_calibration_and_beats_rtn(decoder):
    with pytest.raises(BitfoldError, match="needs calibration data"):
        _quantize(decoder, method="gptq")
    rng = np.random.default_rng(0)
    mixing = rng.standard_normal((4, 32))  # correlated inputs: the Hessian is far from isotropic

    def sample():
        return {"x": (rng.standard_normal((1, 8, 4)) @ mixing + 0.1 * rng.standard_normal((1, 8, 32))).astype(np.float32)}

    calib = CalibrationData([sample() for _ in range(64)])
    held_out = sample()
    ref = _out(decoder, held_out)
    err = {}
    for method in ("rtn", "gptq"):
        model, _ = _quantize(decoder, calibration=calib, method=method, bits=3, group_size=16, format="fake")
        err[method] = float(np.sqrt(((_out(model, held_out) - ref) ** 2).mean()))
    assert err["gptq"] < 0.9 * err["rtn"], err


@pytest.mark.parametrize(
    "params, message",
    [
        ({"bits": 5}, "bits must be 2, 3, 4 or 8"),
        ({"format": "matmulnbits", "group_size": 48}, "power of two >= 16"),
        ({"format": "qdq", "dtype": "nf4"}, "use format = \"fake\""),
        ({"method": "awq-ish"}, "must be one of"),
        ({"symmetric": False, "zero_point": "float"}, "use format = \"matmulnbits\" or \"fake\""),
        ({"zero_point": "float", "format": "matmulnbits"}, "set symmetric = false"),
        ({"method": "gptq", "damp": 0.0}, r"damp must be a number in \(0, 1\]"),
        ({"method": "gptq", "damp": float("nan")}, r"damp must be a number in \(0, 1\]"),
    ],
)
def test_config_errors_name_the_fix(params, message):
    with pytest.raises(PassParameterError, match=message):
        bitfold.passes.create("quantize-weights", params)


def _outlier_channels_calibration(dim=32, samples=48, seed=0):
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.standard_normal(dim) * 1.5)  # a few channels carry most of the activation mass
    make = lambda: {"x": (rng.standard_normal((1, 8, dim)) * scale).astype(np.float32)}  # noqa: E731
    return CalibrationData([make() for _ in range(samples)]), make()


def test_awq_folds_scales_into_norms_and_up_projection_exactly(decoder, monkeypatch):
    """With rounding switched off, AWQ's folded graph is the input graph."""
    from bitfold.passes.quant import quantize_weights as qw

    calib, held_out = _outlier_channels_calibration()
    monkeypatch.setattr(qw.QuantizeWeights, "solve", lambda self, wt, h: (wt, np.ones_like(wt), np.zeros_like(wt)))
    model, _ = _quantize(decoder, calibration=calib, method="awq", bits=3, group_size=16, format="fake")
    assert bitfold.frontend.parameter_bytes(model) <= bitfold.frontend.parameter_bytes(decoder) + 4 * 32 * 3
    np.testing.assert_allclose(_out(model, held_out), _out(decoder, held_out), rtol=1e-4, atol=1e-4)
    alphas = {n.metadata_props["namespace"].split("/")[-2].split(":")[0]: n.metadata_props.get("bitfold.awq_alpha")
              for n in _weight_matmuls(model)}  # fmt: skip
    assert alphas["o"] is None, "o_proj's input comes from attention: no producer absorbs a scale"
    assert all(alphas[k] is not None for k in ("q", "k", "v", "gate", "up", "down"))


def test_awq_beats_rtn_on_outlier_channels(decoder):
    calib, held_out = _outlier_channels_calibration()
    ref = _out(decoder, held_out)
    err = {}
    for method in ("rtn", "awq"):
        model, report = _quantize(decoder, calibration=calib, method=method, bits=3, group_size=16, format="matmulnbits", accuracy_level=0)
        assert report.output["parameter_bytes"] < 0.3 * report.input["parameter_bytes"], "no float weights left behind"
        err[method] = float(np.sqrt(((_out(model, held_out) - ref) ** 2).mean()))
    assert err["awq"] < 0.97 * err["rtn"], err


@pytest.mark.parametrize("method", ["rtn", "awq", "gptq"])
def test_output_clip_lowers_the_held_out_error(decoder, method):
    """Ranges fitted to the output error (through the input Gram matrix) beat the full range; with AWQ, through
    the rescaled input's H."""
    calib, held_out = _outlier_channels_calibration()
    ref = _out(decoder, held_out)
    err = {}
    for clip in ("none", "output"):
        model, _ = _quantize(decoder, calibration=calib, method=method, bits=3, group_size=16, format="fake", clip=clip,
                             act_order=method == "gptq")  # fmt: skip
        err[clip] = float(np.sqrt(((_out(model, held_out) - ref) ** 2).mean()))
    assert err["output"] < 0.97 * err["none"], err


def test_output_clip_needs_calibration_and_groups(decoder):
    with pytest.raises(BitfoldError, match="needs calibration data"):
        _quantize(decoder, clip="output")
    with pytest.raises(PassParameterError, match="fits each scale group"):
        bitfold.passes.create("quantize-weights", {"clip": "output", "group_size": 0})


def test_eora_branch_reduces_the_output_error(decoder):
    """A rank-8 EoRA branch on each projection of the decoder block: held-out error drops, branches stay float."""
    calib, held_out = _outlier_channels_calibration()
    ref = _out(decoder, held_out)
    errors = {}
    for rank in (0, 8):
        model, _ = _quantize(decoder, calibration=calib, bits=3, group_size=-1, format="qdq", compensate_rank=rank)
        errors[rank] = float(np.abs(_out(model, held_out) - ref).max())
        branches = [n for n in model.graph if n.metadata_props.get("bitfold.precision") == "float32"]
        assert len(branches) == (14 if rank else 0)  # two float MatMuls per quantized projection
    assert errors[8] < 0.6 * errors[0]


@pytest.fixture(scope="module")
def cnn(zoo_protos):
    model, _ = bitfold.optimize(fresh(zoo_protos, "cnn-bn"), list(CANONICAL))
    return bitfold.clone(model)


def _smooth_images(samples: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Images whose neighbouring pixels and channels are correlated: the patch Hessian is far from isotropic."""
    rng = np.random.default_rng(seed)
    low = rng.standard_normal((samples, 2, 3, 4, 4)).repeat(4, axis=3).repeat(4, axis=4)
    mixed = low + 0.3 * low[:, :, ::-1] + 0.05 * rng.standard_normal(low.shape)
    return [{"x": m.astype(np.float32)} for m in mixed]


@pytest.mark.parametrize(
    "params", [{"group_size": -1}, {"group_size": 16}, {"group_size": 16, "symmetric": False}, {"bits": 8, "group_size": -1}]
)
def test_conv_weights_emit_exactly_the_fake_quantized_weights(cnn, params):
    feeds = bitfold.sample_feeds(cnn)
    emitted, report = _quantize(cnn, op_types=["Conv"], **params)
    fake, _ = _quantize(cnn, op_types=["Conv"], format="fake", **params)
    assert report.output["ops"]["DequantizeLinear"] == 2  # the Conv and the depthwise Conv; ConvTranspose, Gemm stay
    assert report.output["ops"].get("Reshape", 0) == (0 if params["group_size"] == -1 else 2)
    np.testing.assert_array_equal(_out(emitted, feeds), _out(fake, feeds))
    ref, got = _out(cnn, feeds), _out(fake, feeds)
    assert 0 < np.abs(got - ref).max() < (0.02 if params.get("bits") == 8 else 0.5) * np.abs(ref).max()
    _, again = bitfold.optimize(emitted, [{"name": "quantize-weights", "op_types": ["Conv"], **params}], verify=True)
    assert not again.passes[0].modified


def test_conv_weights_only_when_asked(cnn):
    _, report = _quantize(cnn)
    assert not report.passes[0].modified and "DequantizeLinear" not in report.output["ops"]


@pytest.mark.parametrize("method", ["gptq", "rtn-output-clip"])
def test_conv_hessian_methods_beat_rtn_on_correlated_patches(cnn, method):
    calibration = CalibrationData(_smooth_images(32, 0))
    held_out = _smooth_images(4, 1)
    ref = np.concatenate([_out(cnn, f).ravel() for f in held_out])
    params = {"method": "gptq"} if method == "gptq" else {"clip": "output"}
    err = {}
    for name, extra in (("rtn", {}), (method, params)):
        model, _ = _quantize(cnn, calibration, op_types=["Conv"], bits=3, group_size=-1, format="fake", **extra)
        err[name] = float(np.linalg.norm(np.concatenate([_out(model, f).ravel() for f in held_out]) - ref))
    assert err[method] < 0.9 * err["rtn"], err


@pytest.mark.parametrize(
    "params, message",
    [
        ({"format": "matmulnbits", "group_size": 32}, "Conv weights need format"),
        ({"group_size": 0}, "use group_size -1 or > 0"),
        ({"compensate_rank": 4}, "drop \"Conv\" from op_types"),
        ({"op_types": []}, "op_types must name MatMul and/or Conv"),
        ({"op_types": ["Gemm"]}, "must be one of 'MatMul' | 'Conv'"),
    ],
)
def test_conv_config_errors_name_the_fix(params, message):
    with pytest.raises(PassParameterError, match=message):
        bitfold.passes.create("quantize-weights", {"op_types": ["MatMul", "Conv"], **params})


@pytest.mark.parametrize("name", ["prune", "split-outliers", "shift", "shiftadd", "binarize", "ternarize"])
def test_every_gptq_loop_pass_refuses_a_bad_damp(name):
    with pytest.raises(PassParameterError, match=r"damp must be a number in \(0, 1\]"):
        bitfold.passes.create(name, {"damp": 2.0})


def test_gptq_fallback_is_noted_with_the_node(decoder, monkeypatch):
    """A Hessian GPTQ cannot factor even after dampening: the layer is rounded to nearest and the report says which."""
    import bitfold.quant.gptq as gptq_module

    def indefinite(H, damp, scale, notes=None, rebuild=None):  # no dampening within the retries makes -10⁶ H positive definite
        return original(-1e6 * H, damp, scale, notes)

    original = gptq_module.inverse_cholesky
    monkeypatch.setattr(gptq_module, "inverse_cholesky", indefinite)
    calib = CalibrationData([bitfold.sample_feeds(decoder, seed=s) for s in range(4)])
    _, report = _quantize(decoder, calibration=calib, method="gptq", bits=4, group_size=16, format="fake")
    notes = [n for p in report.passes for n in p.notes if "rounded to nearest" in n]
    assert notes and all(": H is not positive definite" in n for n in notes), notes
