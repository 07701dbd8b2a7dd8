"""``bitfold synth-llm`` then ``export-llm`` then ``optimize --stream``: the streamed run writes the model the
in-memory run writes, while holding about one weight instead of the model."""

from __future__ import annotations

import contextlib
import json
import tracemalloc

import numpy as np
import pytest

pytest.importorskip("transformers")

SHAPE = dict(model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512)  # fmt: skip
RECIPE = '[[pass]]\nname = "quantize-weights"\nmethod = "rtn"\nbits = 4\ngroup_size = 32\nformat = "fake"\nexclude = ["*lm_head*"]\n'


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from bitfold.tools.cli import main

    root = tmp_path_factory.mktemp("synth")
    (root / "shape.json").write_text(json.dumps(SHAPE))
    assert main(["synth-llm", str(root / "shape.json"), "-o", str(root / "hf"), "--dtype", "fp32"]) == 0
    assert main(["export-llm", str(root / "hf"), "-o", str(root / "onnx" / "model.onnx")]) == 0
    (root / "rtn.toml").write_text(RECIPE)
    return root


def test_streamed_optimize_writes_the_in_memory_output(exported, tmp_path):
    import bitfold
    from bitfold.tools.cli import main

    source = exported / "onnx" / "model.onnx"
    before = source.read_bytes()
    for name, extra in (("memory", []), ("stream", ["--stream"])):
        assert main(["optimize", str(source), "-r", str(exported / "rtn.toml"), "-o", str(tmp_path / name / "model.onnx"), *extra]) == 0
    assert source.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "stream").iterdir()) == ["model.onnx", "model.onnx.data"]  # no scratch folder left
    a, b = bitfold.load(tmp_path / "memory" / "model.onnx"), bitfold.load(tmp_path / "stream" / "model.onnx")
    assert sorted(a.graph.initializers) == sorted(b.graph.initializers)
    for name, value in a.graph.initializers.items():
        np.testing.assert_array_equal(value.const_value.numpy(), b.graph.initializers[name].const_value.numpy())


def test_optimize_reads_a_model_folder_directly(exported, tmp_path):
    """optimize on the Hugging Face folder (exported on the fly, streamed) writes what export-llm then optimize
    writes, with genai_config.json and the tokenizer files beside it."""
    import bitfold
    from bitfold.tools.cli import main

    out = tmp_path / "direct" / "model.onnx"
    assert main(["optimize", str(exported / "hf"), "-r", str(exported / "rtn.toml"), "-o", str(out), "--stream"]) == 0
    assert (out.parent / "genai_config.json").is_file()
    assert main(["optimize", str(exported / "onnx" / "model.onnx"), "-r", str(exported / "rtn.toml"), "-o", str(tmp_path / "two" / "model.onnx")]) == 0
    a, b = bitfold.load(out), bitfold.load(tmp_path / "two" / "model.onnx")
    for name, value in b.graph.initializers.items():
        np.testing.assert_array_equal(a.graph.initializers[name].const_value.numpy(), value.const_value.numpy())


def test_streamed_peak_memory_does_not_grow_with_layers(exported, tmp_path):
    """Peak Python-heap bytes (numpy reports its arrays to tracemalloc) while quantizing every layer: in memory it
    grows with the layer count (the rewritten weights pile up until saved); streamed it stays that of one weight's
    working copies, whatever the depth."""
    import tempfile

    import bitfold
    from bitfold.frontend.stream import WeightStore, read_on_demand, storing
    from bitfold.pipeline import Recipe
    from bitfold.tools.cli import main

    deep = tmp_path / "deep"
    assert main(["synth-llm", str(exported / "shape.json"), "-o", str(deep / "hf"), "--layers", "18", "--dtype", "fp32"]) == 0
    assert main(["export-llm", str(deep / "hf"), "-o", str(deep / "onnx" / "model.onnx")]) == 0

    def peak(path, stream: bool) -> int:
        model = bitfold.load(path)
        with tempfile.TemporaryDirectory() as scratch:
            store = WeightStore(scratch)
            if stream:
                read_on_demand(model)
            tracemalloc.start()
            try:
                with storing(store) if stream else contextlib.nullcontext():
                    bitfold.optimize(model, Recipe.from_toml(RECIPE))
                return tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
                store.close()

    shallow, deep = exported / "onnx" / "model.onnx", deep / "onnx" / "model.onnx"
    in_memory = peak(deep, False) - peak(shallow, False)  # 12 more layers: their rewritten weights pile up
    streamed = peak(deep, True) - peak(shallow, True)  # only the graph's new nodes and names for them
    assert in_memory > 12 * 7 * SHAPE["hidden_size"] * SHAPE["intermediate_size"] * 4 / 4
    assert streamed < in_memory / 10


