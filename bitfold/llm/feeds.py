"""Feeds for decoder graphs, cached or not: the one place that knows the KV-cache input names.

``prefill(model, ids)`` gives a graph what a prefill with an empty past needs: ``input_ids``, an all-ones
``attention_mask``, and, where the graph has them, ``position_ids`` and zero-length ``past_key_values.*``. An
uncached graph (``input_ids``, ``attention_mask`` → ``logits``) gets the first two only, so every task and
calibration source serves both kinds of graph.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bitfold.frontend.inputs import PAST_KEY_VALUES as PAST


def is_cached(model: ir.Model) -> bool:
    return any(PAST.match(v.name or "") for v in model.graph.inputs)


def past_inputs(model: ir.Model) -> list[ir.Value]:
    return [v for v in model.graph.inputs if PAST.match(v.name or "")]


def empty_past(model: ir.Model, batch: int = 1) -> dict[str, np.ndarray]:
    """Zero-length past keys and values for every ``past_key_values.*`` input."""
    feeds = {}
    for value in past_inputs(model):
        dims = [d if isinstance(d, int) else 0 for d in value.shape]
        dims[0] = batch
        feeds[value.name] = np.zeros(dims, dtype=value.dtype.numpy())
    return feeds


def prefill(model: ir.Model, ids: np.ndarray, mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Feeds for one forward over ``ids`` [B, S] from an empty cache (or of an uncached graph)."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim == 1:
        ids = ids[None]
    mask = np.ones_like(ids) if mask is None else np.asarray(mask, dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": mask}
    names = {v.name for v in model.graph.inputs}
    if "position_ids" in names:
        feeds["position_ids"] = positions(mask)
    feeds.update(empty_past(model, ids.shape[0]))
    return feeds


def positions(mask: np.ndarray, new: int | None = None) -> np.ndarray:
    """Position ids from an attention mask (left padding skipped): the last ``new`` columns of cumsum − 1."""
    pos = np.maximum(np.cumsum(mask, axis=-1) - 1, 0).astype(np.int64)
    return pos if new is None else pos[:, -new:]
