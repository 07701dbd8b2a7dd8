"""Text generation with a KV cache on ONNX Runtime.

:class:`Decoder` runs a bitfold decoder graph (see :mod:`bitfold.llm.graph`) one call per step with I/O binding into
preallocated cache buffers: two flat buffers per past tensor, sized for ``max_length``, used in turn as the past
(read) and the present (written), so no step allocates or copies through numpy. Prefill and decode are the same
graph; only the length of ``input_ids`` differs.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir

from bitfold.errors import BitfoldError
from bitfold.llm.feeds import PAST, past_inputs


class Decoder:
    """One sequence (batch 1) through a KV-cache graph on ONNX Runtime, with preallocated cache buffers."""

    def __init__(self, model: ir.Model, max_length: int = 2048, threads: int | None = None, device: str = "cpu") -> None:
        from bitfold.backends.ort import OrtRunnable

        pasts = past_inputs(model)
        if not pasts:
            raise BitfoldError("the model has no past_key_values.* inputs; export it with `bitfold export-llm` to get a KV-cache graph.")
        self.runnable = OrtRunnable(model, device=device, threads=threads)
        self.session = self.runnable.session
        self.max_length = max_length
        outputs = {o.name: o for o in model.graph.outputs}
        self.vocab = int(outputs["logits"].shape[-1])
        self.dtype = pasts[0].dtype.numpy()
        self._pairs = []  # (past name, present name, heads, head_dim, [buffer A, buffer B])
        for value in pasts:
            layer, kind = PAST.match(value.name).groups()
            heads, head_dim = int(value.shape[1]), int(value.shape[3])
            buffers = [np.zeros(heads * max_length * head_dim, self.dtype) for _ in range(2)]
            self._pairs.append((value.name, f"present.{layer}.{kind}", heads, head_dim, buffers))
        self._has_positions = any(v.name == "position_ids" for v in model.graph.inputs)
        self._ones = np.ones((1, max_length), np.int64)
        self._logits = np.zeros((1, 1, self.vocab), np.float32 if self.dtype == np.float32 else self.dtype)
        self.length = 0  # tokens in the cache
        self._current = 0  # which buffer of each pair holds the past

    def reset(self) -> None:
        self.length, self._current = 0, 0

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """Append ``ids`` (1-D) to the sequence; return the logits of its last position, shape [vocab]."""
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(1, -1))
        new = ids.shape[1]
        past, total = self.length, self.length + new
        if total > self.max_length:
            raise BitfoldError(f"the sequence would hold {total} tokens, more than max_length {self.max_length}; raise --max-length.")
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", self._ones[:, :total])
        if self._has_positions:
            binding.bind_cpu_input("position_ids", np.arange(past, total, dtype=np.int64)[None])
        if new == 1:
            binding.bind_output("logits", "cpu", 0, self._logits.dtype, list(self._logits.shape), self._logits.ctypes.data)
        else:
            binding.bind_output("logits", "cpu")  # bound first: copy_outputs_to_cpu()[0] below
        read, write = self._current, 1 - self._current
        for past_name, present_name, heads, head_dim, buffers in self._pairs:
            binding.bind_input(past_name, "cpu", 0, self.dtype, [1, heads, past, head_dim], buffers[read].ctypes.data)
            binding.bind_output(present_name, "cpu", 0, self.dtype, [1, heads, total, head_dim], buffers[write].ctypes.data)
        self.session.run_with_iobinding(binding)
        self.length, self._current = total, write
        if new == 1:
            return self._logits[0, -1].astype(np.float32)
        return binding.copy_outputs_to_cpu()[0][0, -1].astype(np.float32)


@dataclasses.dataclass
class Generation:
    prompt_tokens: int
    tokens: list[int]
    text: str
    prefill_ms: float
    decode_tokens_per_s: float


def pick(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy when ``temperature`` is 0, else a sample from the top-p nucleus of softmax(logits / T)."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.cumsum(p[order]) - p[order] < top_p  # the smallest prefix whose mass reaches top_p
    nucleus = order[keep]
    return int(rng.choice(nucleus, p=p[nucleus] / p[nucleus].sum()))


def generate_ids(
    decoder: Decoder,
    prompt: list[int],
    max_new_tokens: int,
    *,
    eos: set[int] = frozenset(),
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    on_token: Callable[[int], None] | None = None,
) -> Generation:
    """Prefill ``prompt``, then decode up to ``max_new_tokens`` (stopping after an ``eos`` token)."""
    if not prompt:
        raise BitfoldError("the prompt is empty; give some text to continue.")
    rng = np.random.default_rng(seed)
    decoder.reset()
    start = time.perf_counter()
    logits = decoder(np.asarray(prompt))
    prefill = time.perf_counter() - start
    tokens: list[int] = []
    start = time.perf_counter()
    while len(tokens) < max_new_tokens:
        token = pick(logits, temperature, top_p, rng)
        tokens.append(token)
        if on_token is not None:
            on_token(token)
        if token in eos or len(tokens) == max_new_tokens:
            break
        logits = decoder(np.asarray([token]))
    decode = time.perf_counter() - start
    steps = max(len(tokens) - 1, 0)  # the first new token comes from the prefill's logits
    return Generation(len(prompt), tokens, "", prefill * 1e3, steps / decode if steps and decode > 0 else 0.0)


def load_tokenizer(folder: str | os.PathLike):
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise BitfoldError(f"no tokenizer files beside the model in '{folder}'; export it with `bitfold export-llm`, which writes them.")
    return AutoTokenizer.from_pretrained(folder)


def encode_prompt(tokenizer, text: str, raw: bool = False) -> list[int]:
    """Token ids of ``text``, wrapped in the tokenizer's chat template (one user turn) unless ``raw``."""
    if not raw and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text)["input_ids"])


