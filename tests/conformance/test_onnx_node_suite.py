"""ONNX's node conformance models: each loads into the IR and saves back; where ONNX Runtime runs the original,
the saved copy gives identical outputs on the suite's own inputs. Every skip says why."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx.backend.test.loader import load_model_tests

import bitfold

CASES = sorted(load_model_tests(kind="node"), key=lambda case: case.name)


def _inputs(case, session: ort.InferenceSession) -> dict[str, np.ndarray] | None:
    arrays = case.data_sets[0][0] if case.data_sets else []
    metas = session.get_inputs()
    if len(arrays) != len(metas) or not all(isinstance(a, np.ndarray) for a in arrays):
        return None  # sequence or optional inputs
    return {meta.name: array for meta, array in zip(metas, arrays, strict=True)}


def _session(source) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])


def _same(a, b) -> bool:
    if isinstance(a, list) or isinstance(b, list):  # sequence outputs
        return isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind in "fc":
        return a.shape == b.shape and np.array_equal(a, b, equal_nan=True)
    return a.shape == b.shape and np.array_equal(a, b)


def _reason(error: Exception) -> str:
    """ORT's message without its file paths: the part after the last ' : ', first line, shortened."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text.rsplit(" : ", 1)[-1].split("failed:")[-1].strip()[:150]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_node_model_round_trips(case, tmp_path):
    source = tmp_path / "source.onnx"
    onnx.save(case.model, source)
    model = bitfold.load(source)
    saved = bitfold.save(model, tmp_path / "model.onnx")
    onnx.load(saved)  # what was written is a valid ModelProto
    try:
        original = _session(source)
    except Exception as e:
        pytest.skip(f"ONNX Runtime cannot load the original: {_reason(e)}")
    feeds = _inputs(case, original)
    if feeds is None:
        pytest.skip("inputs are sequences or optionals, not tensors")
    try:
        expected = original.run(None, feeds)
    except Exception as e:
        pytest.skip(f"ONNX Runtime cannot run the original: {_reason(e)}")
    if not all(_same(a, b) for a, b in zip(expected, original.run(None, feeds), strict=True)):
        pytest.skip("the op is random: two runs of the original differ")
    got = _session(saved).run(None, feeds)
    assert len(got) == len(expected)
    for a, b in zip(expected, got, strict=True):
        assert _same(a, b)
