"""``bitfold export-llm``: a local causal LM (Hugging Face folder, GGUF file, or a built-in name) to a KV-cache ONNX
graph, with ``genai_config.json`` and the tokenizer files beside it so onnxruntime-genai runs it unchanged."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir

from bitfold.errors import BitfoldError
from bitfold.llm.builtin import cache_dir, smollm2_folder
from bitfold.llm.config import LLMConfig
from bitfold.llm.graph import build
from bitfold.llm.weights import TOKENIZER_FILES, SafetensorsFolder, config_dict, gguf_folder

BUILTIN = ("smollm2",)
DTYPES = {"fp32": np.float32, "fp16": np.float16}


def resolve(source: str | os.PathLike) -> Path:
    """The Hugging Face folder that ``source`` (a folder, a .gguf file, or a built-in name) stands for."""
    if str(source) == "smollm2":
        return smollm2_folder()
    path = Path(source)
    if not path.exists():
        raise BitfoldError(
            f"'{source}' does not exist; give a Hugging Face model folder, a .gguf file, or one of: {', '.join(BUILTIN)}."
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise BitfoldError(f"'{path}' is a file but not a .gguf; give a GGUF file or a Hugging Face model folder.")
        return gguf_folder(path, cache_dir())
    return path


def load_config(folder: Path) -> LLMConfig:
    return LLMConfig.from_dict(config_dict(folder), where=str(folder / "config.json"))


def export_llm(source: str | os.PathLike, dtype: str = "fp32") -> tuple[ir.Model, LLMConfig, Path]:
    """(KV-cache graph with lazily read weights, its config, the folder it came from)."""
    if dtype not in DTYPES:
        raise BitfoldError(f"dtype '{dtype}' is not supported; use one of {', '.join(DTYPES)}.")
    folder = resolve(source)
    cfg = load_config(folder)
    weights = SafetensorsFolder(folder)
    try:
        model = build(cfg, weights, DTYPES[dtype])
    except KeyError as e:
        raise BitfoldError(f"'{folder}' has no tensor {e}; its weights do not match its {cfg.model_type} config.") from None
    model.metadata_props["bitfold.llm.model_type"] = cfg.model_type
    model.metadata_props["bitfold.llm.sliding_window"] = str(min((w for w in cfg.windows if w), default=0))
    return model, cfg, folder


def write_llm(model: ir.Model, output: str | os.PathLike, folder: Path, cfg: LLMConfig, max_length: int) -> Path:
    """Save ``model`` (weights in ``<name>.data`` beside it) and write genai_config.json and the tokenizer files."""
    from bitfold.frontend import save

    output = Path(output)
    save(model, output, external_data=True)  # tensors are read and written one at a time: memory stays near one tensor
    write_sidecar(output, folder, cfg, max_length)
    return output


def write_sidecar(output: Path, folder: Path, cfg: LLMConfig, max_length: int) -> None:
    """genai_config.json (onnxruntime-genai's run configuration) and the tokenizer files, beside ``output``."""
    for name in TOKENIZER_FILES:
        if (folder / name).is_file() and (folder / name).resolve() != (output.parent / name).resolve():
            shutil.copyfile(folder / name, output.parent / name)
    (output.parent / "genai_config.json").write_text(json.dumps(genai_config(cfg, output.name, max_length), indent=4))


def genai_config(cfg: LLMConfig, filename: str, max_length: int) -> dict:
    eos = list(cfg.eos_token_id) or [0]
    return {
        "model": {
            "bos_token_id": cfg.bos_token_id if cfg.bos_token_id is not None else eos[0],
            "context_length": max_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": cfg.head_dim,
                "hidden_size": cfg.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": cfg.num_heads,
                "num_hidden_layers": cfg.num_layers,
                "num_key_value_heads": cfg.num_kv_heads,
            },
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": cfg.pad_token_id if cfg.pad_token_id is not None else eos[0],
            "type": _genai_type(cfg.model_type),
            "vocab_size": cfg.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": max_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def _genai_type(model_type: str) -> str:
    return {"gemma3_text": "gemma3_text", "qwen3": "qwen3"}.get(model_type, model_type)
