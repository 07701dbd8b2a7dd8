"""Calibration data and streamed activation statistics.

:class:`CalibrationData` holds a source of feed dicts (an ``.npz`` with samples stacked on a new leading axis, a
named source, or any Python iterable). Named sources are functions registered with :func:`register_source`; the
built-in ones (``lee-text``, ``lee-sentences``, ``wiki-sentences``, ``skimage-photos``) live with the data they read, in
:mod:`bitfold.eval.calibration`, which ``import bitfold`` registers.

:meth:`CalibrationData.collect` runs the *current* graph under ONNX Runtime (:func:`bitfold.runtime.session`) with
the requested intermediate tensors exposed as outputs, and folds each batch into running statistics as it arrives,
so activations are never all held in memory: min/max, per-channel absmax, mean and mean |x|
(channel = last axis unless the caller names another), percentiles of |x| (from a per-tensor reservoir of at most ``reservoir`` values), and, on request, the
Gram matrix ``H = Σ XᵀX`` (float64, X = the tensor flattened to rows of its last axis) that GPTQ needs.
:meth:`CalibrationData.conv_grams` streams the same way the Gram matrices of 2-D Convs' input patches
(``bitfold.quant.im2col``), per group.

``sink_weight`` weights, in H, the first row of every sequence of a tensor shaped (..., sequence, channels). In
decoder LMs the first position is an attention sink: every query reads its value vector, so an error there
reaches every token, yet it is one row in a sequence-length of them. Plain H (weight 1) lets GPTQ move rounding
error into that rare direction.

One run exposes at most :data:`EXPOSED_PER_RUN` tensors: a request for more (cast-precision asks for every tensor of
the graph) runs over the data once per slice of that many, so a 512-token prefill of a language model never holds all
its intermediate tensors at once.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from bitfold.errors import BitfoldError
from bitfold.frontend.inputs import check_feeds
from bitfold.frontend.onnx_io import clone
from bitfold.quant.im2col import ConvGeometry, patch_gram
from bitfold.runtime import session

#: A named source: called as ``source(model, shapes=..., tokenizer=..., model_dir=...)`` (see
#: :meth:`CalibrationData.from_source`), it returns the feed dicts, shaped for ``model``'s inputs.
Source = Callable[..., Iterable[Mapping[str, np.ndarray]]]
_SOURCES: dict[str, Source] = {}

#: The most intermediate tensors one calibration run exposes; larger requests run over the data once per slice.
EXPOSED_PER_RUN = 192


def register_source(name: str) -> Callable[[Source], Source]:
    """Decorator naming a calibration source for :meth:`CalibrationData.from_source` (and ``--calibration NAME``)."""

    def add(source: Source) -> Source:
        if _SOURCES.get(name, source) is not source:
            raise ValueError(f"calibration source {name!r} is registered twice")
        _SOURCES[name] = source
        return source

    return add


def sources() -> list[str]:
    """The names of the registered calibration sources, in registration order."""
    return list(_SOURCES)


@dataclasses.dataclass
class TensorStats:
    """Running statistics of one tensor over all calibration samples."""

    min: float = np.inf
    max: float = -np.inf
    absmax: np.ndarray | None = None  # per channel (last axis)
    channel_min: np.ndarray | None = None  # per channel
    channel_max: np.ndarray | None = None  # per channel
    abs_sum: np.ndarray | None = None  # per channel, for mean |x|
    sum: np.ndarray | None = None  # per channel, for the signed mean
    rows: int = 0
    gram: np.ndarray | None = None
    reservoir: np.ndarray | None = None  # a uniform sample of the tensor's values (signed)
    sample: np.ndarray | None = None  # a uniform sample of whole rows (last axis), when asked for
    reservoir_keys: np.ndarray | None = None  # the sample keys of ``reservoir`` (see ``_keep``)
    sample_keys: np.ndarray | None = None  # the sample keys of ``sample``

    @property
    def mean_abs(self) -> np.ndarray:
        return self.abs_sum / max(self.rows, 1)

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.rows, 1)

    def percentile(self, q: float) -> float:
        """q-th percentile of |x| (estimated from the reservoir)."""
        return float(np.percentile(np.abs(self.reservoir), q))

    def update(
        self, x: np.ndarray, *, gram: bool, reservoir: int, rng: np.random.Generator, sink_weight: float = 1.0, rows_kept: int = 0
    ) -> None:
        x = np.asarray(x, dtype=np.float32)
        if x.size == 0:  # e.g. an empty past cache at prefill: no values, no statistics
            return
        rows = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
        ax = np.abs(rows)
        self.min, self.max = min(self.min, float(rows.min())), max(self.max, float(rows.max()))
        self.absmax = ax.max(axis=0) if self.absmax is None else np.maximum(self.absmax, ax.max(axis=0))
        low, high = rows.min(axis=0), rows.max(axis=0)
        self.channel_min = low if self.channel_min is None else np.minimum(self.channel_min, low)
        self.channel_max = high if self.channel_max is None else np.maximum(self.channel_max, high)
        sums = ax.sum(axis=0, dtype=np.float64)
        self.abs_sum = sums if self.abs_sum is None else self.abs_sum + sums
        signed = rows.sum(axis=0, dtype=np.float64)
        self.sum = signed if self.sum is None else self.sum + signed
        self.rows += rows.shape[0]
        if gram:
            g = sink_gram(x, sink_weight)
            self.gram = g if self.gram is None else self.gram + g
        # the reservoir keeps signed values: observers need both tails
        self.reservoir, self.reservoir_keys = _keep(self.reservoir, self.reservoir_keys, rows.ravel(), reservoir, rng)
        if rows_kept:
            self.sample, self.sample_keys = _keep(self.sample, self.sample_keys, rows, rows_kept, rng)


def sink_gram(x: np.ndarray, sink_weight: float = 1.0, into: np.ndarray | None = None) -> np.ndarray:
    """``Σ w_r x_r x_rᵀ`` over the rows of ``x`` (its last axis the channels), float64: every row weighs 1 but each
    sequence's first one (x shaped (..., sequence, channels)), which weighs ``sink_weight``. Given ``into`` (a Gram
    matrix so far), the sum is added to it in place and it is returned. Computed a block of rows at a time: a
    matrix of a wide layer's inputs costs no second one while it accumulates."""
    rows = np.asarray(x).reshape(-1, x.shape[-1]).astype(np.float64)
    weights = np.ones(rows.shape[0])
    if x.ndim >= 3 and sink_weight != 1.0:
        weights.reshape(-1, x.shape[-2])[:, 0] = sink_weight
    weighted = rows * weights[:, None]
    k = rows.shape[1]
    out = np.empty((k, k)) if into is None else into
    for i in range(0, k, 1024):
        block = weighted[:, i : i + 1024].T @ rows
        if into is None:
            out[i : i + 1024] = block
        else:
            out[i : i + 1024] += block
    return out


