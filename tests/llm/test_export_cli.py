"""``bitfold export-llm`` on local folders: files written, the graph interface, streaming memory, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.llm.families import make

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    make("llama-tied-llama3rope", folder)
    return folder


def test_export_writes_model_data_and_genai_config(llama, tmp_path):
    import bitfold
    from bitfold.tools.cli import main

    out = tmp_path / "out" / "model.onnx"
    assert main(["export-llm", str(llama), "-o", str(out), "--max-length", "300"]) == 0
    assert (out.parent / "model.onnx.data").is_file()
    genai = json.loads((out.parent / "genai_config.json").read_text())
    decoder = genai["model"]["decoder"]
    assert (decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"]) == (2, 2, 16)
    assert genai["model"]["context_length"] == 300 and decoder["filename"] == "model.onnx"
    model = bitfold.load(out)
    names = [v.name for v in model.graph.inputs]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:] == [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert [v.name for v in model.graph.outputs] == ["logits"] + [f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    # tied: one table, read by the embedding Gather and (transposed) by the head
    assert sum(1 for v in model.graph.initializers.values() if v.shape is not None and tuple(v.shape) == (256, 64)) == 1


def test_export_is_deterministic(llama, tmp_path):
    from bitfold.tools.cli import main

    for name in ("a", "b"):
        assert main(["export-llm", str(llama), "-o", str(tmp_path / name / "model.onnx")]) == 0
    for file in ("model.onnx", "model.onnx.data"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()


def test_prefill_then_decode_equals_one_prefill(llama):
    """The cache is exact: logits of prefill(a) then decode(b) = logits of prefill(a + b) at b's positions."""
    from bitfold.backends import compile
    from bitfold.llm import export_llm
    from bitfold.llm.feeds import prefill

    model, _, _ = export_llm(llama)
    runnable = compile(model, "ort", "cpu")
    ids = np.random.default_rng(1).integers(0, 256, (2, 9))
    whole = runnable.run(prefill(model, ids))["logits"]
    first = runnable.run(prefill(model, ids[:, :6]))
    feeds = {"input_ids": ids[:, 6:], "attention_mask": np.ones((2, 9), np.int64), "position_ids": np.tile(np.arange(6, 9), (2, 1))}
    for i in range(2):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = first[f"present.{i}.{kv}"]
    step = runnable.run(feeds)
    np.testing.assert_allclose(step["logits"], whole[:, 6:], rtol=1e-4, atol=1e-5)
    assert step["present.0.key"].shape == (2, 2, 9, 16)


def test_left_padding_matches_the_unpadded_row(llama):
    """A left-padded batch row gives the logits of the same tokens alone (mask and position ids honoured)."""
    from bitfold.backends import compile
    from bitfold.llm import export_llm
    from bitfold.llm.feeds import prefill

    model, _, _ = export_llm(llama)
    runnable = compile(model, "ort", "cpu")
    ids = np.random.default_rng(2).integers(0, 256, (1, 5))
    alone = runnable.run(prefill(model, ids))["logits"][0]
    padded = np.concatenate([np.zeros((1, 3), np.int64), ids], axis=1)
    mask = np.concatenate([np.zeros((1, 3), np.int64), np.ones((1, 5), np.int64)], axis=1)
    batch = runnable.run(prefill(model, np.concatenate([padded, padded]), np.concatenate([mask, mask])))["logits"][0, 3:]
    np.testing.assert_allclose(batch, alone, rtol=1e-4, atol=1e-5)


def test_export_memory_follows_one_tensor(llama, tmp_path):
    """Weights are lazy: building the graph reads no tensor; writing reads each once."""
    from bitfold.llm import export_llm, write_llm
    from bitfold.llm.weights import SafetensorsFolder

    reads = []
    original = SafetensorsFolder.get

    def counting(self, name):
        reads.append(name)
        return original(self, name)

    SafetensorsFolder.get = counting
    try:
        model, cfg, folder = export_llm(llama)
        large = {n for n in reads if "proj" in n or "embed" in n or "lm_head" in n}
        assert large == set()  # shape inference read only small tensors (norm γ)
        reads.clear()
        write_llm(model, tmp_path / "model.onnx", folder, cfg, 64)
    finally:
        SafetensorsFolder.get = original
    assert sorted(reads) == sorted(set(reads))  # each tensor read once while writing


