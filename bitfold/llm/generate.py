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
    """One sequence (batch 1) through a KV-cache graph on ONNX Runtime, with preallocated cache buffers.

    On the CPU the graph is first lowered to ORT's fused LLM kernels (:func:`bitfold.backends.ort_llm.lower_decoder`:
    one ``GroupQueryAttention`` per layer, fused residual norms, the head on the last position only); past and
    present then share one ``max_length`` buffer per tensor. Where the lowering declines (``fusion.reason``) or
    ``fuse=False``, the standard graph runs with two buffers per tensor used in turn as past and present.

    A prompt longer than ``prefill_chunk`` tokens is fed in chunks of that many, each attending to the cache the
    previous ones wrote: the attention kernels score every query against every key of a call, so one 512-token call
    computes the full 512 × 512 product where chunks skip most of its masked half, while the linears keep enough rows
    per call to stay efficient (0: the whole prompt in one call).

    ``kv_cache="float16"`` keeps the fused graph's cache in float16 (half the bytes each decode step reads; attention
    computes in float16); the default is the graph's own type, so the logits are the exported graph's.
    """

    def __init__(self, model: ir.Model, max_length: int = 2048, threads: int | None = None, device: str = "cpu",
                 fuse: bool = True, profile: str | None = None, prefill_chunk: int = 128, kv_cache: str | None = None) -> None:  # fmt: skip
        from bitfold.backends.ort import OrtRunnable
        from bitfold.backends.ort_llm import lower_decoder

        if prefill_chunk < 0:
            raise BitfoldError(f"prefill_chunk must be 0 (no chunks) or a number of tokens, not {prefill_chunk}.")
        pasts = past_inputs(model)
        if not pasts:
            raise BitfoldError("the model has no past_key_values.* inputs; export it with `bitfold export-llm` to get a KV-cache graph.")
        self.fusion = lower_decoder(model, max_length, last_logits=True, kv_cache=kv_cache) if fuse and device == "cpu" else None
        self.shared = self.fusion is not None and self.fusion.attention
        if kv_cache is not None and not self.shared:
            reason = self.fusion.reason if self.fusion else "the graph is not lowered (fuse=False or a GPU)"
            raise BitfoldError(f"kv_cache='{kv_cache}' needs the fused attention, which this graph does not get: {reason}.")
        self.runnable = OrtRunnable(self.fusion.model if self.fusion else model, device=device, threads=threads, profile=profile)
        self.session = self.runnable.session
        self.max_length = max_length
        self.prefill_chunk = prefill_chunk
        outputs = {o.name: o for o in model.graph.outputs}
        self.vocab = int(outputs["logits"].shape[-1])
        logits_dtype = outputs["logits"].dtype.numpy()
        if self.shared:
            pasts = past_inputs(self.fusion.model)
        self.dtype = pasts[0].dtype.numpy()
        self._pairs = []  # (past name, present name, heads, head_dim, [buffer A, buffer B] or [shared buffer])
        for value in pasts:
            layer, kind = PAST.match(value.name).groups()
            heads, head_dim = int(value.shape[1]), int(value.shape[3])
            buffers = [np.zeros(heads * max_length * head_dim, self.dtype) for _ in range(1 if self.shared else 2)]
            self._pairs.append((value.name, f"present.{layer}.{kind}", heads, head_dim, buffers))
        self._has_positions = any(v.name == "position_ids" for v in model.graph.inputs)
        self._last_only = self.fusion is not None and self.fusion.last_logits
        self._ones = np.ones((1, max_length), np.int64)
        self._positions = np.arange(max_length, dtype=np.int64)[None]
        self._binding = None  # kept across steps when past and present share buffers
        self._logits = np.zeros((1, 1, self.vocab), logits_dtype)
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
        if 0 < self.prefill_chunk < new:
            for start in range(0, new, self.prefill_chunk):
                logits = self(ids[0, start : start + self.prefill_chunk])
            return logits
        if self.shared:
            return self._shared_step(ids, past, total)
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", self._ones[:, :total])
        if self._has_positions:
            binding.bind_cpu_input("position_ids", self._positions[:, past:total])
        into_buffer = new == 1 or self._last_only
        if into_buffer:
            binding.bind_output("logits", "cpu", 0, self._logits.dtype, list(self._logits.shape), self._logits.ctypes.data)
        else:
            binding.bind_output("logits", "cpu")  # bound first: copy_outputs_to_cpu()[0] below
        read, write = self._current, 1 - self._current
        for past_name, present_name, heads, head_dim, buffers in self._pairs:
            binding.bind_input(past_name, "cpu", 0, self.dtype, [1, heads, past, head_dim], buffers[read].ctypes.data)
            binding.bind_output(present_name, "cpu", 0, self.dtype, [1, heads, total, head_dim], buffers[write].ctypes.data)
        self.session.run_with_iobinding(binding)
        self.length, self._current = total, write
        if into_buffer:
            return self._logits[0, -1].astype(np.float32)
        return binding.copy_outputs_to_cpu()[0][0, -1].astype(np.float32)

    def _shared_step(self, ids: np.ndarray, past: int, total: int) -> np.ndarray:
        """One call of the lowered graph: the cache and logits stay bound across steps, only the token inputs change."""
        if self._binding is None:
            self._binding = binding = self.session.io_binding()
            binding.bind_output("logits", "cpu", 0, self._logits.dtype, list(self._logits.shape), self._logits.ctypes.data)
            for past_name, present_name, heads, head_dim, buffers in self._pairs:  # one max_length buffer, read and written in place
                shape = [1, heads, self.max_length, head_dim]
                self._binding.bind_input(past_name, "cpu", 0, self.dtype, shape, buffers[0].ctypes.data)
                self._binding.bind_output(present_name, "cpu", 0, self.dtype, shape, buffers[0].ctypes.data)
        binding = self._binding
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", self._ones[:, :total])
        if self._has_positions:
            binding.bind_cpu_input("position_ids", self._positions[:, past:total])
        self.session.run_with_iobinding(binding)
        self.length = total
        return self._logits[0, -1].astype(np.float32)


