"""Graph-input specs: parse ``NAME=1x3x224x224``, make seeded sample feeds, and check user feeds.

Sample feeds are what the pipeline verifies against and what ``bench`` times when the user gives no inputs:
floats are standard normal, integers and booleans are 0/1 (valid token ids, masks and indices alike), symbolic
dimensions take the size the user named for them or 1.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir

from bitfold.errors import InputSpecError


@dataclasses.dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    #: None when the rank is unknown; a symbolic dimension is its name (str) or None.
    shape: tuple[int | str | None, ...] | None

    def concrete(self, overrides: Mapping[str, tuple[int, ...]] | None = None) -> tuple[int, ...]:
        if overrides and self.name in overrides:
            return tuple(overrides[self.name])
        if self.shape is None:
            raise InputSpecError(f"input '{self.name}' has unknown rank; give its shape with --shape {self.name}=DIMS.")
        return tuple(d if isinstance(d, int) else 1 for d in self.shape)

    def describe(self) -> str:
        if self.shape is None:
            return f"{self.name}: {self.dtype.name}[any shape]"
        dims = "x".join(str(d) if d is not None else "?" for d in self.shape) or "scalar"
        return f"{self.name}: {self.dtype.name}[{dims}]"


def input_specs(model: ir.Model) -> list[InputSpec]:
    """Specs of the graph inputs that are not initializers."""
    specs = []
    for value in model.graph.inputs:
        if value.const_value is not None:
            continue
        if value.dtype is None:
            raise InputSpecError(f"graph input '{value.name}' has no element type; the model cannot be fed.")
        shape = None if value.shape is None else tuple(d if isinstance(d, int) else d.value for d in value.shape)
        specs.append(InputSpec(value.name, np.dtype(value.dtype.numpy()), shape))
    return specs


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """Parse ``NAME=1x3x224x224`` (``NAME=`` alone is a scalar)."""
    name, sep, dims = text.partition("=")
    if not sep or not name:
        raise InputSpecError(f"shape '{text}' is not NAME=DIMS; write e.g. --shape x=1x3x224x224.")
    try:
        shape = tuple(int(d) for d in dims.split("x")) if dims else ()
    except ValueError:
        raise InputSpecError(f"shape '{text}' has a non-integer dimension; write e.g. --shape x=1x3x224x224.") from None
    if any(d <= 0 for d in shape):
        raise InputSpecError(f"shape '{text}' has a dimension <= 0; every dimension must be positive.")
    return name, shape


def sample_feeds(
    model: ir.Model, shapes: Mapping[str, tuple[int, ...]] | None = None, *, seed: int = 0
) -> dict[str, np.ndarray]:
    """Seeded random inputs matching the model's graph inputs."""
    rng = np.random.default_rng(seed)
    specs = input_specs(model)
    unknown = set(shapes or {}) - {s.name for s in specs}
    if unknown:
        names = ", ".join(s.name for s in specs)
        raise InputSpecError(f"shape given for '{sorted(unknown)[0]}', which is not a model input; inputs are: {names}.")
    if any(PAST_KEY_VALUES.match(s.name) for s in specs):
        return _decoder_feeds(model, specs, shapes or {}, rng)
    feeds = {}
    for spec in specs:
        shape = spec.concrete(shapes)
        if np.issubdtype(spec.dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        else:
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(spec.dtype)
    check_feeds(model, feeds)
    return feeds


#: Past keys/values of a KV-cache decoder graph (the optimum / onnxruntime-genai interface).
PAST_KEY_VALUES = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


def _decoder_feeds(model: ir.Model, specs, shapes: Mapping[str, tuple[int, ...]], rng) -> dict[str, np.ndarray]:
    """A consistent prefill for a KV-cache graph: random token ids (8 unless ``--shape input_ids=BxS``), an all-ones
    mask, positions 0..S-1 and an empty past."""
    batch, seq = shapes.get("input_ids", (1, 8))
    logits = next((v for v in model.graph.outputs if v.name == "logits"), None)
    vocab = logits.shape[-1] if logits is not None and logits.shape is not None and isinstance(logits.shape[-1], int) else 2
    feeds = {}
    for spec in specs:
        if spec.name == "input_ids":
            feeds[spec.name] = rng.integers(0, vocab, size=(batch, seq)).astype(spec.dtype)
        elif spec.name == "attention_mask":
            feeds[spec.name] = np.ones((batch, seq), spec.dtype)
        elif spec.name == "position_ids":
            feeds[spec.name] = np.tile(np.arange(seq, dtype=spec.dtype), (batch, 1))
        elif PAST_KEY_VALUES.match(spec.name):
            dims = [d if isinstance(d, int) else 0 for d in spec.shape]
            dims[0] = batch
            feeds[spec.name] = np.zeros(dims, spec.dtype)
        else:
            raise InputSpecError(f"input '{spec.name}' of a KV-cache graph has no default; pass --inputs.")
    check_feeds(model, feeds)
    return feeds


def check_feeds(model: ir.Model, feeds: Mapping[str, np.ndarray]) -> None:
    """Raise :class:`InputSpecError` unless ``feeds`` names, dtypes and static dimensions match the model."""
    specs = input_specs(model)
    expected = {s.name: s for s in specs}
    missing = [name for name in expected if name not in feeds]
    if missing:
        wanted = "; ".join(s.describe() for s in specs)
        raise InputSpecError(f"input '{missing[0]}' is missing; the model expects {wanted}.")
    for name, array in feeds.items():
        spec = expected.get(name)
        if spec is None:
            raise InputSpecError(f"'{name}' is not an input of the model; its inputs are: {', '.join(expected)}.")
        array = np.asarray(array)
        if array.dtype != spec.dtype:
            raise InputSpecError(
                f"input '{name}' has dtype {array.dtype.name} but the model expects {spec.dtype.name}; cast it."
            )
        if spec.shape is not None and (len(spec.shape) != array.ndim or any(
            isinstance(d, int) and d != n for d, n in zip(spec.shape, array.shape, strict=True)
        )):
            got = "x".join(map(str, array.shape)) or "scalar"
            raise InputSpecError(f"input '{name}' has shape {got} but the model expects {spec.describe()}.")


def load_arrays(path: str | os.PathLike, what: str = "inputs file") -> dict[str, np.ndarray]:
    """Arrays of an ``.npz`` file, one per graph input name; object arrays (pickle) are refused. ``what`` names the
    file in errors."""
    path = Path(path)
    if not path.is_file():
        kind = "is a folder" if path.is_dir() else "does not exist"
        raise InputSpecError(f"{what} '{path}' {kind}; pass an .npz with one array per model input.")
    try:
        with path.open("rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise InputSpecError(f"{what} '{path}' cannot be read ({(e.strerror or str(e)).lower()}); check its permissions.") from None
    if magic == b"\x93NUMPY":
        raise InputSpecError(f"{what} '{path}' is a single .npy array, not a readable .npz of plain arrays; save it with numpy.savez(path, NAME=array).")
    if not magic.startswith(b"PK"):
        raise InputSpecError(f"{what} '{path}' is not a readable .npz of plain arrays (not a zip archive); save it with numpy.savez.")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except Exception as e:  # numpy's reader raises many unrelated types on corrupt bytes
        lines = str(e).strip().splitlines() or [type(e).__name__]
        reason = "it holds pickled objects" if "pickle" in str(e) else lines[0].rstrip(".")
        raise InputSpecError(f"{what} '{path}' is not a readable .npz of plain arrays ({reason}); save it with numpy.savez.") from None
