"""Tiny seeded random-weight models of every supported family, built from configs in the test (no hub)."""

from __future__ import annotations

from pathlib import Path

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip

#: name → (transformers config class name, overrides)
FAMILIES = {
    "llama-tied-llama3rope": ("LlamaConfig", dict(tie_word_embeddings=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "llama-untied-linearrope-mha": ("LlamaConfig", dict(num_key_value_heads=4, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mistral-sliding": ("MistralConfig", dict(sliding_window=8)),
    "qwen2-bias": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3-qknorm": ("Qwen3Config", dict(head_dim=32)),
    "phi3-fused-partial": ("Phi3Config", dict(partial_rotary_factor=0.5, pad_token_id=0)),
    "gemma2-softcap": ("Gemma2Config", dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                                            attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    "gemma3-qknorm": ("Gemma3TextConfig", dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                               layer_types=["sliding_attention", "full_attention"],
                                               rope_scaling={"rope_type": "linear", "factor": 4.0})),
}  # fmt: skip


def make(name: str, folder: Path):
    """Save the tiny ``name`` model (seeded) to ``folder`` and return it as a transformers model in eval mode."""
    import torch
    import transformers

    cls, overrides = FAMILIES[name]
    config = getattr(transformers, cls)(**{**COMMON, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(sum(map(ord, name)))
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms start at 1 (0 for Gemma's offset form): perturb them so γ is really read
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model