class TvmDecoder:
    """One sequence through a KV-cache graph on TVM, whose builds need static shapes.

    The cache is a fixed-capacity buffer per past tensor, ``[1, heads, C, head_dim]``, shared with TVM without
    copies (DLPack); a slot is visible when its ``attention_mask`` entry is 1, so the graph's own masking handles
    holes. Prefill computes the head on the last position only. Decode is one build (S = 1, past = C) of the graph's
    decode form
    (:func:`bitfold.backends.tvm.decode.split_attention`: attention reads the cache in place and the presents are the
    new token's key and value), copied into the next free slot. Prefill runs from an empty past at a bucketed length
    (the next power of two ≥ 16, at most C), left-padded with masked slots, so a handful of builds serve every prompt.
    """

    def __init__(self, model: ir.Model, max_length: int = 2048, device: str = "cpu") -> None:
        from bitfold.backends.tvm import TvmRunnable

        pasts = past_inputs(model)
        if not pasts:
            raise BitfoldError("the model has no past_key_values.* inputs; export it with `bitfold export-llm` to get a KV-cache graph.")
        window = int(model.metadata_props.get("bitfold.llm.sliding_window", "0"))
        if window and window < max_length:
            raise BitfoldError(f"the model uses sliding-window attention ({window} tokens) and TVM's fixed-capacity cache "
                               "does not keep token order; use --backend ort.")  # fmt: skip
        from bitfold.backends.llm_match import slice_head
        from bitfold.backends.tvm.decode import split_attention
        from bitfold.frontend.onnx_io import clone

        prefill_form = clone(model)  # the head on the last position only: prefill needs no other logits
        slice_head(prefill_form.graph)
        self.runnable = TvmRunnable(prefill_form, device=device)
        if self.runnable.device != "cpu":
            raise BitfoldError("TVM generation runs on the CPU for now; use --backend ort for CUDA.")
        decode_form, self.decode_reason = split_attention(model)
        self.decode_runnable = TvmRunnable(decode_form, device=device) if decode_form is not None else self.runnable
        self.split = decode_form is not None  # keys cached transposed, [1, heads, head_dim, C]; presents: the new slot
        self.model, self.max_length = model, max_length
        self.dtype = pasts[0].dtype.numpy()
        self.names = self.runnable.input_names
        self._layout = [(v.name, int(v.shape[1]), int(v.shape[3])) for v in pasts]
        self.capacity = max_length - 1  # decode sees C past slots plus the new token at graph position C
        self.cache = {name: _aligned((1, heads, dim, self.capacity) if self._transposed(name) else (1, heads, self.capacity, dim), self.dtype)
                      for name, heads, dim in self._layout}  # fmt: skip
        self.mask = _aligned((1, self.capacity + 1), np.int64)
        self._ids, self._pos = _aligned((1, 1), np.int64), _aligned((1, 1), np.int64)
        self._decode = None  # (session, input tensors): every decode input is one of the buffers above
        self.length = 0
        self._next_pos = 0

    def reset(self) -> None:
        self.length, self._next_pos = 0, 0
        self.mask[...] = 0

    def _transposed(self, name: str) -> bool:
        return self.split and name.endswith(".key")

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if self.length == 0 and ids.size > 1:
            return self._prefill(ids)
        logits = None
        for token in ids:
            logits = self._step(int(token))
        return logits

    def _prefill(self, ids: np.ndarray) -> np.ndarray:
        import tvm

        from bitfold.llm.feeds import empty_past

        n = ids.size
        bucket = min(prefill_bucket(n), self.capacity)
        if n > bucket:
            raise BitfoldError(f"the prompt has {n} tokens, more than max_length {self.max_length} allows; raise --max-length.")
        pad = bucket - n
        feeds = {"input_ids": _aligned((1, bucket), np.int64), "attention_mask": _aligned((1, bucket), np.int64),
                 "position_ids": _aligned((1, bucket), np.int64)}  # fmt: skip
        feeds["input_ids"][0, pad:] = ids
        feeds["attention_mask"][0, pad:] = 1
        feeds["position_ids"][0, pad:] = np.arange(n)
        feeds.update({k: _aligned(v.shape, v.dtype) for k, v in empty_past(self.model).items()})
        session = self.runnable.session(feeds)
        out = list(session.call([_tvm_tensor(feeds[name]) for name in self.names]))
        for (name, _, _), present in zip(self._layout, out[1:], strict=True):
            present = np.from_dlpack(present)
            if self._transposed(name):
                self.cache[name][:, :, :, :bucket] = present.transpose(0, 1, 3, 2)
            else:
                self.cache[name][:, :, :bucket] = present
        self.mask[0, :bucket] = feeds["attention_mask"][0]
        self.length, self._next_pos = bucket, n
        return np.from_dlpack(out[0])[0, -1].astype(np.float32)

    def _step(self, token: int) -> np.ndarray:
        import tvm

        if self.length >= self.capacity:
            raise BitfoldError(f"the sequence would exceed max_length {self.max_length}; raise --max-length.")
        if self._decode is None:
            feeds = {"input_ids": self._ids, "attention_mask": self.mask, "position_ids": self._pos, **self.cache}
            self._decode = (self.decode_runnable.session(feeds), [tvm.runtime.from_dlpack(feeds[name]) for name in self.names])
        session, tensors = self._decode
        self._ids[0, 0], self._pos[0, 0] = token, self._next_pos
        self.mask[0, self.capacity] = 1
        out = list(session.call(tensors))
        for (name, _, _), present in zip(self._layout, out[1:], strict=True):
            if self._transposed(name):
                self.cache[name][:, :, :, self.length] = np.from_dlpack(present)[:, :, 0]
            else:
                self.cache[name][:, :, self.length] = np.from_dlpack(present)[:, :, 0 if self.split else self.capacity]
        self.mask[0, self.length] = 1
        self.length += 1
        self._next_pos += 1
        return np.from_dlpack(out[0])[0, -1].astype(np.float32)


