"""Embedding: every registered pass runs under a plain ``onnx_ir.passes.PassManager``, with calibration given to its
constructor, and computes what bitfold's own pipeline computes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from conftest import fresh

import bitfold
from bitfold.errors import BitfoldError
from bitfold.passes import get_pass, registered
from bitfold.passes.canonical import CANONICAL
from bitfold.quant.calibration import CalibrationData, model_key

#: pass name -> (model, parameters). The parameters pick the calibrating mode where a pass has one (GPTQ, Wanda,
#: learned rotation, searched clip), so every pass that can read calibration does here.
CASES: dict[str, tuple[str, dict]] = {
    "constants-to-initializers": ("mlp-constants", {}),
    "fold-batchnorm": ("cnn-bn", {}),
    "fold-constants": ("decoder", {}),
    "remove-dead": ("mlp-dead", {}),
    "remove-identity": ("mlp-identity", {}),
    "binarize": ("lm", {"gptq": True, "salience": "hessian", "salient_ratio": 0.1}),
    "shift": ("lm", {"gptq": True, "bits": 3}),
    "shiftadd": ("lm", {"q": 2, "group_size": 16}),
    "ternarize": ("lm", {"gptq": True}),
    "cast-precision": ("cnn", {}),
    "quantize-activations": ("cnn", {}),
    "quantize-tokens": ("decoder-folded", {"bits": 4, "search_clip": True}),
    "quantize-weights": ("lm", {"method": "gptq", "bits": 4, "group_size": 16, "format": "fake"}),
    "reconstruct": ("lm", {"bits": 4, "group_size": 16, "format": "fake", "clip_steps": 2, "round_steps": 2}),
    "prune": ("lm", {"method": "wanda", "pattern": "unstructured:0.5"}),
    "split-outliers": ("lm", {"group_size": 16, "format": "fake"}),
    "affine": ("lm", {"steps": 3, "rows": 32}),
    "fold-norm-affine": ("lm", {}),
    "lowrank-split": ("lm", {"rank": 8}),
    "rotate": ("lm-folded", {"learn_steps": 2, "learn_rows": 32, "online": False}),
    "smooth": ("lm", {}),
}


@pytest.fixture(scope="module")
def prepared(zoo_protos):
    """Serialized models, prepared once: the canonical recipe (and norm folding) already applied where named."""
    lm, _ = bitfold.optimize(fresh(zoo_protos, "tiny-lm"), list(CANONICAL))
    folded, _ = bitfold.optimize(bitfold.clone(lm), ["fold-norm-affine"])
    cnn, _ = bitfold.optimize(fresh(zoo_protos, "cnn-bn"), list(CANONICAL))
    decoder, _ = bitfold.optimize(fresh(zoo_protos, "decoder-rmsnorm-swiglu-rope"), list(CANONICAL))
    return {name: ir.to_proto(m).SerializeToString() for name, m in
            {"lm": lm, "lm-folded": folded, "cnn": cnn, "decoder-folded": decoder}.items()}  # fmt: skip


def _model(kind: str, zoo_protos, prepared) -> ir.Model:
    if kind in prepared:
        return fresh(prepared, kind)
    if kind in ("cnn-bn", "decoder"):
        return fresh(zoo_protos, {"decoder": "decoder-rmsnorm-swiglu-rope"}.get(kind, kind))
    model = fresh(zoo_protos, "mlp")
    graph = model.graph
    if kind == "mlp-constants":  # weights held in Constant nodes
        name, value = next(iter(graph.initializers.items()))
        const = ir.node("Constant", [], attributes={"value": value.const_value}, name=f"const_{name}")
        graph.insert_before(graph.node(0), const)
        ir.convenience.replace_all_uses_with(value, const.outputs[0])
        graph.initializers.pop(name)
    elif kind == "mlp-dead":
        graph.append(ir.node("Neg", [graph.inputs[0]], name="dead"))
    elif kind == "mlp-identity":
        first = graph.node(0)
        identity = ir.node("Identity", [graph.inputs[0]], name="identity")
        graph.insert_before(first, identity)
        first.replace_input_with(0, identity.outputs[0])
    return model


def _calibration(kind: str):
    """Calibration samples for ``kind``: a CalibrationData for the language models, plain feed dicts otherwise."""
    rng = np.random.default_rng(0)
    if kind.startswith("lm"):
        return CalibrationData([{"input_ids": rng.integers(0, 96, (1, 8)).astype(np.int64)} for _ in range(4)])
    if kind == "cnn":
        return [{"x": rng.standard_normal((2, 3, 16, 16)).astype(np.float32)} for _ in range(4)]
    return [{"x": rng.standard_normal((1, 8, 32)).astype(np.float32)} for _ in range(4)]


def test_every_case_names_a_registered_pass():
    assert set(CASES) <= set(registered()), f"stale embedding cases: {sorted(set(CASES) - set(registered()))}"


@pytest.mark.parametrize("name", sorted(registered()))
def test_every_registered_pass_runs_under_a_plain_pass_manager(name, zoo_protos, prepared):
    assert name in CASES, f"pass '{name}' has no embedding case; add a model where it applies to CASES"
    kind, params = CASES[name]
    cls = get_pass(name)
    calibration = _calibration(kind) if cls(**params).needs_calibration else None
    model = _model(kind, zoo_protos, prepared)
    result = ir.passes.PassManager([cls(calibration=calibration, **params)], steps=1)(model)
    assert isinstance(result, ir.passes.PassResult)
    assert result.model is model and result.modified, f"pass '{name}' did not apply to its embedding case"
    # the pipeline hands the same calibration to the same constructor: the same outputs come out
    piped, _ = bitfold.optimize(_model(kind, zoo_protos, prepared), [{"name": name, **params}], calibration)
    feeds = bitfold.sample_feeds(model)
    for got, want in zip(_outputs(model, feeds), _outputs(piped, feeds), strict=True):
        np.testing.assert_array_equal(got, want)


def _outputs(model: ir.Model, feeds) -> list[np.ndarray]:
    return list(bitfold.compile(model, "ort", "cpu").run(feeds).values())


CALIBRATING = sorted(name for name, (_, params) in CASES.items() if get_pass(name)(**params).needs_calibration)


def test_the_calibrating_passes_are_the_ones_the_issue_names():
    assert {"smooth", "rotate", "quantize-weights", "affine", "prune"} <= set(CALIBRATING)


@pytest.mark.parametrize("name", CALIBRATING)
def test_a_calibrating_pass_constructed_without_calibration_names_the_argument(name, zoo_protos, prepared):
    kind, params = CASES[name]
    model = _model(kind, zoo_protos, prepared)
    before = model_key(model)
    p = get_pass(name)(**params)
    with pytest.raises(BitfoldError, match=f"pass '{name}' needs calibration data, but was constructed without the 'calibration' argument"):
        p(model)
    with pytest.raises(ir.passes.PassError) as caught:
        ir.passes.PassManager([p])(model)
    cause = caught.value
    while cause is not None and not isinstance(cause, BitfoldError):
        cause = cause.__cause__
    assert cause is not None and "'calibration' argument" in str(cause)
    assert model_key(model) == before, "the refused pass left the model untouched"


def test_calibration_argument_of_the_wrong_kind_is_named():
    smooth = get_pass("smooth")
    with pytest.raises(BitfoldError, match="argument 'calibration' of pass 'smooth' must be a CalibrationData or an iterable of feed dicts, got str"):
        smooth(calibration="lee-text")
    with pytest.raises(BitfoldError, match="got dict"):
        smooth(calibration={"x": np.zeros(3, np.float32)})
    samples = [{"x": np.zeros(3, np.float32)}]
    assert list(smooth(calibration=iter(samples)).calibration) == samples  # an iterator is kept, re-iterable
