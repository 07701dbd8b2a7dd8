"""Synthetic random-weight models: transformers reads the folder, bitfold's export matches it, the values depend on
(seed, tensor name) only, and bad requests are refused before anything is written."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bitfold.errors import BitfoldError
from bitfold.llm.synthetic import SHAPES, parameter_count, shape_config, write_synthetic

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, vocab_size=256)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_synthetic_model_exports_like_transformers_reads_it(family, tmp_path):
    from bitfold.llm import export_llm
    from bitfold.llm.generate import Decoder

    cfg = shape_config({"model_type": family, **TINY, **({"head_dim": 16} if family == "gemma2" else {})})
    folder = write_synthetic(tmp_path / "m", cfg, dtype="fp32", shard_bytes=64_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    assert sum(p.numel() for p in reference.parameters()) == parameter_count(cfg)
    prompt = np.random.default_rng(0).integers(0, 256, 10)
    with torch.no_grad():
        want = reference(torch.tensor(prompt)[None]).logits[0, -1].numpy()
    model, _, _ = export_llm(folder)
    got = Decoder(model, max_length=16)(prompt)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4


def test_values_depend_on_seed_and_name_only(tmp_path):
    from bitfold.llm.weights import SafetensorsFolder

    cfg = shape_config("tinyllama-1.1b", **TINY)
    a = SafetensorsFolder(write_synthetic(tmp_path / "a", cfg, shard_bytes=50_000))
    b = SafetensorsFolder(write_synthetic(tmp_path / "b", cfg, shard_bytes=1 << 30))  # one file: other shards
    c = SafetensorsFolder(write_synthetic(tmp_path / "c", cfg, seed=1))
    name = "model.layers.1.mlp.down_proj.weight"
    np.testing.assert_array_equal(a.get(name), b.get(name))
    assert not np.array_equal(a.get(name), c.get(name))
    w = a.get(name)
    assert w.shape == (64, 96) and 0.015 < w.std() < 0.025  # transformers' N(0, 0.02²)
    gain = a.get("model.layers.0.input_layernorm.weight")
    assert abs(gain.mean() - 1.0) < 0.05 and gain.std() > 0.05


def test_shapes_have_their_published_sizes():
    assert parameter_count(shape_config("smollm2-135m")) == 134_515_008
    assert parameter_count(shape_config("tinyllama-1.1b")) == 1_100_048_384
    assert parameter_count(shape_config("llama2-7b")) == 6_738_415_616
    assert set(SHAPES) == {"smollm2-135m", "tinyllama-1.1b", "llama2-7b"}


def test_refusals(tmp_path):
    with pytest.raises(BitfoldError, match="unknown model shape 'llama9'"):
        shape_config("llama9")
    with pytest.raises(BitfoldError, match="model_type 'bert' is not supported"):
        shape_config({"model_type": "bert"})
    cfg = shape_config("tinyllama-1.1b", **TINY)
    with pytest.raises(BitfoldError, match="dtype 'int8'"):
        write_synthetic(tmp_path / "x", cfg, dtype="int8")
    (tmp_path / "exists").mkdir()
    with pytest.raises(BitfoldError, match="exists"):
        write_synthetic(tmp_path / "exists", cfg)
    assert not (tmp_path / "x").exists() and list((tmp_path / "exists").iterdir()) == []


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_folder_reader_gives_what_safetensors_reads(tmp_path, dtype):
    """bitfold's own header parse and seek-and-read return, for every tensor, safetensors' values widened to fp32."""
    from safetensors import safe_open

    from bitfold.llm.weights import SafetensorsFolder

    folder = write_synthetic(tmp_path / "m", shape_config("tinyllama-1.1b", **TINY), dtype=dtype, shard_bytes=40_000)
    reader = SafetensorsFolder(folder)
    seen = 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                want = f.get_tensor(name).to(torch.float32).numpy()
                got = reader.get(name)
                assert got.dtype == np.float32 and reader.shape(name) == want.shape
                np.testing.assert_array_equal(got, want)
                seen += 1
    assert seen == len(reader._where) > 10


def test_truncated_weights_are_named(tmp_path):
    from bitfold.llm.weights import SafetensorsFolder

    folder = write_synthetic(tmp_path / "m", shape_config("tinyllama-1.1b", **TINY), dtype="fp32")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(BitfoldError, match="is truncated"):
        reader = SafetensorsFolder(folder)
        for name in reader._where:
            reader.get(name)
    path.write_bytes(b"\x05")
    with pytest.raises(BitfoldError, match="is not a safetensors file"):
        SafetensorsFolder(folder)