def prefill_bucket(tokens: int) -> int:
    """The prefill length TVM builds for a prompt: the next power of two, at least 16."""
    return max(16, 1 << (tokens - 1).bit_length())


def _tvm_tensor(array: np.ndarray):
    """The array as a TVM tensor sharing its memory (an empty array gets a fresh empty tensor: numpy gives zero-size
    arrays no aligned data pointer)."""
    import tvm

    if array.size == 0:
        return tvm.runtime.empty(array.shape, str(array.dtype))
    return tvm.runtime.from_dlpack(array)


def _aligned(shape, dtype, align: int = 64) -> np.ndarray:
    """Zeros whose data starts on an ``align``-byte boundary (TVM takes such arrays without a copy)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(nbytes + align, np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def make_decoder(model: ir.Model, backend: str = "ort", max_length: int = 2048, threads: int | None = None,
                 kv_cache: str | None = None):  # fmt: skip
    if backend == "ort":
        return Decoder(model, max_length=max_length, threads=threads, kv_cache=kv_cache)
    if backend == "tvm":
        if kv_cache is not None and kv_cache != str(past_inputs(model)[0].dtype.numpy()):
            raise BitfoldError(f"kv_cache='{kv_cache}' is an ONNX Runtime option; the TVM backend keeps the graph's cache type.")
        return TvmDecoder(model, max_length=max_length)
    raise BitfoldError(f"unknown backend '{backend}'; choose ort or tvm.")


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
    backend: str = "ort",
    kv_cache: str | None = None,
    on_text: Callable[[str], None] | None = None,
) -> Generation:
    """Generate a continuation of ``prompt`` with a bitfold KV-cache model (a path, or a model plus ``tokenizer``).

    ``kv_cache`` (ORT): ``"float16"`` or ``"float32"``, the cache's element type (default: the graph's; see
    :class:`Decoder`). ``on_text`` receives the decoded text as it grows (the new piece each time), for streaming.
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
    if max_length is None:  # TVM: the prompt takes its bucket's slots; decode needs one more for the new token
        max_length = (prefill_bucket(len(ids)) + 1 if backend == "tvm" else len(ids)) + max_new_tokens
    decoder = make_decoder(model, backend, max_length, threads, kv_cache)
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