def test_synth_llm_refusals_exit_2_and_write_nothing(tmp_path, capsys):
    from bitfold.tools.cli import main

    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "bert.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "taken").mkdir()
    cases = [
        (["synth-llm", "llama9", "-o", str(tmp_path / "a")], "unknown model shape 'llama9'"),
        (["synth-llm", str(tmp_path / "missing.json"), "-o", str(tmp_path / "a")], "does not exist"),
        (["synth-llm", str(tmp_path / "bad.json"), "-o", str(tmp_path / "a")], "is not valid JSON"),
        (["synth-llm", str(tmp_path / "list.json"), "-o", str(tmp_path / "a")], "one JSON object"),
        (["synth-llm", str(tmp_path / "bert.json"), "-o", str(tmp_path / "a")], "model_type 'bert' is not supported"),
        (["synth-llm", "tinyllama-1.1b", "-o", str(tmp_path / "taken")], "exists"),
        (["synth-llm", "tinyllama-1.1b", "-o", str(tmp_path / "a"), "--layers", "0"], "--layers must be positive"),
        (["synth-llm", "tinyllama-1.1b", "-o", str(tmp_path / "a"), "--tokenizer", str(tmp_path)], "has no tokenizer.json"),
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv, sentence in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert sentence in err and "Traceback" not in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_synth_llm_leaves_no_folder_when_the_config_is_refused(tmp_path, capsys):
    from bitfold.tools.cli import main

    (tmp_path / "neg.json").write_text(json.dumps({"model_type": "llama", "hidden_size": -4}))
    (tmp_path / "latin1.json").write_bytes(b'{"model_type": "llama\xe9"}')
    for shape, sentence in (("neg.json", "do not make a llama model"), ("latin1.json", "could not be read as UTF-8 JSON")):
        assert main(["synth-llm", str(tmp_path / shape), "-o", str(tmp_path / "deep" / "er" / "m")]) == 2
        err = capsys.readouterr().err
        assert sentence in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latin1.json", "neg.json"]


SEQUENTIAL_GPTQ = [{"name": "reconstruct", "bits": 4, "group_size": 32, "format": "fake", "clip_steps": 0, "round_steps": 0,
                    "exclude": ["*lm_head*"]}]  # fmt: skip


@pytest.mark.parametrize(("true_sequential", "float_inputs"), [(False, 0.0), (True, 0.0), (True, 1.0)])
def test_streamed_sequential_gptq_writes_the_in_memory_output(exported, tmp_path, true_sequential, float_inputs, monkeypatch):
    """GPTQ block by block (reconstruct without learning) on weights read from disk and written to a store: the
    same weights as in memory, while the calibration's first inputs come from the pruned prefix of the graph (and,
    streamed, each layer input is kept on disk until its Gram matrix is needed: 72 tokens, fewer than twice any
    input's width; with ``float_inputs`` the float model's inputs are kept beside them)."""
    import bitfold
    from bitfold.llm.feeds import prefill
    from bitfold.quant.calibration import CalibrationData
    from tests.llm.streaming import in_memory_and_streamed

    source = exported / "onnx" / "model.onnx"
    rng = np.random.default_rng(0)
    model = bitfold.load(source)
    calibration = CalibrationData([prefill(model, rng.integers(0, SHAPE["vocab_size"], (1, 24))) for _ in range(3)])
    steps = [{**SEQUENTIAL_GPTQ[0], "true_sequential": true_sequential, "float_inputs": float_inputs}]
    from bitfold.passes.learned.reconstruct import Reconstruct

    built, gram = [], Reconstruct._gram
    monkeypatch.setattr(Reconstruct, "_gram", lambda self, parts: built.append(len(parts)) or gram(self, parts))
    memory, report, written = in_memory_and_streamed(source, steps, calibration, tmp_path)
    # streamed only: four inputs per layer, three samples each (twice: the float model's too)
    assert built == [3 * (2 if float_inputs else 1)] * 4 * SHAPE["num_hidden_layers"]
    assert sum("no learning" in note for note in report.passes[0].notes) == SHAPE["num_hidden_layers"]
    assert sorted(written.graph.initializers) == sorted(memory.graph.initializers)
    for name, value in memory.graph.initializers.items():
        np.testing.assert_array_equal(written.graph.initializers[name].const_value.numpy(), value.const_value.numpy())


def test_streamed_optimize_names_the_steps_that_hold_the_whole_model(exported, tmp_path, capsys):
    from bitfold.tools.cli import main

    rng = np.random.default_rng(0)
    import bitfold
    from bitfold.llm.feeds import prefill

    model = bitfold.load(exported / "onnx" / "model.onnx")
    feeds = [prefill(model, rng.integers(0, SHAPE["vocab_size"], (1, 8))) for _ in range(2)]
    np.savez(tmp_path / "calib.npz", **{k: np.stack([f[k] for f in feeds]) for k in feeds[0]})
    recipe = tmp_path / "gptq.toml"
    recipe.write_text('[[pass]]\nname = "quantize-weights"\nmethod = "gptq"\nformat = "fake"\ngroup_size = 32\n')
    code = main(["optimize", str(exported / "onnx" / "model.onnx"), "-r", str(recipe), "-o", str(tmp_path / "out" / "model.onnx"),
                 "--stream", "--calibration", str(tmp_path / "calib.npz")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0
    assert "quantize-weights does not stream" in err and "reconstruct with clip_steps = 0" in err
    recipe.write_text(RECIPE)
    assert main(["optimize", str(exported / "onnx" / "model.onnx"), "-r", str(recipe), "-o", str(tmp_path / "rtn" / "model.onnx"), "--stream"]) == 0
    assert "does not stream" not in capsys.readouterr().err
