from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import pytest

from bitfold.quant.formats import (
    NF4_LEVELS,
    FloatFormat,
    IntFormat,
    PerChannel,
    PerGroup,
    PerTensor,
    fake_quantize,
    from_groups,
    granularity_from,
    quantize,
)

GRANULARITIES = [PerTensor(), PerChannel(), PerGroup(32), PerGroup(48)]


def _reference_int(w, bits, symmetric, granularity):
    """Element-by-element reference: loop over scale groups, plain Python arithmetic."""
    n, k = w.shape
    out = np.empty_like(w)
    if isinstance(granularity, PerTensor):
        groups = [(slice(None), slice(None))]
    elif isinstance(granularity, PerChannel):
        groups = [(r, slice(None)) for r in range(n)]
    else:
        groups = [(r, slice(c, c + granularity.size)) for r in range(n) for c in range(0, k, granularity.size)]
    for rows, cols in groups:
        block = w[rows, cols]
        lo, hi = min(float(block.min()), 0.0), max(float(block.max()), 0.0)
        if symmetric:
            qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
            extreme = lo if -lo >= hi else hi
            scale = extreme / qmin or 1.0
            zero = 0.0
        else:
            qmin, qmax = 0, 2**bits - 1
            scale = (hi - lo) / qmax or 1.0
            zero = min(max(round(-lo / scale), 0), qmax)
        q = np.clip(np.round(block / np.float32(scale)) + zero, qmin, qmax)
        out[rows, cols] = (q - zero) * np.float32(scale)
    return out


@pytest.mark.parametrize("bits, symmetric, granularity", list(itertools.product([8, 4, 3, 2], [True, False], GRANULARITIES)))
def test_integer_round_trip_matches_reference_and_error_bound(bits, symmetric, granularity):
    rng = np.random.default_rng(bits)
    w = (rng.standard_normal((6, 96)) * rng.uniform(0.1, 3, (6, 1))).astype(np.float32)
    got = fake_quantize(w, IntFormat(bits, symmetric), granularity)
    np.testing.assert_allclose(got, _reference_int(w, bits, symmetric, granularity), rtol=0, atol=1e-6)
    qt = quantize(w, IntFormat(bits, symmetric), granularity)
    fmt = IntFormat(bits, symmetric)
    assert qt.codes.min() >= fmt.qmin and qt.codes.max() <= fmt.qmax
    step = from_groups(np.broadcast_to(qt.scale, qt.codes.shape), w.shape)
    # half a step inside the grid; symmetric codes may clip the side opposite the extreme by less than one step
    bound = np.abs(step) * (1.0 if symmetric else 0.5) * (1 + 1e-5)
    assert np.all(np.abs(got - w) <= bound)


def test_finer_granularity_and_more_bits_lose_less():
    w = np.random.default_rng(0).standard_normal((32, 256)).astype(np.float32) * np.linspace(0.1, 4, 256)
    err = lambda fmt, g: float(((fake_quantize(w, fmt, g) - w) ** 2).mean())  # noqa: E731
    assert err(IntFormat(4), PerGroup(32)) < err(IntFormat(4), PerChannel()) < err(IntFormat(4), PerTensor())
    assert err(IntFormat(8), PerChannel()) < err(IntFormat(4), PerChannel()) < err(IntFormat(3), PerChannel()) < err(IntFormat(2), PerChannel())


def test_clip_search_never_increases_error():
    w = np.random.default_rng(1).standard_t(2, (16, 128)).astype(np.float32)  # heavy tails: clipping helps
    for bits in (2, 3, 4):
        plain = ((fake_quantize(w, IntFormat(bits), PerGroup(32)) - w) ** 2).sum(axis=1)
        clipped = ((fake_quantize(w, IntFormat(bits), PerGroup(32), clip=True) - w) ** 2).sum(axis=1)
        assert np.all(clipped <= plain + 1e-9) and clipped.sum() < plain.sum()


@pytest.mark.parametrize("kind, dtype", [("fp8-e4m3", ml_dtypes.float8_e4m3fn), ("fp8-e5m2", ml_dtypes.float8_e5m2), ("fp4-e2m1", ml_dtypes.float4_e2m1fn)])
def test_float_formats_match_ml_dtypes_cast(kind, dtype):
    w = np.random.default_rng(2).standard_normal((8, 64)).astype(np.float32)
    fmt = FloatFormat(kind)
    qt = quantize(w, fmt, PerChannel())
    scale = np.abs(w).max(axis=1, keepdims=True) / float(ml_dtypes.finfo(dtype).max)
    expected = (w / scale).astype(dtype).astype(np.float32) * scale
    np.testing.assert_allclose(qt.dequantize(), expected, rtol=1e-6, atol=1e-7)
    assert qt.codes.dtype == dtype


def test_nf4_picks_the_nearest_level_and_keeps_absmax():
    w = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    got = fake_quantize(w, FloatFormat("nf4"), PerChannel())
    absmax = np.abs(w).max(axis=1, keepdims=True)
    levels = NF4_LEVELS[None, None, :] * absmax[..., None]
    expected = np.take_along_axis(levels, np.abs(w[..., None] - levels).argmin(-1)[..., None], -1)[..., 0]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    np.testing.assert_allclose(np.abs(got).max(axis=1), absmax[:, 0], rtol=1e-6)


def test_granularity_from_recipe_convention():
    assert granularity_from(-1) == PerChannel() and granularity_from(0) == PerTensor()
    assert granularity_from(128) == PerGroup(128)
    with pytest.raises(ValueError):
        IntFormat(5)
