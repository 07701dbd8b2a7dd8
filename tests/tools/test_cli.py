"""The CLI end to end: every verb, and every user mistake gives one sentence, exit code 2, no traceback, the input
file unchanged and no partial output."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import fresh

import bitfold
from bitfold.tools.cli import main


@pytest.fixture
def cnn_file(zoo_protos, tmp_path) -> Path:
    return bitfold.save(fresh(zoo_protos, "cnn-bn"), tmp_path / "cnn.onnx")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fails_cleanly(capsys, argv, message, *, unchanged=(), absent=()):
    digests = {p: _digest(p) for p in unchanged}
    assert main([str(a) for a in argv]) == 2
    stderr = capsys.readouterr().err
    assert message in " ".join(stderr.split()), stderr
    assert "Traceback" not in stderr and stderr.count("error:") == 1
    for p, d in digests.items():
        assert _digest(p) == d, f"{p} was modified"
    for p in absent:
        assert not p.exists(), f"partial output {p} was written"


def test_optimize_with_report_and_verify(cnn_file, tmp_path, capsys):
    out, report = tmp_path / "opt.onnx", tmp_path / "report.json"
    before = _digest(cnn_file)
    argv = ["optimize", cnn_file, "-p", "fold-constants,fold-batchnorm,remove-dead", "-o", out, "--report", report, "--verify"]
    assert main([str(a) for a in argv]) == 0
    assert _digest(cnn_file) == before
    data = json.loads(report.read_text())
    assert [p["name"] for p in data["passes"]] == ["fold-constants", "fold-batchnorm", "remove-dead"]
    assert all(e["max_rel"] <= 1e-5 for p in data["passes"] for e in p["errors"])
    assert "BatchNormalization" not in [n.op_type for n in bitfold.load(out).graph]


def test_optimize_with_a_recipe_file_is_deterministic(cnn_file, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[pass]]\nname = "fold-constants"\n[[pass]]\nname = "fold-batchnorm"\n[[pass]]\nname = "remove-dead"\n')
    for name in ("a.onnx", "b.onnx"):
        assert main(["optimize", str(cnn_file), "-r", str(recipe), "-o", str(tmp_path / name)]) == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_inspect_json(cnn_file, capsys):
    assert main(["inspect", str(cnn_file), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ops"]["BatchNormalization"] == 4 and info["inputs"] == ["x: float32[2x3x16x16]"]
    assert info["parameters"] > 0 and info["opsets"][""] >= 18


def test_run_and_bench(cnn_file, tmp_path, capsys):
    inputs, outputs = tmp_path / "x.npz", tmp_path / "y.npz"
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    np.savez(inputs, x=x)
    assert main(["run", str(cnn_file), "--inputs", str(inputs), "--output", str(outputs)]) == 0
    expected = bitfold.compile(bitfold.load(cnn_file), "ort", "cpu").run({"x": x})
    with np.load(outputs) as got:
        for name, value in expected.items():
            np.testing.assert_array_equal(got[name], value)
    capsys.readouterr()
    assert main(["bench", str(cnn_file), str(cnn_file), "--rounds", "2", "--iters", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 and rows[0]["ratio"] == 1.0 and rows[1]["p50"] > 0


def test_run_and_bench_on_tvm(cnn_file, tmp_path, capsys):
    inputs, outputs = tmp_path / "x.npz", tmp_path / "y.npz"
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    np.savez(inputs, x=x)
    assert main(["run", str(cnn_file), "--backend", "tvm", "--device", "cpu", "--inputs", str(inputs), "--output", str(outputs)]) == 0
    expected = bitfold.compile(bitfold.load(cnn_file), "ort", "cpu").run({"x": x})
    with np.load(outputs) as got:
        for name, value in expected.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-5)
    capsys.readouterr()
    assert main(["bench", str(cnn_file), "--backend", "tvm", "--device", "cpu", "--rounds", "2", "--iters", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["p50"] > 0


def test_export_from_a_python_file(tmp_path):
    source = tmp_path / "factory.py"
    source.write_text(
        "import torch\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()\n"
    )
    out = tmp_path / "m.onnx"
    assert main(["export", f"{source}:build", "--shape", "x=1x3x8x8", "-o", str(out)]) == 0
    model = bitfold.load(out)
    assert [v.name for v in model.graph.inputs] == ["x"]
    assert "BatchNormalization" in [n.op_type for n in model.graph]


def test_passes_json_lists_parameters(capsys):
    assert main(["passes", "--json"]) == 0
    info = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert info["fold-constants"]["params"][0] == {
        "name": "input_size_limit", "type": "int", "default": 1 << 20,
        "doc": "largest input tensor (elements) a folded node may read",
    }  # fmt: skip


# ---- bad input ------------------------------------------------------------------------------------------------


def test_missing_model_file(tmp_path, capsys):
    out = tmp_path / "o.onnx"
    _fails_cleanly(capsys, ["optimize", tmp_path / "nope.onnx", "-p", "remove-dead", "-o", out], "does not exist", absent=[out])


@pytest.mark.parametrize("cut", ["truncated", "garbage"])
def test_corrupt_model_file(cnn_file, tmp_path, capsys, cut):
    bad = tmp_path / "bad.onnx"
    data = cnn_file.read_bytes()
    bad.write_bytes(data[: len(data) // 3] if cut == "truncated" else b"\x00garbage" * 50)
    out = tmp_path / "o.onnx"
    _fails_cleanly(capsys, ["optimize", bad, "-p", "remove-dead", "-o", out], "truncated or corrupt", unchanged=[bad], absent=[out])


def test_unknown_pass(cnn_file, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    _fails_cleanly(capsys, ["optimize", cnn_file, "-p", "fold-batchnrm", "-o", out], "unknown pass 'fold-batchnrm'; did you mean 'fold-batchnorm'?", unchanged=[cnn_file], absent=[out])


def test_unknown_parameter(cnn_file, tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[pass]]\nname = "fold-batchnorm"\nbits = 4\n')
    out = tmp_path / "o.onnx"
    _fails_cleanly(capsys, ["optimize", cnn_file, "-r", recipe, "-o", out], "pass 'fold-batchnorm' takes no parameters; remove 'bits'.", unchanged=[cnn_file, recipe], absent=[out])


def test_bad_recipe_toml(cnn_file, tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[pass]]\nname = "fold-batchnorm\n')
    out = tmp_path / "o.onnx"
    _fails_cleanly(capsys, ["optimize", cnn_file, "-r", recipe, "-o", out], "is not valid TOML", unchanged=[cnn_file, recipe], absent=[out])


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((2, 3, 8, 8), np.float32), "input 'x' has shape 2x3x8x8 but the model expects x: float32[2x3x16x16]"),
        (np.zeros((2, 3, 16, 16), np.float64), "input 'x' has dtype float64 but the model expects float32"),
    ],
)
def test_inputs_of_wrong_shape_or_dtype(cnn_file, tmp_path, capsys, array, message):
    inputs, out = tmp_path / "x.npz", tmp_path / "y.npz"
    np.savez(inputs, x=array)
    _fails_cleanly(capsys, ["run", cnn_file, "--inputs", inputs, "--output", out], message, unchanged=[cnn_file, inputs], absent=[out])


def test_pickled_inputs_are_refused(cnn_file, tmp_path, capsys):
    inputs = tmp_path / "x.npz"
    np.savez(inputs, x=np.array([{"a": 1}], dtype=object))
    _fails_cleanly(capsys, ["run", cnn_file, "--inputs", inputs], "not a readable .npz of plain arrays", unchanged=[inputs])


def test_output_over_input_is_refused(cnn_file, capsys):
    _fails_cleanly(capsys, ["optimize", cnn_file, "-p", "remove-dead", "-o", cnn_file], "bitfold never modifies its input", unchanged=[cnn_file])


def test_bad_export_factory(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    _fails_cleanly(capsys, ["export", "no_such_module_xyz:build", "--shape", "x=1x3", "-o", out], "cannot import 'no_such_module_xyz'", absent=[out])


def test_exit_codes_from_a_real_process(tmp_path):
    """The installed entry point: code 2 and one line on stderr for a user error."""
    proc = subprocess.run(
        [sys.executable, "-m", "bitfold", "inspect", str(tmp_path / "missing.onnx")], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1


def test_multless_recipe_end_to_end_and_calibration_is_required(zoo_protos, tmp_path, capsys):
    lm = bitfold.save(fresh(zoo_protos, "tiny-lm"), tmp_path / "lm.onnx")
    recipe, out, report = tmp_path / "r.toml", tmp_path / "pb.onnx", tmp_path / "report.json"
    recipe.write_text('[[pass]]\nname = "fold-constants"\n[[pass]]\nname = "binarize"\nsalient_ratio = 0.1\nsalience = "hessian"\ngptq = true\n')
    _fails_cleanly(capsys, ["optimize", lm, "-r", recipe, "-o", out], "calibration", unchanged=[lm, recipe], absent=[out])
    calibration = tmp_path / "calib.npz"
    np.savez(calibration, input_ids=np.random.default_rng(0).integers(0, 96, (4, 1, 8)))
    argv = ["optimize", lm, "-r", recipe, "-o", out, "--calibration", calibration, "--report", report, "--verify"]
    assert main([str(a) for a in argv]) == 0
    assert sum(n.op_type == "BinaryMatMul" for n in bitfold.load(out).graph) == 14
    _, record = json.loads(report.read_text())["passes"]
    assert any("bits per weight" in note for note in record["notes"])


def test_builtin_photo_calibration_takes_the_given_shape_of_a_dynamic_image(tmp_path, capsys):
    """A detector-style model with a dynamic H×W: --shape sizes the built-in photos."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in (("w", (8, 3, 3, 3)), ("w2", (8, 8, 3, 3)))]
    nodes = [helper.make_node("Conv", ["images", "w"], ["h"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1])]  # fmt: skip
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], weights)  # fmt: skip
    path, out = tmp_path / "det.onnx", tmp_path / "det.q.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), path)
    argv = ["optimize", path, "-p", "quantize-activations", "--calibration", "skimage-photos", "--shape", "images=1x3x48x64", "-o", out]
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    assert "QuantizeLinear" in [n.op_type for n in bitfold.load(out).graph]