def eos_ids(tokenizer, model_dir: Path) -> set[int]:
    import json

    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for name in ("generation_config.json", "genai_config.json"):
        path = model_dir / name
        if path.is_file():
            cfg = json.loads(path.read_text())
            value = cfg.get("eos_token_id", cfg.get("model", {}).get("eos_token_id"))
            ids.update(value if isinstance(value, list) else [] if value is None else [value])
    return {int(i) for i in ids}


def generate(
    model: ir.Model | str | os.PathLike,
    prompt: str,
    *,
    tokenizer=None,
    max_new_tokens: int = 128,
    max_length: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    raw: bool = False,
    threads: int | None = None,
    on_text: Callable[[str], None] | None = None,
) -> Generation:
    """Generate a continuation of ``prompt`` with a bitfold KV-cache model (a path, or a model plus ``tokenizer``).

    ``on_text`` receives the decoded text as it grows (the new piece each time), for streaming.
    """
    from bitfold.frontend import load

    model_dir = None
    if not isinstance(model, ir.Model):
        model_dir = Path(model).parent
        model = load(model)
    if not past_inputs(model):
        raise BitfoldError("the model has no past_key_values.* inputs; export it with `bitfold export-llm` to get a KV-cache graph.")
    if model_dir is not None:
        tokenizer = tokenizer or load_tokenizer(model_dir)
    if tokenizer is None:
        raise BitfoldError("pass tokenizer= when generating from an in-memory model.")
    ids = encode_prompt(tokenizer, prompt, raw)
    max_length = max_length or len(ids) + max_new_tokens
    decoder = Decoder(model, max_length=max_length, threads=threads)
    eos = eos_ids(tokenizer, model_dir) if model_dir else ({tokenizer.eos_token_id} - {None})
    shown = ""
    tokens: list[int] = []

    def on_token(token: int) -> None:
        nonlocal shown
        tokens.append(token)
        if on_text is not None:
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            if len(text) > len(shown) and not text.endswith("\ufffd"):
                on_text(text[len(shown) :])
                shown = text

    result = generate_ids(decoder, ids, max_new_tokens, eos=eos, temperature=temperature, top_p=top_p, seed=seed, on_token=on_token)
    result.text = tokenizer.decode(result.tokens, skip_special_tokens=True)
    return result
