"""Sparsity patterns hold exactly; SparseGPT equals direct OBS; the method ordering on a correlated layer."""

from __future__ import annotations

import numpy as np
import pytest
from models import correlated_layer, output_error

from bitfold.quant import sparse
from bitfold.quant.formats import format_from, granularity_from


@pytest.fixture(scope="module")
def layer():
    return correlated_layer(40, 200, 800)


@pytest.mark.parametrize("text", ["unstructured:0.5", "unstructured:0.7", "nm:2:4", "nm:4:8", "nm:1:3", "block:4x8:0.5", "block:3x5:0.3"])
@pytest.mark.parametrize("shape", [(40, 200), (7, 13)])
def test_patterns_hold_exactly(text, shape):
    pattern = sparse.parse_pattern(text)
    score = np.random.default_rng(1).random(shape)
    for per_row in (False, True):
        keep = sparse.select(score, pattern, per_row=per_row)
        _check(keep, pattern, per_row)


def _check(keep, pattern, per_row):
    n, k = keep.shape
    if isinstance(pattern, sparse.NM):
        for start in range(0, k, pattern.m):
            assert (keep[:, start : start + pattern.m].sum(axis=1) <= pattern.n).all()
            assert (keep[:, start : start + pattern.m].sum(axis=1) >= min(pattern.n, k - start) - max(0, pattern.m - (k - start))).all()
    elif isinstance(pattern, sparse.Block):
        r, c = pattern.rows, pattern.cols
        tiles = [keep[i : i + r, j : j + c] for i in range(0, n, r) for j in range(0, k, c)]
        assert all(t.all() or not t.any() for t in tiles)
        assert sum(not t.any() for t in tiles) == round(pattern.ratio * len(tiles))
    elif per_row:
        assert ((~keep).sum(axis=1) == round(pattern.ratio * k)).all()
    else:
        assert (~keep).sum() == round(pattern.ratio * keep.size)


def test_bad_patterns_say_the_form():
    for text in ("unstructured:1.5", "nm:4:2", "block:0x4:0.5", "half"):
        with pytest.raises(ValueError, match="pattern"):
            sparse.parse_pattern(text)


@pytest.mark.parametrize("text", ["unstructured:0.5", "unstructured:0.7", "nm:2:4", "block:4x8:0.5"])
def test_sparsegpt_holds_the_pattern_and_its_zeros(layer, text):
    w, _, h = layer
    pattern = sparse.parse_pattern(text)
    q, keep = sparse.sparsegpt(w, h, pattern, block=64)
    _check(keep, pattern, per_row=False)
    assert (q[~keep] == 0).all() and (q[keep] != 0).all()


def test_sparsegpt_equals_direct_obs_for_its_mask(layer):
    w, _, h = layer
    w, h = w[:6, :24], h[:24, :24]
    q, keep = sparse.sparsegpt(w, h, sparse.Unstructured(0.5), block=8, damp=0.01)
    hd = h + np.eye(24) * 0.01 * np.mean(np.diag(h))
    direct = w.copy()
    for row, mask in zip(direct, keep, strict=True):
        hinv = np.linalg.inv(hd)
        for j in range(24):  # OBS: remove weight j optimally, then fix column j for the rest
            if not mask[j]:
                row -= row[j] / hinv[j, j] * hinv[j]
            hinv = hinv - np.outer(hinv[:, j], hinv[j]) / hinv[j, j]
    np.testing.assert_allclose(q, direct, atol=1e-5 * np.abs(w).max())


@pytest.mark.parametrize("text", ["unstructured:0.5", "nm:2:4", "unstructured:0.7"])
def test_sparsegpt_beats_wanda_beats_magnitude(layer, text):
    w, x, h = layer
    pattern = sparse.parse_pattern(text)
    magnitude = w * sparse.select(sparse.scores(w, None, "magnitude"), pattern, per_row=False)
    wanda = w * sparse.select(sparse.scores(w, h, "wanda"), pattern, per_row=True)
    gpt, _ = sparse.sparsegpt(w, h, pattern)
    assert output_error(w, gpt, x) < output_error(w, wanda, x) < output_error(w, magnitude, x)


def test_joint_quantization_keeps_the_mask_and_the_grid(layer):
    w, x, h = layer
    fmt = format_from("int4")
    q, keep = sparse.sparsegpt(w, h, sparse.NM(2, 4), fmt=fmt, granularity=granularity_from(-1))
    assert (q[~keep] == 0).all()
    assert all(len(np.unique(np.round(row, 7))) <= 16 for row in q)  # int4 per channel: at most 16 levels a row
    assert output_error(w, q, x) < 0.6


def test_dense_and_sparse_keeps_outliers_and_beats_plain_gptq(layer):
    from bitfold.quant.gptq import gptq

    w, x, h = layer
    w = w.copy()
    w[np.random.default_rng(3).random(w.shape) < 0.005] *= 20  # heavy-tailed weights
    fmt, gran = format_from("int3"), granularity_from(64)
    q, outliers, _ = sparse.dense_and_sparse(w, h, fmt, gran, 0.005)
    assert outliers.sum() == round(0.005 * w.size)
    np.testing.assert_array_equal(q[outliers], q[outliers].astype(np.float16))  # float16, after GPTQ's updates
    plain, _, _ = gptq(w, h, fmt, gran)
    assert output_error(w, q, x) < 0.7 * output_error(w, plain, x)


def test_refine_swaps_keep_counts_and_never_raise_the_layer_error(layer):
    w, x, h = layer
    pattern = sparse.Unstructured(0.6)
    for method in ("magnitude", "wanda"):
        keep = sparse.select(sparse.scores(w, h, method), pattern, per_row=method == "wanda")
        refined = sparse.refine(w, keep, h, 40)
        np.testing.assert_array_equal(refined.sum(axis=1), keep.sum(axis=1))
        rows_before = np.einsum("nk,kl,nl->n", w * ~keep, h, w * ~keep)
        rows_after = np.einsum("nk,kl,nl->n", w * ~refined, h, w * ~refined)
        assert (rows_after <= rows_before * (1 + 1e-9)).all() and output_error(w, w * refined, x) < 0.95 * output_error(w, w * keep, x)
