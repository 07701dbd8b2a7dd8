"""shift, shiftadd, binarize, ternarize on the zoo: structure, the op equals the solver's weights under ORT,
orderings between methods, and the pass contract."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import fresh
from models import token_calibration

import bitfold
from bitfold.backends.ort import OrtRunnable
from bitfold.errors import PassParameterError
from bitfold.passes.canonical import CANONICAL
from bitfold.passes.multless.base import BITS_KEY
from bitfold.quant.calibration import CalibrationData

STEPS = {
    "shift": ({"name": "shift"}, "ShiftMatMul"),
    "shift-dense-gptq": ({"name": "shift", "bits": 3, "zero": False, "gptq": True}, "ShiftMatMul"),
    "shiftadd": ({"name": "shiftadd", "q": 3, "group_size": 16}, "BCQMatMul"),
    "shiftadd-rtn-per-channel": ({"name": "shiftadd", "q": 2, "group_size": -1, "gptq": False, "alpha_terms": 0}, "BCQMatMul"),
    "binary": ({"name": "binarize", "center": True}, "BinaryMatMul"),
    "pb-llm": ({"name": "binarize", "salient_ratio": 0.1, "salience": "hessian", "gptq": True}, "BinaryMatMul"),
    "residual": ({"name": "binarize", "planes": 2}, "BinaryMatMul"),
    "ternary": ({"name": "ternarize", "per_channel": True, "gptq": True}, "TernaryMatMul"),
}


@pytest.fixture(scope="module")
def lm(zoo_protos):
    model, _ = bitfold.optimize(fresh(zoo_protos, "tiny-lm"), list(CANONICAL))
    feeds = bitfold.sample_feeds(model)
    return model, feeds, token_calibration(4), _out(model, feeds)


def _out(model, feeds):
    return next(iter(OrtRunnable(model, device="cpu", optimization="none").run(feeds).values()))


def _err(model, lm):
    _, feeds, _, ref = lm
    return float(np.linalg.norm(_out(model, feeds) - ref) / np.linalg.norm(ref))


def _weight_matmuls(model):
    return [n for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None]


@pytest.mark.parametrize("key", STEPS)
def test_op_computes_exactly_the_solvers_weights_and_rerun_is_a_no_op(lm, key):
    model, feeds, calibration, _ = lm
    step, op_type = STEPS[key]
    emitted, report = bitfold.optimize(bitfold.clone(model), [step], calibration, verify=True)
    fake, _ = bitfold.optimize(bitfold.clone(model), [{**step, "format": "fake"}], calibration)
    assert report.output["ops"][f"bitfold::{op_type}"] == len(_weight_matmuls(model)) - 1 == 14
    (head,) = _weight_matmuls(emitted)  # keep_ends: the tied head stays float
    assert head.outputs[0].is_graph_output()
    got, want = _out(emitted, feeds), _out(fake, feeds)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert report.output["parameter_bytes"] < report.input["parameter_bytes"]
    (note,) = report.passes[0].notes
    assert note.startswith("14 weights, ") and "bits per weight" in note
    again, second = bitfold.optimize(bitfold.clone(emitted), [step], calibration)
    assert not second.passes[0].modified


def test_bits_per_weight_count_codes_and_scales(lm):
    model, _, calibration, _ = lm
    emitted, report = bitfold.optimize(bitfold.clone(model), [STEPS["shiftadd"][0]], calibration)
    assert "6.000 bits per weight" in report.passes[0].notes[0]  # 3 planes + 3 float16 scales per 16 inputs
    nodes = [n for n in emitted.graph if n.domain == "bitfold"]
    assert {n.metadata_props[BITS_KEY] for n in nodes} == {"6.000"}
    _, ternary = bitfold.optimize(bitfold.clone(model), ["ternarize"])
    bits = float(ternary.passes[0].notes[0].split(", ")[1].split()[0])
    assert 2.0 < bits < 2.0 + 32 / 48 + 0.01  # 2-bit codes + one float scale per output (K = 48 or 192)


def test_error_falls_with_q_and_pbllm_beats_plain_binary(lm):
    model, _, calibration, _ = lm
    errors = {}
    for name, step in {
        "q2": {"name": "shiftadd", "q": 2, "group_size": 16}, "q3": {"name": "shiftadd", "q": 3, "group_size": 16},
        "q4": {"name": "shiftadd", "q": 4, "group_size": 16}, "binary": {"name": "binarize"},
        "pb-llm": STEPS["pb-llm"][0], "residual": {"name": "binarize", "planes": 2},
    }.items():  # fmt: skip
        errors[name] = _err(bitfold.optimize(bitfold.clone(model), [{**step, "format": "fake"}], calibration)[0], lm)
    assert errors["q2"] > errors["q3"] > errors["q4"]
    assert errors["pb-llm"] < errors["binary"] and errors["residual"] < errors["binary"]


def test_binarized_activations_run_the_xnor_semantics(lm):
    model, feeds, _, _ = lm
    xnor, report = bitfold.optimize(bitfold.clone(model), [{"name": "binarize", "binarize_input": True}])
    weights_only, _ = bitfold.optimize(bitfold.clone(model), ["binarize"])
    assert report.output["ops"]["bitfold::BinaryMatMul"] == 14
    assert np.isfinite(_out(xnor, feeds)).all()
    assert _err(xnor, lm) > _err(weights_only, lm)  # post-training XNOR is a step further from the float model
    with pytest.raises(PassParameterError, match="format"):
        bitfold.passes.create("binarize", {"binarize_input": True, "format": "fake"})


def test_keep_ends_and_exclude_leave_layers_alone(zoo_protos):
    mlp = fresh(zoo_protos, "mlp")
    feeds = bitfold.sample_feeds(mlp)
    kept, report = bitfold.optimize(bitfold.clone(mlp), ["shift"])
    assert not report.passes[0].modified  # two layers: the first reads the input, the second is the head
    both, report = bitfold.optimize(bitfold.clone(mlp), [{"name": "shift", "keep_ends": False}])
    assert report.output["ops"]["bitfold::ShiftMatMul"] == 2
    assert np.isfinite(_out(both, feeds)).all()
    assert {n.op_type for n in both.graph} == {"ShiftMatMul", "Add", "Relu", "Identity"}  # Gemm bias → Add
    one, report = bitfold.optimize(bitfold.clone(mlp), [{"name": "shift", "keep_ends": False, "exclude": ["*net.3*"]}])
    assert report.output["ops"]["bitfold::ShiftMatMul"] == 1


def test_fake_format_rewrites_conv_weights(zoo_protos):
    cnn, _ = bitfold.optimize(fresh(zoo_protos, "cnn-bn"), list(CANONICAL))
    feeds = bitfold.sample_feeds(cnn)
    fake, report = bitfold.optimize(bitfold.clone(cnn), [{"name": "ternarize", "format": "fake"}])
    convs = [n for n in fake.graph if n.op_type == "Conv" and BITS_KEY in n.metadata_props]
    assert report.passes[0].notes[0].startswith(f"{len(convs)} weights") and convs
    for node in convs:
        w = node.inputs[1].const_value.numpy()
        assert len(np.unique(np.round(np.abs(w[w != 0]), 6))) == 1  # one γ per tensor
    assert np.isfinite(_out(fake, feeds)).all()


def test_gptq_rounds_conv_weights_on_their_patch_hessians(zoo_protos):
    """Images with correlated neighbouring pixels: GPTQ on each Conv group's patch Gram matrix beats plain rounding."""
    cnn, _ = bitfold.optimize(fresh(zoo_protos, "cnn-bn"), list(CANONICAL))
    rng = np.random.default_rng(0)
    low = rng.standard_normal((36, 2, 3, 4, 4)).repeat(4, axis=3).repeat(4, axis=4)
    images = [{"x": (m + 0.05 * rng.standard_normal(m.shape)).astype(np.float32)} for m in low]
    calibration, held_out = CalibrationData(images[:32]), images[32:]
    ref = np.concatenate([_out(cnn, f).ravel() for f in held_out])
    err = {}
    for gptq in (False, True):
        step = {"name": "shift", "format": "fake", "bits": 3, "keep_ends": False, "gptq": gptq}
        model, report = bitfold.optimize(bitfold.clone(cnn), [step], calibration)
        assert sum(BITS_KEY in n.metadata_props for n in model.graph if n.op_type == "Conv") == 2  # the stem and the depthwise Conv
        err[gptq] = float(np.linalg.norm(np.concatenate([_out(model, f).ravel() for f in held_out]) - ref))
    assert err[True] < 0.9 * err[False], err


@pytest.mark.parametrize(
    "step,match",
    [
        ({"name": "shiftadd", "q": 5}, "q must be"),
        ({"name": "shiftadd", "group_size": 12}, "multiple of 8"),
        ({"name": "shift", "bits": 2}, "bits must be 3 or 4"),
        ({"name": "binarize", "planes": 2, "salient_ratio": 0.1}, "planes = 1"),
        ({"name": "binarize", "salient_ratio": 0.7}, "salient_ratio"),
    ],
)
def test_bad_parameters_name_the_field(step, match):
    with pytest.raises(PassParameterError, match=match):
        bitfold.passes.create(step["name"], {k: v for k, v in step.items() if k != "name"})


def test_gptq_without_calibration_is_refused(lm):
    from bitfold.errors import BitfoldError

    with pytest.raises(BitfoldError, match="calibration"):
        bitfold.optimize(bitfold.clone(lm[0]), ["shiftadd"])


def test_weights_behind_a_transpose_are_named_in_a_note(zoo_protos):
    raw = fresh(zoo_protos, "tiny-lm")
    _, report = bitfold.optimize(raw, ["shift"])
    assert not report.passes[0].modified
    assert any("run fold-constants first" in note for note in report.passes[0].notes)