def _keep(kept: np.ndarray | None, keys: np.ndarray | None, new: np.ndarray, size: int, rng: np.random.Generator):
    """Merge ``new`` items (along axis 0) into a uniform sample without replacement of at most ``size`` items.

    Every item ever offered draws a uniform key and the sample is the ``size`` smallest keys (bottom-k sampling):
    uniform over everything seen, whatever the number and sizes of the updates, and, with a generator per tensor,
    the same items for the same stream of values whatever the tensor is called or which tensors share its run.
    Items keep their arrival order.
    """
    fresh = rng.random(len(new))
    pool, pool_keys = (new, fresh) if kept is None else (np.concatenate([kept, new]), np.concatenate([keys, fresh]))
    if len(pool) <= size:
        return pool, pool_keys
    chosen = np.sort(np.argpartition(pool_keys, size - 1)[:size])
    return pool[chosen], pool_keys[chosen]


class CalibrationData:
    """A re-iterable source of feed dicts plus the statistics collection that runs the graph over it."""

    def __init__(self, samples: Iterable[Mapping[str, np.ndarray]] | Callable[[], Iterable], *, name: str = "custom"):
        self._samples = samples
        self.name = name
        self._memo: tuple[tuple, dict[str, TensorStats]] | None = None
        self._conv_memo: tuple[tuple, dict[str, np.ndarray]] | None = None

    def __iter__(self):
        source = self._samples() if callable(self._samples) else self._samples
        return iter(source)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    @classmethod
    def from_npz(cls, path: str | Path, model: ir.Model | None = None) -> CalibrationData:
        """One array per graph input, samples stacked on a new leading axis; every value must be finite.

        With ``model``, the arrays are checked against its graph inputs before any work: one per input, no other,
        each of the input's dtype, and each sample of the input's shape (symbolic dimensions take any size).
        """
        from bitfold.frontend.inputs import load_arrays

        arrays = load_arrays(path, "calibration file")
        counts = {name: a.shape[0] if a.ndim else 0 for name, a in arrays.items()}
        if not arrays or len(set(counts.values())) != 1 or 0 in counts.values():
            raise BitfoldError(
                f"calibration file '{path}' must hold one array per graph input with the same number of samples "
                f"on the leading axis; found {counts}."
            )
        if model is not None:
            _check_npz_arrays(path, arrays, model)
        for name, a in arrays.items():
            if a.dtype.kind in "fc" and not np.isfinite(a).all():
                sample = int(np.argwhere(~np.isfinite(a))[0][0])
                raise BitfoldError(
                    f"calibration file '{path}': array '{name}' holds NaN or infinite values (first in sample {sample}); "
                    "calibration samples must be finite."
                )
        n = next(iter(counts.values()))
        return cls([{name: a[i] for name, a in arrays.items()} for i in range(n)], name=str(path))

    @classmethod
    def from_source(
        cls,
        name: str,
        model: ir.Model,
        *,
        shapes: Mapping[str, Sequence[int]] | None = None,
        tokenizer: Any = None,
        model_dir: str | os.PathLike | None = None,
    ) -> CalibrationData:
        """A named source (:func:`sources`; the built-in ones are described in :mod:`bitfold.eval.calibration`) or an
        ``.npz`` path, shaped for ``model``'s inputs. ``shapes`` sizes inputs whose dimensions are symbolic, as the
        CLI's ``--shape`` does (e.g. ``{"images": (1, 3, 320, 320)}``); ``tokenizer`` (a Hugging Face tokenizer or the
        folder of the model's tokenizer files) and ``model_dir`` (the folder the model was loaded from) serve the text
        sources.
        """
        if name in _SOURCES:
            return cls(_SOURCES[name](model, shapes=shapes, tokenizer=tokenizer, model_dir=model_dir), name=name)
        if Path(name).suffix == ".npz":
            return cls.from_npz(name, model)
        raise BitfoldError(
            f"unknown calibration source '{name}'; give an .npz file or one of: {', '.join(_SOURCES)}."
        )

    def collect(
        self,
        model: ir.Model,
        tensors: Iterable[str],
        *,
        gram: Iterable[str] = (),
        channel_axis: Mapping[str, int] | None = None,
        sink_weight: float = 1.0,
        reservoir: int = 100_000,
        rows: Iterable[str] = (),
        rows_kept: int = 4096,
        progress: bool = True,
    ) -> dict[str, TensorStats]:
        """Statistics of the named tensors of ``model`` (unchanged) over every calibration sample.

        Per-channel statistics run over the last axis unless ``channel_axis`` names another for a tensor (1 for
        NCHW images). Tensors named in ``rows`` also keep a uniform sample of ``rows_kept`` whole rows. The last result is memoised: asking again for the same request on an identical graph
        returns it.
        """
        axes = dict(channel_axis or {})
        names = list(dict.fromkeys(tensors))
        want_gram, want_rows = set(gram), set(rows)
        key = (model_key(model), tuple(names), tuple(sorted(want_gram)), tuple(sorted(axes.items())), sink_weight, reservoir,
               tuple(sorted(want_rows)), rows_kept)  # fmt: skip
        if self._memo is not None and self._memo[0] == key:  # same graph, same request: reuse
            return self._memo[1]
        stats = {name: TensorStats() for name in names}
        rngs = {name: np.random.default_rng(0) for name in names}  # one stream per tensor: samples do not depend on names
        for chunk, outputs in self._runs(model, names, progress):
            for name in chunk:
                value = outputs[name] if name not in axes else np.moveaxis(outputs[name], axes[name], -1)
                stats[name].update(value, gram=name in want_gram, reservoir=reservoir, rng=rngs[name], sink_weight=sink_weight,
                                   rows_kept=rows_kept if name in want_rows else 0)  # fmt: skip
        self._memo = (key, stats)
        return stats

    def conv_grams(self, model: ir.Model, convs: Mapping[str, tuple[str, ConvGeometry]], *, progress: bool = True) -> dict[str, np.ndarray]:
        """Patch Gram matrices (groups, K, K) of 2-D Convs, keyed like ``convs``: key -> (input tensor, geometry).
        Memoised like :meth:`collect`."""
        memo_key = (model_key(model), tuple(sorted(convs.items())))
        if self._conv_memo is not None and self._conv_memo[0] == memo_key:  # same graph, same request: reuse
            return self._conv_memo[1]
        names = sorted({tensor for tensor, _ in convs.values()})
        grams: dict[str, np.ndarray] = {}
        for chunk, outputs in self._runs(model, names, progress):
            for key, (tensor, geometry) in convs.items():
                if tensor not in chunk:  # another slice's tensor
                    continue
                g = patch_gram(outputs[tensor], geometry)
                grams[key] = g if key not in grams else grams[key] + g
        self._conv_memo = (memo_key, grams)
        return grams

    def activations(self, model: ir.Model, names: Iterable[str], *, progress: bool = True) -> list[dict[str, np.ndarray]]:
        """The named tensors of ``model`` (unchanged) on every calibration sample, one dict per sample (not
        memoised)."""
        names = list(dict.fromkeys(names))
        parts = [{name: outputs[name] for name in chunk} for chunk, outputs in self._runs(model, names, progress, prune=True)]
        n = len(list(self))  # _runs visits every sample once per slice of names, in order
        return [{k: v for part in parts[i::n] for k, v in part.items()} for i in range(n)]

    def _runs(self, model: ir.Model, names: list[str], progress: bool, prune: bool = False) -> Iterator[tuple[list[str], dict[str, np.ndarray]]]:
        """Run ``model`` (unchanged) on every sample with the named tensors exposed, at most
        :data:`EXPOSED_PER_RUN` per pass over the data; yields (the pass's names, one sample's outputs). ``prune``:
        run only the nodes the names depend on (:func:`prefix`), not the whole graph."""
        samples = list(self)
        if not samples:
            raise BitfoldError(f"calibration source '{self.name}' yields no samples.")
        chunks = exposed_slices(names)
        bar = tqdm(total=len(samples) * len(chunks), desc="calibrate", disable=not progress, leave=False)
        for chunk in chunks:
            probe = prefix(model, chunk) if prune else expose(model, chunk)
            runner = session(probe)
            outputs = [o.name for o in runner.get_outputs()]
            for feeds in samples:
                check_feeds(probe, feeds)
                yield chunk, dict(zip(outputs, runner.run(outputs, dict(feeds)), strict=True))
                bar.update()
            del runner, probe
        bar.close()


def exposed_slices(names: Sequence[str], per_run: int | None = None) -> list[list[str]]:
    """``names`` cut into the slices one calibration run exposes (:data:`EXPOSED_PER_RUN` each by default)."""
    per_run = per_run or EXPOSED_PER_RUN
    names = list(names)
    return [names[i : i + per_run] for i in range(0, len(names), per_run)] or [[]]


def expose(model: ir.Model, names: Iterable[str]) -> ir.Model:
    """A copy of ``model`` whose graph also outputs the named tensors (graph inputs included); refuses a name the
    model does not compute."""
    probe = clone(model)
    values = {out.name: out for node in ir.traversal.RecursiveGraphIterator(probe.graph) for out in node.outputs}
    values.update({v.name: v for v in probe.graph.inputs})
    exposed = {v.name for v in probe.graph.outputs}
    for name in names:
        if name not in values:
            raise BitfoldError(f"calibration asked for tensor '{name}', which the model does not compute.")
        if name not in exposed:
            probe.graph.outputs.append(values[name])
            exposed.add(name)
    return probe


def prefix(model: ir.Model, names: Sequence[str]) -> ir.Model:
    """A model of ``model``'s inputs whose outputs are the named tensors, with only the nodes they depend on (the
    graph's tensors shared, not copied: a block reconstruction's first inputs from a model on disk read the
    embedding table, not every weight)."""
    values = ir.convenience.create_value_mapping(model.graph, include_subgraphs=False)
    missing = [name for name in names if name not in values]
    if missing:
        raise BitfoldError(f"calibration asked for tensor '{missing[0]}', which the model does not compute.")
    graph = ir.convenience.extract(model.graph, inputs=list(model.graph.inputs), outputs=[values[n] for n in names])
    return ir.Model(graph, ir_version=model.ir_version, producer_name=model.producer_name, functions=model.functions.values())


def model_key(model: ir.Model) -> str:
    """A digest of everything that defines ``model``'s computation, without serializing it.

    It covers the opsets, the graph inputs and outputs (names, types, shapes), every node (op, domain, name, input
    and output names, attributes, metadata) in order, subgraphs and functions, and every initializer and tensor
    attribute by name, dtype, shape and a SHA-256 of its bytes. Shapes inferred on intermediate values are left
    out. A tensor's bytes are hashed once per tensor object and remembered while the object lives: a tensor
    replaced by another (how passes change weights) is hashed anew; one edited in place through its numpy array is
    caught by a strided sample of its values, read on every call.
    """
    h = hashlib.sha256()
    _feed(h, "model", model.ir_version, sorted(model.opset_imports.items()), sorted(model.metadata_props.items()))
    _graph_key(h, model.graph)
    for function in model.functions.values():
        _feed(h, "function", function.identifier(), sorted(function.opset_imports.items()))
        _feed(h, [attr.name for attr in function.attributes.values()])
        _graph_key(h, function)
    return h.hexdigest()


def _feed(h, *parts) -> None:
    data = repr(parts).encode()
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)


def _graph_key(h, graph: ir.Graph | ir.Function) -> None:
    _feed(h, "inputs", [_value_key(v) for v in graph.inputs], "outputs", [_value_key(v) for v in graph.outputs])
    for name, value in sorted(getattr(graph, "initializers", {}).items()):  # order-free: a reorder is no change
        _feed(h, "initializer", name, _tensor_key(value.const_value))
    for node in graph:
        inputs = [v.name if v is not None else None for v in node.inputs]
        _feed(h, "node", node.domain, node.op_type, node.overload, node.name, inputs, [v.name for v in node.outputs],
              sorted(node.metadata_props.items()), node.doc_string)  # fmt: skip
        for attr in node.attributes.values():
            _attr_key(h, attr)


def _attr_key(h, attr: ir.Attr) -> None:
    if attr.is_ref():
        _feed(h, "ref", attr.name, attr.ref_attr_name)
    elif attr.type == ir.AttributeType.GRAPH:
        _feed(h, "graph", attr.name)
        _graph_key(h, attr.value)
    elif attr.type == ir.AttributeType.GRAPHS:
        _feed(h, "graphs", attr.name, len(attr.value))
        for graph in attr.value:
            _graph_key(h, graph)
    elif attr.type == ir.AttributeType.TENSOR:
        _feed(h, "tensor", attr.name, _tensor_key(attr.value))
    elif attr.type == ir.AttributeType.TENSORS:
        _feed(h, "tensors", attr.name, [_tensor_key(t) for t in attr.value])
    else:
        _feed(h, "attr", attr.name, attr.type, attr.value)


def _value_key(value: ir.Value) -> tuple:
    shape = None if value.shape is None else tuple(str(d) if not isinstance(d, int) else d for d in value.shape)
    return value.name, str(value.type), shape


#: id(tensor) -> (weak reference to it, strided sample of its values, SHA-256 of its bytes).
_DIGESTS: dict[int, tuple[weakref.ref, bytes, str]] = {}
_SAMPLES = 16


def _tensor_key(tensor) -> tuple | None:
    if tensor is None:
        return None
    return str(tensor.dtype), tuple(tensor.shape.numpy()), _digest(tensor)


def _digest(tensor) -> str:
    sample = _sample(tensor)
    entry = _DIGESTS.get(id(tensor))
    if entry is not None and entry[0]() is tensor and entry[1] == sample:
        return entry[2]
    digest = _content_digest(tensor)
    try:
        ref = weakref.ref(tensor, functools.partial(_forget, id(tensor)))
    except TypeError:  # a tensor type without weak references: hashed on every call
        return digest
    _DIGESTS[id(tensor)] = (ref, sample, digest)
    return digest


def _forget(key: int, ref: weakref.ref) -> None:
    entry = _DIGESTS.get(key)
    if entry is not None and entry[0] is ref:
        del _DIGESTS[key]


def _sample(tensor) -> bytes:
    """Evenly strided values of a tensor backed by a writable numpy array (the only kind editable in place)."""
    raw = getattr(tensor, "raw", None) if isinstance(tensor, ir.Tensor) else None
    if not isinstance(raw, np.ndarray) or not raw.flags.writeable or raw.dtype.hasobject or raw.size == 0:
        return b""
    return raw.flat[:: max(1, raw.size // _SAMPLES)].tobytes()


def _content_digest(tensor) -> str:
    try:
        array = np.ascontiguousarray(tensor.numpy())
        data = array.reshape(-1).view(np.uint8) if not array.dtype.hasobject else tensor.tobytes()
    except (TypeError, ValueError):
        data = tensor.tobytes()
    return hashlib.sha256(data).hexdigest()


def _check_npz_arrays(path: str | Path, arrays: Mapping[str, np.ndarray], model: ir.Model) -> None:
    """Refuse calibration arrays that do not match ``model``'s graph inputs (names, dtypes, per-sample shapes)."""
    from bitfold.frontend.inputs import input_specs

    specs = {spec.name: spec for spec in input_specs(model)}
    for name, spec in specs.items():
        if name not in arrays:
            raise BitfoldError(
                f"calibration file '{path}' has no array for graph input '{name}' (it holds: {', '.join(arrays)}); "
                f"save one array per input, e.g. numpy.savez(path, {name}=samples)."
            )
    for name, array in arrays.items():
        spec = specs.get(name)
        if spec is None:
            raise BitfoldError(f"calibration file '{path}' holds array '{name}', which is not a graph input; the inputs are: {', '.join(specs)}.")
        if array.dtype != spec.dtype:
            raise BitfoldError(
                f"calibration file '{path}': array '{name}' has dtype {array.dtype.name} but input '{name}' is "
                f"{spec.dtype.name}; cast it, e.g. samples.astype(numpy.{spec.dtype.name})."
            )
        sample = array.shape[1:]
        if spec.shape is not None and (len(sample) != len(spec.shape) or any(
            isinstance(d, int) and d != n for d, n in zip(spec.shape, sample, strict=True)
        )):
            dims = ", ".join(str(d) if isinstance(d, int) else repr(d or "?") for d in spec.shape)
            got = "x".join(map(str, sample)) or "scalar"
            raise BitfoldError(
                f"calibration file '{path}': array '{name}' has samples of shape {got} but input {spec.describe()}; "
                f"stack the samples on a new leading axis, shape (N, {dims})."
            )
