from __future__ import annotations

import numpy as np
import pytest
from conftest import fresh

import bitfold
from bitfold.errors import BitfoldError
from bitfold.passes.canonical import CANONICAL
from bitfold.passes.transforms.smooth import Smooth, SmoothConfig, output_error
from bitfold.quant.calibration import CalibrationData


def _ids(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return CalibrationData([{"input_ids": rng.integers(0, 96, (1, 8)).astype(np.int64)} for _ in range(n)])


@pytest.mark.parametrize("prefix", [[], ["fold-norm-affine"], ["fold-norm-affine", "rotate"]])
def test_smooth_keeps_outputs_in_any_order(zoo_protos, prefix):
    model, report = bitfold.optimize(fresh(zoo_protos, "tiny-lm"), [*CANONICAL, *prefix, "smooth"], _ids(), verify=True)
    record = report.passes[-1]
    # q/k/v, gate/up and down (absorbed by the up projection) per block, and the head; o_proj's input is noted,
    # and so is down's once rotate put an online Hadamard in front of it
    assert record.modified and record.max_rel <= 1e-5
    smoothed = [n for n in model.graph if "bitfold.smoothed" in n.metadata_props]
    assert len(smoothed) == 2 * (5 if "rotate" in prefix else 6) + 1
    why = "outside the ONNX domain" if "rotate" in prefix else "Reshape '"  # the attention output's producer
    assert record.notes and all(" kept: " in note and why in note for note in record.notes), record.notes
    _, again = bitfold.optimize(model, ["smooth"], _ids())
    assert not again.passes[0].modified


def test_solve_flattens_activation_ranges():
    rng = np.random.default_rng(0)
    x_absmax = np.exp(rng.standard_normal(64) * 2)  # outlier channels
    w = rng.standard_normal((64, 32))
    s = Smooth.solve(x_absmax, [w], 0.5)
    w_absmax = np.abs(w).max(axis=1)
    assert np.allclose(x_absmax / s, np.sqrt(x_absmax * w_absmax))  # α = 0.5: both sides meet in the middle
    assert (x_absmax / s).max() / (x_absmax / s).min() < x_absmax.max() / x_absmax.min()
    assert np.all(Smooth.solve(np.zeros(64), [w], 0.5) == 1)


def test_needs_calibration_and_a_valid_alpha(zoo_protos):
    with pytest.raises(BitfoldError, match="calibration"):
        bitfold.optimize(fresh(zoo_protos, "tiny-lm"), ["smooth"])
    with pytest.raises(BitfoldError, match="alpha"):
        bitfold.optimize(fresh(zoo_protos, "tiny-lm"), [{"name": "smooth", "alpha": 1.5}], _ids())


def test_explicit_mode_smooths_what_no_producer_absorbs(zoo_protos):
    steps = [*CANONICAL, {"name": "smooth", "explicit": True}]
    model, report = bitfold.optimize(fresh(zoo_protos, "tiny-lm"), steps, _ids(), verify=True)
    record = report.passes[-1]
    assert record.max_rel <= 1e-5 and record.ops_added.get("Mul") == 2  # the two o_proj inputs
    assert sum(1 for n in model.graph if "bitfold.smoothed" in n.metadata_props) == 2 * 7 + 1


def test_alpha_search_never_loses_to_no_smoothing_and_is_recorded(zoo_protos):
    from bitfold.passes.transforms.smooth import search_alpha

    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 64)) * np.exp(rng.standard_normal(64) * 2)  # outlier channels
    w = rng.standard_normal((64, 32))
    alpha = search_alpha(x, np.abs(x).max(axis=0), [w], 8)
    assert alpha > 0  # with strong outliers, some migration pays
    assert search_alpha(rng.standard_normal((256, 64)), np.full(64, 3.0), [w], 8) in np.linspace(0, 1, 11)
    model, report = bitfold.optimize(fresh(zoo_protos, "tiny-lm"), [*CANONICAL, {"name": "smooth", "search": True, "rows": 32}], _ids(), verify=True)
    assert report.passes[-1].max_rel <= 1e-5
    recorded = {n.metadata_props["bitfold.smoothed"] for n in model.graph if "bitfold.smoothed" in n.metadata_props}
    assert recorded and all(r.startswith("alpha=") for r in recorded)


def test_shift_centres_channels_moves_the_shift_into_biases_and_keeps_outputs(zoo_protos):
    steps = [*CANONICAL, {"name": "smooth", "shift": True}]
    calibration = _ids()
    model, report = bitfold.optimize(fresh(zoo_protos, "tiny-lm"), steps, calibration, verify=True)
    record = report.passes[-1]
    assert record.max_rel <= 1e-5
    shifted = [n for n in model.graph if n.metadata_props.get("bitfold.smoothed", "").endswith(",shift")]
    shifts = [n for n in model.graph if n.op_type == "Add" and n.name.endswith("_shift")]
    assert shifted and len(shifts) == len({n.inputs[0].name for n in shifted})  # one centring Add per group
    assert all(n.inputs[0].producer() in shifts for n in shifted)
    assert all(any(user.op_type == "Add" for user, _ in n.outputs[0].uses()) for n in shifted)  # its bias
    centred = calibration.collect(model, list(dict.fromkeys(n.inputs[0].name for n in shifted)))
    for stats in centred.values():  # a centred input spans a range symmetric about zero in every channel
        np.testing.assert_allclose(stats.channel_max, -stats.channel_min, atol=1e-4 * np.abs(stats.channel_max).max())


def _stats(x):
    from bitfold.quant.calibration import TensorStats

    st = TensorStats()
    st.update(x, gram=False, reservoir=10, rng=np.random.default_rng(0), rows_kept=len(x))
    return st


def test_shift_is_kept_only_where_it_lowers_the_quantized_error():
    w = np.random.default_rng(0).standard_normal((16, 8))
    smooth = Smooth(SmoothConfig(shift=True))
    # outlier channels of opposite signs, each one-signed: centring shrinks the per-tensor range
    opposite = np.random.default_rng(0).standard_normal((512, 16))
    opposite[:, 0] += 40.0
    opposite[:, 1] -= 40.0
    # an attention-sink-like channel, large on four tokens only: per-tensor asymmetric 8-bit already fits its one
    # sign, and centring moves every other token off zero and costs migration
    sink = np.random.default_rng(0).standard_normal((512, 16))
    sink[:4, 0] = 120.0
    for x, shifted in ((opposite, True), (sink, False)):
        st = _stats(x)
        center, _, s = smooth.plan(st, [w])
        assert center.any() == shifted
        both = [output_error(x, np.zeros(16), Smooth.solve(st.absmax, [w], 0.5), [w], 8)]
        middle = (st.channel_max.astype(np.float64) + st.channel_min) / 2
        both.append(output_error(x, middle, Smooth.solve(st.channel_max - middle, [w], 0.5), [w], 8))
        assert output_error(x, center, s, [w], 8) == min(both) and both[0] != both[1]