def test_unknown_family_and_bad_sources_exit_2(llama, tmp_path, capsys):
    from bitfold.tools.cli import main

    bad = tmp_path / "bert"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    assert main(["export-llm", str(bad), "-o", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert "model_type 'bert' is not supported" in err and "llama" in err and "gemma2" in err
    assert main(["export-llm", str(tmp_path / "missing"), "-o", str(tmp_path / "x.onnx")]) == 2
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"\0")
    assert main(["export-llm", str(not_gguf), "-o", str(tmp_path / "x.onnx")]) == 2
    assert main(["export-llm", str(llama), "--seq-len", "8", "-o", str(tmp_path / "x.onnx")]) == 2
    assert not (tmp_path / "x.onnx").exists()
    scaled = json.loads((llama / "config.json").read_text())
    scaled["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    odd = tmp_path / "yarn"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps(scaled))
    assert main(["export-llm", str(odd), "-o", str(tmp_path / "x.onnx")]) == 2
    assert "RoPE scaling 'yarn' is not supported" in capsys.readouterr().err


def test_generate_without_a_cache_graph_is_refused(tmp_path, capsys):
    import onnx_ir as ir

    import bitfold
    from bitfold.tools.cli import main

    x = ir.Value(name="x", shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.FLOAT))
    node = ir.Node("", "Identity", [x], name="id")
    node.outputs[0].name = "y"
    graph = ir.Graph([x], [node.outputs[0]], nodes=[node], opset_imports={"": 18})
    bitfold.save(ir.Model(graph, ir_version=10), tmp_path / "m.onnx")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert main(["generate", str(tmp_path / "m.onnx"), "--prompt", "hi"]) == 2


def test_fp16_export_stays_close_to_fp32(llama):
    from bitfold.llm import export_llm
    from bitfold.llm.generate import Decoder

    fp32, _, _ = export_llm(llama)
    fp16, _, _ = export_llm(llama, "fp16")
    assert all(v.dtype.name == "FLOAT16" for v in fp16.graph.initializers.values() if v.name.endswith("weight"))
    prompt = np.arange(3, 15)
    a, b = Decoder(fp32, 40), Decoder(fp16, 40)
    for ids in (prompt, [5], [77]):
        x, y = a(np.asarray(ids)), b(np.asarray(ids))
        assert np.abs(x - y).max() / np.abs(x).max() < 1e-2  # fp16 weights and activations: ~11 bits
        assert np.argmax(x) == np.argmax(y)


def test_debug_and_allocate_run_on_a_cached_graph(llama, tmp_path, capsys):
    """Default sample feeds of a KV-cache graph are a consistent prefill; external data survives the tools' copies."""
    import bitfold
    from bitfold.llm.feeds import prefill
    from bitfold.tools.cli import main

    model_path = tmp_path / "m" / "model.onnx"
    assert main(["export-llm", str(llama), "-o", str(model_path)]) == 0
    feeds = bitfold.sample_feeds(bitfold.load(model_path))
    assert feeds["input_ids"].shape == (1, 8) and feeds["past_key_values.0.key"].shape == (1, 2, 0, 16)
    assert main(["debug", str(model_path), "-p", "quantize-weights", "-o", str(tmp_path / "dbg")]) == 0
    report = json.loads((tmp_path / "dbg" / "report.json").read_text())
    assert report["culprit"] == 0 and "q_proj" in json.dumps(report)
    model = bitfold.load(model_path)
    rng = np.random.default_rng(0)
    samples = [prefill(model, rng.integers(0, 256, (1, 16))) for _ in range(4)]
    np.savez(tmp_path / "cal.npz", **{k: np.stack([s[k] for s in samples]) for k in samples[0]})
    recipe = tmp_path / "mixed.toml"
    assert main(["allocate", str(model_path), "--bits", "4.5", "--samples", "2", "--calibration", str(tmp_path / "cal.npz"), "-o", str(recipe)]) == 0
    assert main(["optimize", str(model_path), "-r", str(recipe), "--calibration", str(tmp_path / "cal.npz"), "-o", str(tmp_path / "q" / "model.onnx")]) == 0
    capsys.readouterr()
