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


#: safetensors dtype names → numpy dtypes (bf16 and the fp8s through ml_dtypes)
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
           "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}  # fmt: skip


class SafetensorsFolder:
    """The tensors of a Hugging Face model folder, by name; nothing is read until ``get``.

    Each file's header is parsed once; ``get`` then reads one tensor's bytes with a plain seek and read (no memory
    map, so nothing stays resident once the caller drops the array, and no header parse per tensor).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not files:
            raise BitfoldError(f"'{self.folder}' has no .safetensors weights; export the model with safetensors first.")
        #: name → (file, dtype, shape, first byte, end byte)
        self._where: dict[str, tuple[str, str, tuple[int, ...], int, int]] = {}
        for name in files:
            path = self.folder / name
            if not path.is_file():
                raise BitfoldError(f"'{path}' is listed in the index but missing; the download is incomplete.")
            for key, entry in _header(path).items():
                self._where[key] = entry

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name][2]

    def get(self, name: str) -> np.ndarray:
        """One tensor as a float32 numpy array (bf16 and fp16 widened)."""
        file, dtype, shape, begin, end = self._where[name]
        with open(self.folder / file, "rb") as f:
            f.seek(begin)
            data = f.read(end - begin)
        if len(data) != end - begin:
            raise BitfoldError(f"'{self.folder / file}' ends inside tensor '{name}'; the file is truncated.")
        return np.frombuffer(data, dtype=_numpy_dtype(dtype)).reshape(shape).astype(np.float32)


def _header(path: Path) -> dict[str, tuple[str, str, tuple[int, ...], int, int]]:
    """A safetensors file's tensors: name → (file name, dtype, shape, first byte, end byte) in the file."""
    import struct

    with open(path, "rb") as f:
        head = f.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        text = f.read(size) if 0 < size < 100 << 20 else b""
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        raise BitfoldError(f"'{path}' is not a safetensors file (its header does not parse); the file may be truncated.")
    start = 8 + size
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info.get("dtype") not in _DTYPES:
            raise BitfoldError(f"'{path}': tensor '{key}' has dtype {info.get('dtype')}, which bitfold cannot read.")
        begin, end = info["data_offsets"]
        entries[key] = (path.name, info["dtype"], tuple(info["shape"]), start + begin, start + end)
    return entries


def _numpy_dtype(name: str) -> np.dtype:
    import ml_dtypes

    kind = _DTYPES[name]
    return np.dtype(getattr(ml_dtypes, kind)) if hasattr(ml_dtypes, kind) and not hasattr(np, kind) else np.dtype(kind)


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
