"""Where a decoder LM's weights come from: a Hugging Face folder (safetensors, sharded or not) or a GGUF file.

Safetensors tensors are read one at a time when asked for (the export wraps each in a lazy tensor, so at most one
tensor is in memory while the model is written). A GGUF file is converted once, through transformers' GGUF reader
(which de-quantizes and undoes llama.cpp's q/k row permutation), into a cached safetensors folder; the export then
streams from that folder like any other.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np

from bitfold.errors import BitfoldError

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)  # fmt: skip


class SafetensorsFolder:
    """The tensors of a Hugging Face model folder, by name; nothing is read until ``get``."""

    def __init__(self, folder: str | os.PathLike) -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not files:
            raise BitfoldError(f"'{self.folder}' has no .safetensors weights; export the model with safetensors first.")
        self._file_of: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for name in files:
            path = self.folder / name
            if not path.is_file():
                raise BitfoldError(f"'{path}' is listed in the index but missing; the download is incomplete.")
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    self._file_of[key] = name
                    self._shapes[key] = tuple(f.get_slice(key).get_shape())

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str) -> np.ndarray:
        """One tensor as a float32 numpy array (bf16 and fp16 widened)."""
        import torch
        from safetensors import safe_open

        with safe_open(self.folder / self._file_of[name], framework="pt") as f:
            return f.get_tensor(name).to(torch.float32).numpy()


def config_dict(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise BitfoldError(f"'{folder}' has no config.json; give a Hugging Face model folder, a .gguf file or 'smollm2'.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BitfoldError(f"'{path}' is not valid JSON ({e.msg} at line {e.lineno}).") from None


def gguf_folder(path: Path, cache: Path) -> Path:
    """A safetensors folder converted from a GGUF file (de-quantized to float32), cached by the file's identity."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache / f"gguf-{path.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, OSError) as e:
        raise BitfoldError(f"'{path}' could not be read as a GGUF language model: {str(e).splitlines()[0]}") from None
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.setdefault("architectures", [type(model).__name__])
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    save_model(model, str(tmp / "model.safetensors"))
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder
