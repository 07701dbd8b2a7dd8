"""Calibration data and streamed activation statistics.

:class:`CalibrationData` holds a source of feed dicts (an ``.npz`` with samples stacked on a new leading axis, a
built-in named source, or any Python iterable). :meth:`CalibrationData.collect` runs the *current* graph under ONNX
Runtime with the requested intermediate tensors exposed as outputs, and folds each batch into running statistics
as it arrives, so activations are never all held in memory: min/max, per-channel absmax, mean and mean |x|
(channel = last axis unless the caller names another), percentiles of |x| (from a per-tensor reservoir of at most ``reservoir`` values), and, on request, the
Gram matrix ``H = Σ XᵀX`` (float64, X = the tensor flattened to rows of its last axis) that GPTQ needs.
:meth:`CalibrationData.conv_grams` streams the same way the Gram matrices of 2-D Convs' input patches
(``bitfold.quant.im2col``), per group.

``sink_weight`` weights, in H, the first row of every sequence of a tensor shaped (..., sequence, channels). In
decoder LMs the first position is an attention sink: every query reads its value vector, so an error there
reaches every token, yet it is one row in a sequence-length of them. Plain H (weight 1) lets GPTQ move rounding
error into that rare direction.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from bitfold.errors import BitfoldError
from bitfold.quant.im2col import ConvGeometry, patch_gram

BUILTIN_SOURCES = ("lee-text", "lee-sentences", "skimage-photos")


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
            weights = np.ones(rows.shape[0])
            if x.ndim >= 3 and sink_weight != 1.0:  # (..., sequence, channels): weight each sequence's first row
                weights.reshape(-1, x.shape[-2])[:, 0] = sink_weight
            g = (rows.astype(np.float64) * weights[:, None]).T @ rows.astype(np.float64)
            self.gram = g if self.gram is None else self.gram + g
        flat = rows.ravel()  # the reservoir keeps signed values: observers need both tails
        take = flat if flat.size <= reservoir else flat[rng.choice(flat.size, reservoir, replace=False)]
        pool = take if self.reservoir is None else np.concatenate([self.reservoir, take])
        self.reservoir = pool if pool.size <= reservoir else pool[rng.choice(pool.size, reservoir, replace=False)]
        if rows_kept:
            pool = rows if self.sample is None else np.concatenate([self.sample, rows])
            self.sample = pool if len(pool) <= rows_kept else pool[np.sort(rng.choice(len(pool), rows_kept, replace=False))]


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
    def from_npz(cls, path: str | Path) -> CalibrationData:
        """One array per graph input, samples stacked on a new leading axis."""
        from bitfold.tools.files import load_arrays

        arrays = load_arrays(path)
        counts = {name: a.shape[0] if a.ndim else 0 for name, a in arrays.items()}
        if not arrays or len(set(counts.values())) != 1 or 0 in counts.values():
            raise BitfoldError(
                f"calibration file '{path}' must hold one array per graph input with the same number of samples "
                f"on the leading axis; found {counts}."
            )
        n = next(iter(counts.values()))
        return cls([{name: a[i] for name, a in arrays.items()} for i in range(n)], name=str(path))

    @classmethod
    def from_source(cls, name: str, model: ir.Model) -> CalibrationData:
        """A built-in source by name, shaped for ``model``'s inputs."""
        if name == "lee-text":
            from bitfold.eval.models import smollm2
            from bitfold.eval.tasks import CALIB_WINDOWS, WINDOW, lee_windows, lm_feeds

            seq_len = _static_dim(model, "input_ids", 1, default=WINDOW)
            _, tokenizer = smollm2()
            windows = lee_windows(tokenizer, CALIB_WINDOWS, seq_len)
            return cls(list(lm_feeds(windows, model)), name=name)
        if name == "lee-sentences":
            from bitfold.eval.data import lee_sentences
            from bitfold.eval.models import minilm
            from bitfold.eval.tasks import sentence_feeds

            _, tokenizer = minilm()
            sentences = lee_sentences("calibration")[:128]
            return cls(sentence_feeds(tokenizer, sentences, _static_dim(model, "input_ids", 1)), name=name)
        if name == "skimage-photos":
            from bitfold.eval.data import photo_crops

            image_input = model.graph.inputs[0]
            size = _static_dim(model, image_input.name, -1)
            crops = photo_crops("calibration", 16, size=size)
            return cls([{image_input.name: crop[None]} for crop in crops], name=name)
        if Path(name).suffix == ".npz":
            return cls.from_npz(name)
        raise BitfoldError(
            f"unknown calibration source '{name}'; give an .npz file or one of: {', '.join(BUILTIN_SOURCES)}."
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
        key = (_fingerprint(model), tuple(names), tuple(sorted(want_gram)), tuple(sorted(axes.items())), sink_weight, reservoir,
               tuple(sorted(want_rows)), rows_kept)  # fmt: skip
        if self._memo is not None and self._memo[0] == key:  # same graph, same request: reuse
            return self._memo[1]
        stats = {name: TensorStats() for name in names}
        rng = np.random.default_rng(0)
        for outputs in self._run(model, names, progress):
            for name in names:
                value = outputs[name] if name not in axes else np.moveaxis(outputs[name], axes[name], -1)
                stats[name].update(value, gram=name in want_gram, reservoir=reservoir, rng=rng, sink_weight=sink_weight,
                                   rows_kept=rows_kept if name in want_rows else 0)  # fmt: skip
        self._memo = (key, stats)
        return stats

    def conv_grams(self, model: ir.Model, convs: Mapping[str, tuple[str, ConvGeometry]], *, progress: bool = True) -> dict[str, np.ndarray]:
        """Patch Gram matrices (groups, K, K) of 2-D Convs, keyed like ``convs``: key -> (input tensor, geometry).
        Memoised like :meth:`collect`."""
        memo_key = (_fingerprint(model), tuple(sorted(convs.items())))
        if self._conv_memo is not None and self._conv_memo[0] == memo_key:  # same graph, same request: reuse
            return self._conv_memo[1]
        names = sorted({tensor for tensor, _ in convs.values()})
        grams: dict[str, np.ndarray] = {}
        for outputs in self._run(model, names, progress):
            for key, (tensor, geometry) in convs.items():
                g = patch_gram(outputs[tensor], geometry)
                grams[key] = g if key not in grams else grams[key] + g
        self._conv_memo = (memo_key, grams)
        return grams

    def _run(self, model: ir.Model, names: list[str], progress: bool) -> Iterator[dict[str, np.ndarray]]:
        """Run ``model`` (unchanged) on every sample with the named tensors exposed; yields each sample's outputs."""
        from bitfold.backends import compile
        from bitfold.frontend.onnx_io import clone

        probe = clone(model)
        values = {out.name: out for node in ir.traversal.RecursiveGraphIterator(probe.graph) for out in node.outputs}
        values.update({v.name: v for v in probe.graph.inputs})
        exposed = {v.name for v in probe.graph.outputs}
        for name in names:
            if name not in values:
                raise BitfoldError(f"calibration asked for tensor '{name}', which the model does not compute.")
            if name not in exposed:
                probe.graph.outputs.append(values[name])
        runnable = compile(probe, "ort", "cpu")
        samples = list(self)
        if not samples:
            raise BitfoldError(f"calibration source '{self.name}' yields no samples.")
        for feeds in tqdm(samples, desc="calibrate", disable=not progress, leave=False):
            yield runnable.run(feeds)


def _fingerprint(model: ir.Model) -> str:
    return hashlib.sha256(ir.to_proto(model).SerializeToString(deterministic=True)).hexdigest()


def _static_dim(model: ir.Model, input_name: str, axis: int, default: int | None = None) -> int:
    """The static size of an input's axis; ``default`` when the axis is symbolic (a KV-cache graph's sequence)."""
    for value in model.graph.inputs:
        if value.name == input_name and value.shape is not None and isinstance(value.shape[axis], int):
            return value.shape[axis]
        if value.name == input_name and default is not None:
            return default
    raise BitfoldError(f"built-in calibration needs a static '{input_name}' input; export it with fixed shapes.")
