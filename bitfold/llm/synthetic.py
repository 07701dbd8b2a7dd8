"""Seeded random-weight language models of any supported family and size, written straight to a Hugging Face folder.

For measuring memory, time and scaling on shapes this machine has no weights for (a 1.1B or a 7B model): the
folder holds ``config.json`` and sharded safetensors that ``export-llm``, ``optimize`` and transformers read like any
downloaded model. The tensor names and shapes are transformers' own for the family (its model is built on the meta
device, so no memory is spent on it); each tensor is drawn from its own generator seeded by (seed, name), so a
tensor's values do not depend on the shard it lands in or on the other tensors, and one tensor at a time is held in
memory beside the shard being filled. Matrices are N(0, initializer_range²) as transformers initializes them; norm
gains are 1 (0 where the family stores γ − 1) plus N(0, 0.1²) so that they are really read; biases N(0, 0.02²).
Quality is not the point of these models.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

from bitfold.errors import BitfoldError
from bitfold.llm.config import FAMILIES

#: name → the config keys that set a model's shape (transformers' defaults fill the rest)
SHAPES: dict[str, dict] = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192),
    "tinyllama-1.1b": dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, vocab_size=32000, rms_norm_eps=1e-5,
                           max_position_embeddings=2048),
    "llama2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, rms_norm_eps=1e-5,
                      max_position_embeddings=4096),
}  # fmt: skip
DTYPES = ("bf16", "fp16", "fp32")
#: bytes per shard file (the most held in memory while writing, besides one tensor)
SHARD_BYTES = 1 << 30


def shape_config(shape: str | dict, **overrides) -> dict:
    """The config keys for ``shape`` (a name in :data:`SHAPES` or a dict with ``model_type``) with ``overrides``."""
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise BitfoldError(f"unknown model shape '{shape}'; use one of {', '.join(SHAPES)}.")
        shape = SHAPES[shape]
    cfg = {**shape, **{k: v for k, v in overrides.items() if v is not None}}
    if cfg.get("model_type") not in FAMILIES:
        raise BitfoldError(f"model_type '{cfg.get('model_type')}' is not supported; use one of {', '.join(sorted(FAMILIES))}.")
    return cfg


def parameter_count(cfg: dict) -> int:
    """Parameters the folder for ``cfg`` holds (a tied head counted once)."""
    return sum(n for _, _, n in _tensors(_hf_config(cfg)))


def write_synthetic(
    folder: str | os.PathLike,
    cfg: dict,
    *,
    dtype: str = "bf16",
    seed: int = 0,
    tokenizer: str | os.PathLike | None = None,
    shard_bytes: int = SHARD_BYTES,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the random-weight model ``cfg`` (see :func:`shape_config`) to ``folder``; return it.

    ``tokenizer``: a folder whose tokenizer files are copied beside the weights (its vocabulary must fit
    ``vocab_size``). ``progress(done, total)`` is called after each tensor with bytes written. The folder appears
    whole or not at all: everything is written into a sibling temporary folder that is renamed at the end.
    """
    import torch
    from safetensors.torch import save_file

    from bitfold.llm.weights import TOKENIZER_FILES

    if dtype not in DTYPES:
        raise BitfoldError(f"dtype '{dtype}' is not supported; use one of {', '.join(DTYPES)}.")
    folder = Path(folder)
    if folder.exists():
        raise BitfoldError(f"'{folder}' exists; give a new folder for the synthetic model.")
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    config = _hf_config(cfg)
    tensors = list(_tensors(config))
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    filled = 0
    for name, shape, numel in tensors:  # plan the shards first: their count is in every file's name
        if shards[-1] and filled + numel * itemsize > shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append((name, shape))
        filled += numel * itemsize
    total = sum(n for _, _, n in tensors) * itemsize
    gamma = FAMILIES[config.model_type].gamma_offset
    std = float(getattr(config, "initializer_range", 0.02))
    existing = next(p for p in (folder.parent, *folder.parent.parents) if p.exists())
    created = [p for p in (folder.parent, *folder.parent.parents) if not p.exists()]
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        weight_map, done = {}, 0
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
            arrays = {}
            for name, shape in shard:
                arrays[name] = _draw(name, shape, seed, std, gamma).to(torch_dtype)
                weight_map[name] = file
                done += arrays[name].numel() * itemsize
                if progress:
                    progress(done, total)
            save_file(arrays, str(tmp / file), metadata={"format": "pt"})
            del arrays
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config.dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
        config.architectures = [_architecture(config)]
        config.to_json_file(str(tmp / "config.json"))
        if tokenizer is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer) / name).is_file():
                    shutil.copy2(Path(tokenizer) / name, tmp / name)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:  # the folders made for it, innermost first, up to the one that was there
            if p != existing:
                with contextlib.suppress(OSError):
                    p.rmdir()
        raise
    return folder


def _hf_config(cfg: dict):
    import transformers

    cfg = shape_config(cfg)
    try:
        config = transformers.AutoConfig.for_model(**cfg)
        next(_tensors(config))  # the model builds from it
    except Exception as e:  # transformers' validators raise their own types  # noqa: BLE001
        raise BitfoldError(f"the config keys do not make a {cfg['model_type']} model: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return config


def _architecture(config) -> str:
    import transformers

    return transformers.AutoModelForCausalLM._model_mapping[type(config)].__name__


def _tensors(config):
    """(name, shape, numel) of every tensor the saved model holds, in transformers' order; nothing allocated."""
    import torch
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # saved once, under the embedding's name
    for name, t in state.items():
        yield name, tuple(t.shape), t.numel()


def _draw(name: str, shape: tuple[int, ...], seed: int, std: float, gamma_offset: float):
    """The float32 values of tensor ``name``: a function of (seed, name, shape) only."""
    import numpy as np
    import torch

    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    values = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
    if len(shape) == 1 and "norm" in name:
        return values.mul_(0.1).add_(1.0 - gamma_offset)
    return values.mul_(std if len(shape) > 1 else 0.02)
