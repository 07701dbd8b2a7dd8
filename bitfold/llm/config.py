"""Decoder-LM configuration: a Hugging Face ``config.json`` read into one typed, family-independent spec.

A family is a handful of switches (fused projections, q/k norms, sandwich norms, soft-capping, the norm's γ offset,
the activation), not a copy of its modeling code. Both config layouts are read: the current one (``rope_parameters``,
``layer_types``) and the older one (``rope_theta`` + ``rope_scaling``, ``sliding_window_pattern``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from bitfold.errors import BitfoldError


@dataclasses.dataclass(frozen=True)
class Family:
    """What sets one architecture apart from Llama."""

    fused_qkv: bool = False  # one qkv_proj [q | k | v]
    fused_gate_up: bool = False  # one gate_up_proj [gate | up]
    qkv_bias: bool = False  # q/k/v carry a bias whatever ``attention_bias`` says
    qk_norm: bool = False  # RMSNorm over head_dim of q and k before RoPE
    sandwich_norms: bool = False  # norms after attention and MLP too (Gemma 2/3)
    gamma_offset: float = 0.0  # the norm multiplies by (offset + γ): Gemma stores γ − 1
    embed_scale: bool = False  # embeddings multiplied by sqrt(hidden)
    query_scalar: bool = False  # scores scaled by query_pre_attn_scalar^-1/2 instead of head_dim^-1/2
    default_alternating_window: int = 0  # legacy configs: every n-th layer is global (Gemma 2: 2, Gemma 3: 6)


FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(qkv_bias=True),
    "qwen3": Family(qk_norm=True),
    "phi3": Family(fused_qkv=True, fused_gate_up=True),
    "gemma2": Family(sandwich_norms=True, gamma_offset=1.0, embed_scale=True, query_scalar=True, default_alternating_window=2),
    "gemma3_text": Family(sandwich_norms=True, qk_norm=True, gamma_offset=1.0, embed_scale=True, query_scalar=True,
                          default_alternating_window=6),
}  # fmt: skip

ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu_tanh", "gelu")


@dataclasses.dataclass(frozen=True)
class Rope:
    """Rotary embedding of one attention kind: ``inv_freq`` over the first ``dim`` channels of each head."""

    theta: float
    dim: int
    kind: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def inv_freq(self) -> np.ndarray:
        exponent = np.arange(0, self.dim, 2, dtype=np.int64).astype(np.float32) / np.float32(self.dim)
        inv = (1.0 / np.power(np.float32(self.theta), exponent)).astype(np.float32)
        if self.kind == "linear":
            inv = inv / np.float32(self.factor)
        elif self.kind == "llama3":
            low_wavelen = self.original_max_position_embeddings / self.low_freq_factor
            high_wavelen = self.original_max_position_embeddings / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor
            )
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            inv = np.where(medium, smoothed, scaled)
        return inv.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    model_type: str
    family: Family
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    activation: str
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    #: per layer: the sliding window (0 = global attention)
    windows: tuple[int, ...]
    #: per layer: its rotary embedding
    ropes: tuple[Rope, ...]
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    query_pre_attn_scalar: float = 0.0
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None

    @property
    def scaling(self) -> float:
        if self.family.query_scalar and self.query_pre_attn_scalar:
            return self.query_pre_attn_scalar**-0.5
        return self.head_dim**-0.5

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], where: str = "config.json") -> LLMConfig:
        model_type = cfg.get("model_type")
        if model_type == "gemma3" and isinstance(cfg.get("text_config"), dict):
            cfg = {**cfg["text_config"], "model_type": "gemma3_text"}
            model_type = "gemma3_text"
        if model_type not in FAMILIES:
            raise BitfoldError(
                f"{where}: model_type '{model_type}' is not supported; supported families are "
                f"{', '.join(sorted(FAMILIES))}."
            )
        family = FAMILIES[model_type]

        def need(key: str) -> Any:
            if cfg.get(key) is None:
                raise BitfoldError(f"{where}: '{key}' is missing; a {model_type} config needs it.")
            return cfg[key]

        hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
        layers = int(need("num_hidden_layers"))
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise BitfoldError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}.")
        activation = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
        if activation not in ACTIVATIONS:
            raise BitfoldError(f"{where}: activation '{activation}' is not supported; use one of {', '.join(ACTIVATIONS)}.")
        layer_types = _layer_types(cfg, family, layers)
        window = int(cfg.get("sliding_window") or 0)
        if model_type in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
            window = 0
        windows = tuple(window if t == "sliding_attention" else 0 for t in layer_types)
        ropes = tuple(_rope(cfg, t, head_dim, where) for t in layer_types)
        eos = cfg.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            model_type=model_type,
            family=family,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps") or 1e-6),
            activation=activation,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias") or family.qkv_bias),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            windows=windows,
            ropes=ropes,
            attn_softcap=float(cfg.get("attn_logit_softcapping") or 0.0),
            final_softcap=float(cfg.get("final_logit_softcapping") or 0.0),
            query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar") or 0.0),
            max_position_embeddings=int(cfg.get("max_position_embeddings") or 2048),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=cfg.get("pad_token_id"),
        )


def _layer_types(cfg: dict, family: Family, layers: int) -> list[str]:
    types = cfg.get("layer_types")
    if types:
        return list(types)
    if cfg.get("sliding_window") and family.default_alternating_window:
        every = int(cfg.get("sliding_window_pattern") or family.default_alternating_window)
        # Gemma 2 legacy: even layers slide; Gemma 3 legacy: every `every`-th layer is global
        if family.default_alternating_window == 2:
            return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        return ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(layers)]
    kind = "sliding_attention" if cfg.get("sliding_window") else "full_attention"
    return [kind] * layers


def _rope(cfg: dict, layer_type: str, head_dim: int, where: str) -> Rope:
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and layer_type in params and isinstance(params[layer_type], dict):
        params = params[layer_type]
    if not isinstance(params, dict):  # the older layout
        params = {"rope_theta": cfg.get("rope_theta", 10000.0), **(cfg.get("rope_scaling") or {})}
        if layer_type == "sliding_attention" and cfg.get("rope_local_base_freq"):
            params = {"rope_theta": cfg["rope_local_base_freq"]}
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in ("default", "linear", "llama3"):
        raise BitfoldError(f"{where}: RoPE scaling '{kind}' is not supported; supported: default, linear, llama3.")
    partial = float(params.get("partial_rotary_factor") or cfg.get("partial_rotary_factor") or 1.0)
    dim = int(head_dim * partial)
    return Rope(
        theta=float(params.get("rope_theta") or cfg.get("rope_theta") or 10000.0),
        dim=dim,
        kind=kind,
        factor=float(params.get("factor") or 1.0),
        low_freq_factor=float(params.get("low_freq_factor") or 1.0),
        high_freq_factor=float(params.get("high_freq_factor") or 4.0),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings") or 8192),
    )
