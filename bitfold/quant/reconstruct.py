"""Learned block reconstruction of quantized weights (integer grids, powers of two, sign planes, ternary, binary codes), in torch.

A block of a graph (a :class:`~bitfold.quant.torch_graph.TorchGraph` whose target weights are fed as inputs) is
trained so that its output with quantized weights matches the full-precision block's output on calibration data.
Each weight gets a quantizer (:class:`IntQuantizer`, :class:`ShiftQuantizer`, :class:`BinaryQuantizer` (sign planes,
PB-LLM's salient int8 weights), :class:`TernaryQuantizer`, :class:`BCQQuantizer`) whose free parameters are learned in two phases; for integer grids:

1. **Clipping** (OmniQuant's learnable weight clipping): a ratio per scale group shrinks the group's range,
   ``lo' = r_lo·lo``, ``hi' = r_hi·hi`` (one ratio for symmetric grids), and the scale and zero point follow the
   format's own rule (:meth:`bitfold.quant.formats.IntFormat.params`). Rounding is to nearest, its gradient passed
   straight through; ratios are kept in [``min_ratio``, 1]. Started from a solver's solution (GPTQ's), the codes
   stay the solver's and the phase learns a gain on each group's scale instead.
2. **Rounding** (AdaRound): with the scale and zero point fixed, each weight's code is ``floor(w/s + z) + h``
   with ``h = clamp(1.2·σ(v) − 0.1, 0, 1)`` relaxed between rounding down and up; ``v`` starts where ``h`` equals
   the fractional part (the soft weight is then the weight itself), or leaning toward the solver's code, and a
   regulariser ``1 − |2h − 1|^β``, β annealed from 20 to 2 and weighed in units of the loss the phase starts
   from, pushes every ``h`` to 0 or 1. The result is the hard rounding ``h = [v ≥ 0]``.

3. **End to end** (optional, EfficientQAT's end-to-end training of the quantization parameters): with every
   block's codes frozen, a factor on each scale group's scale learns against the full-precision model's output
   over all blocks at once (:func:`tune_scales`; KL divergence of the next-token distributions for a language
   model), which corrects what no block sees alone: errors that compound across blocks.
4. **Distillation** (optional, with phase 3): the codes themselves learn too, as latent values whose grid value is
   taken with a straight-through gradient (the sign of a latent weight for sign planes, the rounded latent code for
   integer grids: BinaryBERT's and BitNet's training of the quantized weights), and each block's output can be
   matched in direction to the full-precision model's (BiBERT's direction matching, per token).

The loss of phases 1 and 2 is the block output's mean squared error relative to the target's mean square. A phase
that ends with a larger loss on the calibration samples than it started with is undone, so a block never ends worse
than its start (round to nearest, or the solver's solution). Everything is seeded: the order in which samples are visited comes
from ``seed`` and torch's CPU kernels are deterministic.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from bitfold.quant.formats import Granularity, IntFormat, from_groups, to_groups

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid: h reaches 0 and 1 exactly


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class _Rounding(torch.nn.Module):
    """AdaRound's relaxed rounding ``h = clamp(1.2·σ(v) − 0.1, 0, 1)`` over logits ``v`` (hard: ``[v ≥ 0]``), shared by
    the quantizers that choose between two neighbouring levels."""

    v: torch.nn.Parameter | None
    hard: bool
    fixed: tuple[torch.Tensor, torch.Tensor] | None  # (scale, zero point or kept mask) once the rounding phase starts
    frozen: torch.Tensor | None
    tune: torch.nn.Parameter | None
    latent: torch.nn.Parameter | None  # offsets on the frozen grid values, from :meth:`start_latent` on

    @staticmethod
    def logits(frac: torch.Tensor) -> torch.nn.Parameter:
        """Logits whose soft ``h`` equals ``frac`` (the soft weight starts at the weight itself)."""
        frac = frac.clamp(1e-4, 1 - 1e-4)
        return torch.nn.Parameter(-torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1))

    def _h(self) -> torch.Tensor:
        assert self.v is not None
        if self.hard:
            return (self.v >= 0).to(self.v.dtype)
        return (torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def regulariser(self, beta: float) -> torch.Tensor:
        """Mean of ``1 − |2h − 1|^β`` over the weights: 0 when every rounding is decided."""
        return (1 - (2 * self._h() - 1).abs().pow(beta)).mean()

    def undecided(self) -> float:
        """Fraction of soft roundings still more than 0.1 away from 0 or 1."""
        h = self._h()
        return float(((h > 0.1) & (h < 0.9)).float().mean())

    def grid_values(self) -> torch.Tensor:
        """The values on the grid that the scales multiply (integer codes, powers of two)."""
        raise NotImplementedError

    def start_tuning(self) -> list[torch.nn.Parameter]:
        """Freeze the hard grid values; from here on only a factor on each scale (group or output) learns. Returns
        the factors' logarithms."""
        self.hard = True
        with torch.no_grad():
            frozen = self.grid_values().detach().clone()
        self.frozen = frozen
        self.tune = torch.nn.Parameter(torch.zeros_like(self.fixed[0]))
        return [self.tune]

    def start_latent(self) -> list[torch.nn.Parameter]:
        """After :meth:`start_tuning`: learn an offset on every frozen grid value too, the grid taken from the offset
        value with a straight-through gradient (distillation of the codes themselves). Returns the offsets."""
        raise NotImplementedError(f"{type(self).__name__} has no latent weights")

    def bound_latent(self) -> None:
        """Called after every step on the latent values (a no-op unless the grid has ends to stay within)."""


class IntQuantizer(_Rounding):
    """Learnable quantizer of one weight Wᵀ (N, K) on ``fmt``'s grid with ``granularity``'s scale groups."""

    start_logit = 1.5  # |v| where rounding starts from a solver's codes (h = 0.88 toward its code)

    def __init__(
        self, wt: np.ndarray, fmt: IntFormat, granularity: Granularity, *, min_ratio: float = 0.5,
        start: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    ) -> None:  # fmt: skip
        """``start``: a solver's (dequantized Wᵀ, scale, zero point) per element, e.g. GPTQ's. Its codes are kept
        while the first phase learns a gain on each group's scale (no clipping: the solver chose its range); the
        rounding phase then chooses, per weight, between the solver's code and its neighbour toward w/s + z,
        starting from the solver's."""
        super().__init__()
        self.fmt, self.shape, self.min_ratio = fmt, tuple(wt.shape), min_ratio
        group = lambda a: torch.from_numpy(to_groups(np.asarray(a, np.float32), granularity).copy())  # noqa: E731
        blocks = group(wt)
        self.register_buffer("w", blocks)
        self.register_buffer("lo", blocks.amin(-1, keepdim=True))
        self.register_buffer("hi", blocks.amax(-1, keepdim=True))
        self.v: torch.nn.Parameter | None = None  # rounding logits, from :meth:`start_rounding` on
        self.fixed: tuple[torch.Tensor, torch.Tensor] | None = None
        self.hard = False
        self.start: torch.Tensor | None = None  # the solver's codes
        self.gain: torch.nn.Parameter | None = None  # log of the learned factor on the solver's scales
        self.frozen: torch.Tensor | None = None  # the hard codes, from :meth:`start_tuning` on
        self.tune: torch.nn.Parameter | None = None  # log of the end-to-end factor on the fixed scales
        self.latent: torch.nn.Parameter | None = None
        if start is not None:
            q, scale, zero = (group(a) for a in start)
            scale, zero = scale[..., :1], zero[..., :1]
            scale = torch.where(scale != 0, scale, torch.ones_like(scale))
            self.register_buffer("start_scale", scale)
            self.register_buffer("start_zero", zero)
            self.start = torch.round(q / scale + zero).clamp(fmt.qmin, fmt.qmax)
            self.gain = torch.nn.Parameter(torch.zeros_like(scale))
        self.r_hi = torch.nn.Parameter(torch.ones_like(self.hi)) if start is None else None
        self.r_lo = torch.nn.Parameter(torch.ones_like(self.lo)) if start is None and not fmt.symmetric else None

    def clip_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in (self.r_hi, self.r_lo, self.gain) if p is not None]

    def scale_zero(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point per group, differentiable in the clipping ratios (as ``IntFormat.params``) or, from
        a solver's start, in the gain on its scales."""
        if self.fixed is not None:
            return self.fixed if self.tune is None else (self.fixed[0] * self.tune.exp(), self.fixed[1])
        if self.gain is not None:
            return self.start_scale * self.gain.exp(), self.start_zero
        fmt = self.fmt
        r_hi = self.r_hi.clamp(self.min_ratio, 1.0)
        r_lo = r_hi if self.r_lo is None else self.r_lo.clamp(self.min_ratio, 1.0)
        lo, hi = self.lo * r_lo, self.hi * r_hi
        if fmt.float_zero and not fmt.symmetric:
            scale = (hi - lo) / fmt.qmax
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            return safe, -lo / safe
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        if fmt.symmetric:
            scale = torch.where(-lo >= hi, lo, hi) / fmt.qmin
            zero = torch.zeros_like(scale)
        else:
            scale = (hi - lo) / fmt.qmax
            zero = _round_ste(-lo / torch.where(scale > 0, scale, torch.ones_like(scale))).clamp(0, fmt.qmax)
        return torch.where(scale != 0, scale, torch.ones_like(scale)), zero

    def start_rounding(self) -> None:
        """Fix the scale and zero point where the clipping left them; learn the rounding from here."""
        with torch.no_grad():
            scale, zero = (t.detach().clone() for t in self.scale_zero())
            self.fixed = (scale, zero)
            x = self.w / scale + zero
            if self.start is not None:  # h = 1 picks the solver's code where the neighbour lies below it
                up = (self.start > x).to(x.dtype)
                self.register_buffer("base", self.start - up)
                self.v = torch.nn.Parameter(torch.where(up > 0, self.start_logit, -self.start_logit) * torch.ones_like(x))
                return
            self.v = self.logits(x - torch.floor(x))

    def grid_values(self) -> torch.Tensor:
        return self.codes()

    def start_latent(self) -> list[torch.nn.Parameter]:
        assert self.frozen is not None, "start_tuning first"
        self.latent = torch.nn.Parameter(torch.zeros_like(self.frozen))
        return [self.latent]

    def bound_latent(self) -> None:
        """Keep each latent code within half a step of the grid: a code clamped at the grid's end gets no gradient,
        so momentum alone would carry it further out, where it could never come back."""
        if self.latent is not None:
            with torch.no_grad():
                code = (self.frozen + self.latent).clamp(self.fmt.qmin - 0.5, self.fmt.qmax + 0.5)
                self.latent.copy_(code - self.frozen)

    def codes(self) -> torch.Tensor:
        if self.frozen is not None:
            if self.latent is None:
                return self.frozen
            return _round_ste(self.frozen + self.latent).clamp(self.fmt.qmin, self.fmt.qmax)
        scale, zero = self.scale_zero()
        x = self.w / scale + zero
        if self.v is None:
            return _round_ste(x).clamp(self.fmt.qmin, self.fmt.qmax) if self.start is None else self.start
        base = torch.floor(x) if self.start is None else self.base
        return (base + self._h()).clamp(self.fmt.qmin, self.fmt.qmax)

    def forward(self) -> torch.Tensor:
        """The dequantized weight Wᵀ (N, K)."""
        scale, zero = self.scale_zero()
        n, k = self.shape
        return ((self.codes() - zero) * scale).reshape(n, -1)[:, :k]

    def export(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(dequantized Wᵀ, per-element scale, per-element zero point), hard rounding, float32 numpy."""
        with torch.no_grad():
            scale, zero = self.scale_zero()
            codes = self.codes()
            expand = lambda t: from_groups(np.broadcast_to(t.numpy(), codes.shape), self.shape).astype(np.float32)  # noqa: E731
            q = self.fmt.dequantize(from_groups(codes.numpy(), self.shape), expand(scale), expand(zero))
            return q, expand(scale), expand(zero)


class ShiftQuantizer(_Rounding):
    """Learnable power-of-two quantizer of one weight Wᵀ (N, K) (``bitfold.quant.shift``'s grid): each weight is
    s_n · ±2^(−e), e ∈ [0, e_max], or 0 when ``zero`` and |w| / s_n is below half the smallest level.

    The scale phase learns log s_n per output (starting at the shift solver's least-squares scale; exponents rounded
    to nearest in the log domain, gradient passed straight through). The rounding phase fixes s and the zeros and
    learns, per weight, the choice between the two exponents around −log2(|w| / s): a soft exponent ``floor + h``
    with AdaRound's ``h``, so the soft weight moves along the log scale between the two levels.
    """

    def __init__(self, wt: np.ndarray, bits: int, zero: bool) -> None:
        super().__init__()
        from bitfold.quant.shift import exponent_range, row_scales

        self.bits, self.zero, self.shape = bits, zero, tuple(wt.shape)
        self.e_max = exponent_range(bits, zero)
        w = np.asarray(wt, np.float64)
        self.register_buffer("sign", torch.from_numpy(np.where(w < 0, -1.0, 1.0).astype(np.float32)))
        self.register_buffer("a", torch.from_numpy(np.abs(w).astype(np.float32)))
        self.log_s = torch.nn.Parameter(torch.from_numpy(np.log(row_scales(w, bits, zero)).astype(np.float32))[:, None])
        self.v: torch.nn.Parameter | None = None
        self.fixed: tuple[torch.Tensor, torch.Tensor] | None = None  # (scale, kept) once the rounding phase starts
        self.hard = False
        self.frozen: torch.Tensor | None = None  # the hard powers of two, from :meth:`start_tuning` on
        self.tune: torch.nn.Parameter | None = None  # log of the end-to-end factor on the fixed scales
        self.latent: torch.nn.Parameter | None = None

    def clip_parameters(self) -> list[torch.nn.Parameter]:
        return [self.log_s]

    def _scale_kept(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fixed is not None:
            return self.fixed if self.tune is None else (self.fixed[0] * self.tune.exp(), self.fixed[1])
        s = self.log_s.exp()
        kept = (self.a / s.detach() >= 2.0 ** (-self.e_max - 1)) if self.zero else torch.ones_like(self.a, dtype=torch.bool)
        return s, kept

    def _exponent(self, s: torch.Tensor) -> torch.Tensor:
        return -torch.log2((self.a / s).clamp_min(1e-30))

    def start_rounding(self) -> None:
        with torch.no_grad():
            s, kept = (t.detach().clone() for t in self._scale_kept())
            self.fixed = (s, kept)
            e = self._exponent(s).clamp(0, self.e_max)
            self.v = self.logits(e - torch.floor(e))

    def grid_values(self) -> torch.Tensor:
        return self.units()

    def units(self) -> torch.Tensor:
        """The signed powers of two (or 0) U, (N, K)."""
        if self.frozen is not None:
            return self.frozen
        s, kept = self._scale_kept()
        e = self._exponent(s).clamp(0, self.e_max)
        if self.v is None:
            e = _round_ste(e)
        else:
            e = (torch.floor(e.detach()) + self._h()).clamp(0, self.e_max)
        return self.sign * torch.exp2(-e) * kept

    def forward(self) -> torch.Tensor:
        return self._scale_kept()[0] * self.units()

    def export(self) -> tuple[np.ndarray, np.ndarray]:
        """(U (N, K) signed powers of two or 0, s (N,)), hard rounding, float64 numpy."""
        with torch.no_grad():
            return self.units().double().numpy(), self._scale_kept()[0][:, 0].double().numpy()


def _sign_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.where(x >= 0, 1.0, -1.0) - x).detach()


class BinaryQuantizer(torch.nn.Module):
    """Learnable binary quantizer of one weight Wᵀ (N, K) (``bitfold.quant.binary``'s grid): W ≈ μ + Σ_i α_i ⊙ B_i
    per output, ``planes`` sign planes (the second binarizes the first's residual), μ the row mean with ``center``.
    With a ``salient`` mask (N, K) it is PB-LLM's grid: the masked weights are int8 codes on a scale per output
    (max |w| / 127 over the row's masked weights) and α fits the others; the mask stays as given.

    The scale phase learns log α (and μ, in units of the row's first α, with ``center``) from the solver's
    least-squares values, the signs fixed by the weights. The rounding phase learns latent weights W + δ·ᾱ (ᾱ the
    row's first α, δ from 0) whose signs (and the masked weights' int8 codes) are taken with a straight-through
    gradient, α and μ still learning: the sign flips that lower the block's error.
    """

    scale_with_rounding = True

    def __init__(self, wt: np.ndarray, planes: int, center: bool, salient: np.ndarray | None = None) -> None:
        super().__init__()
        from bitfold.quant import bcq

        w = np.asarray(wt, np.float64)
        self.planes, self.center, self.shape = planes, center, tuple(w.shape)
        mean = w.mean(axis=1) if center else np.zeros(len(w))
        if salient is not None:
            if planes != 1:
                raise ValueError("salient weights combine with one sign plane (PB-LLM)")
            salient = np.asarray(salient, bool)
            rest = ~salient
            alpha = ((np.abs(w - mean[:, None]) * rest).sum(axis=1) / np.maximum(rest.sum(axis=1), 1))[:, None]
            top = np.abs(np.where(salient, w, 0.0)).max(axis=1)
            self.register_buffer("mask", torch.from_numpy(salient))
            self.register_buffer("salient_scale", torch.from_numpy(np.where(top > 0, top / 127.0, 1.0).astype(np.float32))[:, None])
        else:
            alpha = bcq.fit(w - mean[:, None], planes)  # (N, r)
            self.mask: torch.Tensor | None = None
        alpha = np.maximum(alpha, 1e-12)
        self.register_buffer("w", torch.from_numpy(w.astype(np.float32)))
        self.register_buffer("mean0", torch.from_numpy(mean.astype(np.float32))[:, None])
        self.register_buffer("unit", torch.from_numpy(alpha[:, :1].astype(np.float32)))
        self.log_alpha = torch.nn.Parameter(torch.from_numpy(np.log(alpha).astype(np.float32)))
        self.shift = torch.nn.Parameter(torch.zeros_like(self.mean0)) if center else None
        self.v: torch.nn.Parameter | None = None  # δ, the latent weights' offset in units of ᾱ
        self.hard = False
        self.frozen: list[torch.Tensor] | None = None  # the sign planes (and salient codes), from :meth:`start_tuning` on

    def clip_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in (self.log_alpha, self.shift) if p is not None]

    def start_tuning(self) -> list[torch.nn.Parameter]:
        """Freeze the sign planes (and the salient codes); from here on α (and μ) learn. Returns them."""
        with torch.no_grad():
            frozen = [b.detach().clone() for b in self.signs()]
            if self.mask is not None:
                frozen.append(self.codes().detach().clone())
        self.frozen = frozen
        return self.clip_parameters()

    def start_latent(self) -> list[torch.nn.Parameter]:
        """After :meth:`start_tuning`: the signs follow the latent weights again (straight-through), which learn
        from where the rounding phase left them. Returns their offset δ."""
        self.frozen = None
        if self.v is None:
            self.v = torch.nn.Parameter(torch.zeros_like(self.w))
        return [self.v]

    def bound_latent(self) -> None:
        """Nothing to keep in range: any latent value has a sign (and the int8 codes' range is the row's)."""

    def start_rounding(self) -> None:
        self.v = torch.nn.Parameter(torch.zeros_like(self.w))

    def _mean(self) -> torch.Tensor:
        return self.mean0 if self.shift is None else self.mean0 + self.shift * self.unit

    def _latent(self) -> torch.Tensor:
        return self.w if self.v is None else self.w + self.v * self.unit

    def signs(self) -> list[torch.Tensor]:
        if self.frozen is not None:
            return list(self.frozen[: self.planes])
        r, alpha = self._latent() - self._mean(), self.log_alpha.exp()
        out = []
        for i in range(self.planes):
            b = _sign_ste(r)
            out.append(b)
            r = r - alpha[:, i : i + 1] * b
        return out

    def codes(self) -> torch.Tensor:
        """The salient weights' int8 codes (N, K) (read where the mask is set)."""
        assert self.mask is not None
        if self.frozen is not None:
            return self.frozen[-1]
        return _round_ste(self._latent() / self.salient_scale).clamp(-127, 127)

    def regulariser(self, beta: float) -> torch.Tensor:
        return torch.zeros(())  # signs are hard throughout

    def undecided(self) -> float:
        return 0.0

    def forward(self) -> torch.Tensor:
        alpha = self.log_alpha.exp()
        out = self._mean() + sum(alpha[:, i : i + 1] * b for i, b in enumerate(self.signs()))
        if self.mask is None:
            return out
        return torch.where(self.mask, self.codes() * self.salient_scale, out)

    def export(self) -> tuple[np.ndarray | None, ...]:
        """(signs (r, N, K) in ±1, α (r, N), μ (N,), salient mask (N, K), int8 codes (N, K), their scale (N,)), float64
        numpy; the last three None without salient weights."""
        with torch.no_grad():
            signs = torch.stack(self.signs()).double().numpy()
            found = (signs, self.log_alpha.exp().T.double().numpy(), self._mean()[:, 0].double().numpy())
            if self.mask is None:
                return (*found, None, None, None)
            return (*found, self.mask.numpy().copy(), self.codes().double().numpy(), self.salient_scale[:, 0].double().numpy())


class TernaryQuantizer(torch.nn.Module):
    """Learnable ternary quantizer of one weight Wᵀ (N, K) (BitNet b1.58's grid with a scale per output,
    ``bitfold.quant.binary.ternarize(per_channel=True)``): W ≈ γ_n · T, T ∈ {−1, 0, +1}.

    Starts at the absmean solver (γ = mean |w| of the row, T = clip(round(W / γ), −1, 1)). The scale phase learns
    log γ, T following round(W / γ) with a straight-through gradient (LSQ's step-size gradient: the rounding error
    inside the grid, ±1 at its ends). The rounding phase learns latent weights W + δ·γ₀ (δ from 0) whose trits are
    taken straight-through, γ still learning: which weights are 0 and which ±1.
    """

    scale_with_rounding = True

    def __init__(self, wt: np.ndarray) -> None:
        super().__init__()
        w = np.asarray(wt, np.float64)
        self.shape = tuple(w.shape)
        gamma = np.abs(w).mean(axis=1)
        gamma = np.where(gamma > 0, gamma, 1.0)[:, None]
        self.register_buffer("w", torch.from_numpy(w.astype(np.float32)))
        self.register_buffer("unit", torch.from_numpy(gamma.astype(np.float32)))
        self.log_gamma = torch.nn.Parameter(torch.from_numpy(np.log(gamma).astype(np.float32)))
        self.v: torch.nn.Parameter | None = None  # δ, the latent weights' offset in units of γ₀
        self.hard = False
        self.frozen: torch.Tensor | None = None  # the trits, from :meth:`start_tuning` on

    def clip_parameters(self) -> list[torch.nn.Parameter]:
        return [self.log_gamma]

    def start_rounding(self) -> None:
        self.v = torch.nn.Parameter(torch.zeros_like(self.w))

    def start_tuning(self) -> list[torch.nn.Parameter]:
        """Freeze the trits; from here on γ learns. Returns its logarithm."""
        with torch.no_grad():
            self.frozen = self.trits().detach().clone()
        return [self.log_gamma]

    def start_latent(self) -> list[torch.nn.Parameter]:
        """After :meth:`start_tuning`: the trits follow the latent weights again (straight-through). Returns δ."""
        self.frozen = None
        if self.v is None:
            self.v = torch.nn.Parameter(torch.zeros_like(self.w))
        return [self.v]

    def bound_latent(self) -> None:
        """Keep each latent weight within half a step beyond ±γ: past the grid's ends it gets no gradient, and
        momentum alone would carry it further out, where it could never come back."""
        if self.v is not None:
            with torch.no_grad():
                gamma = self.log_gamma.exp()
                latent = (self.w + self.v * self.unit).clamp(-1.5 * gamma, 1.5 * gamma)
                self.v.copy_((latent - self.w) / self.unit)

    def trits(self) -> torch.Tensor:
        if self.frozen is not None:
            return self.frozen
        latent = self.w if self.v is None else self.w + self.v * self.unit
        return _round_ste(latent / self.log_gamma.exp()).clamp(-1.0, 1.0)

    def grid_values(self) -> torch.Tensor:
        return self.trits()

    def regulariser(self, beta: float) -> torch.Tensor:
        return torch.zeros(())  # trits are hard throughout

    def undecided(self) -> float:
        return 0.0

    def forward(self) -> torch.Tensor:
        return self.log_gamma.exp() * self.trits()

    def export(self) -> tuple[np.ndarray, np.ndarray]:
        """(trits (N, K) in {−1, 0, +1}, γ (N,)), float64 numpy."""
        with torch.no_grad():
            return self.trits().double().numpy(), self.log_gamma.exp()[:, 0].double().numpy()


def _pow2_sum(a: torch.Tensor, terms: int) -> torch.Tensor:
    """``a`` (> 0) as ``bitfold.quant.bcq.pow2_sum`` rounds it, then stored as float16 (what ``bitfold.BCQMatMul``
    keeps); the gradient passes straight through."""
    out = torch.zeros_like(a)
    for _ in range(terms):
        r = a.detach() - out
        p = torch.sign(r) * torch.exp2(torch.round(torch.log2(r.abs().clamp_min(1e-30))).clamp(-24, 15))
        out = out + torch.where(r != 0, p, torch.zeros_like(p))
    rounded = (out if terms else a.detach()).half().float()
    return a + (rounded - a).detach()


class BCQQuantizer(_Rounding):
    """Learnable binary-coding quantizer of one weight Wᵀ (N, K) (ShiftAddLLM's grid, ``bitfold.quant.bcq``): each
    weight is Σ_i α_i·b_i over ``q`` sign planes, α one value per plane, output and group of ``group`` inputs,
    rounded to a sum of ``alpha_terms`` powers of two and stored as float16 (0: float16 alone).

    Starts from a solver's signs and α (``start``: the ``shiftadd`` solver's, GPTQ rounding on the block's
    Hessians), or the solver without a Hessian. The scale phase learns log α with the signs fixed (rounded as
    stored in the forward pass, the gradient passed straight through). The rounding phase chooses, per weight,
    between its code and the neighbouring level (of the 2^q levels Σ ±α_i of its group) on the side of the
    float weight, relaxed with AdaRound's ``h`` and starting toward the solver's code; α keeps learning.
    """

    scale_with_rounding = True
    start_logit = 1.5  # |v| where rounding starts (h = 0.88 toward the solver's code)

    def __init__(self, wt: np.ndarray, q: int, group: int, alpha_terms: int,
                 start: tuple[np.ndarray, np.ndarray] | None = None) -> None:  # fmt: skip
        """``start``: (signs (q, N, K) in ±1, α (q, N, G)), G = ceil(K / group)."""
        super().__init__()
        from bitfold.quant import bcq

        w = np.asarray(wt, np.float64)
        self.q, self.group, self.terms, self.shape = q, group, alpha_terms, tuple(w.shape)
        signs, alpha = start if start is not None else bcq.bcq(w, None, q, group, alpha_terms=alpha_terms)
        signs, alpha = np.array(signs, np.float64), np.array(alpha, np.float64)
        flip = np.repeat(alpha < 0, group, axis=2)[:, :, : w.shape[1]]  # −α·b = α·(−b): every α positive
        signs[flip] *= -1
        alpha = np.maximum(np.abs(alpha), 2.0**-24)
        self.register_buffer("w", torch.from_numpy(w.astype(np.float32)))
        self.register_buffer("signs0", torch.from_numpy(signs.astype(np.float32)))
        self.log_alpha = torch.nn.Parameter(torch.from_numpy(np.log(alpha).astype(np.float32)))
        self.v: torch.nn.Parameter | None = None
        self.hard = False
        self.frozen: torch.Tensor | None = None  # the hard sign planes, from :meth:`start_tuning` on
        self.tune: torch.nn.Parameter | None = None  # log of the end-to-end factor on α
        self.latent: torch.nn.Parameter | None = None

    def clip_parameters(self) -> list[torch.nn.Parameter]:
        return [self.log_alpha]

    def alpha(self) -> torch.Tensor:
        """α (q, N, G) as stored."""
        log = self.log_alpha if self.tune is None else self.log_alpha.detach() + self.tune
        return _pow2_sum(log.exp(), self.terms)

    def _expand(self, alpha: torch.Tensor) -> torch.Tensor:
        return alpha.repeat_interleave(self.group, dim=-1)[..., : self.shape[1]]

    def start_rounding(self) -> None:
        """Pair every weight's code with the neighbouring level on the float weight's side."""
        from bitfold.quant.bcq import combinations

        with torch.no_grad():
            a = self._expand(self.alpha())  # (q, N, K)
            combos = torch.from_numpy(combinations(self.q).astype(np.float32))  # (C, q)
            levels = torch.einsum("cq,qnk->cnk", combos, a)
            code = (self.signs0 * a).sum(0)
            up = self.w > code
            gap = torch.where(up, levels - code, code - levels)  # > 0 on the weight's side
            gap = torch.where(gap > 1e-7 * a.sum(0), gap, torch.full_like(gap, torch.inf))
            best = gap.argmin(0)
            found = torch.isfinite(gap.amin(0))
            other = torch.where(found, combos[best].permute(2, 0, 1), self.signs0)
            self.register_buffer("low", torch.where(up, self.signs0, other))
            self.register_buffer("high", torch.where(up, other, self.signs0))
            self.v = torch.nn.Parameter(torch.where(up, -self.start_logit, self.start_logit) * torch.ones_like(code))

    def signs(self) -> torch.Tensor:
        """The sign planes (q, N, K); between two codes while the rounding is soft."""
        if self.frozen is not None:
            return self.frozen if self.latent is None else _sign_ste(self.frozen + self.latent)
        if self.v is None:
            return self.signs0
        return self.low + self._h() * (self.high - self.low)

    def grid_values(self) -> torch.Tensor:
        return self.signs()

    def start_tuning(self) -> list[torch.nn.Parameter]:
        """Freeze the sign planes; from here on a factor on every α learns. Returns its logarithm."""
        self.hard = True
        with torch.no_grad():
            self.frozen = self.signs().detach().clone()
        self.tune = torch.nn.Parameter(torch.zeros_like(self.log_alpha))
        return [self.tune]

    def start_latent(self) -> list[torch.nn.Parameter]:
        """After :meth:`start_tuning`: a latent value on every frozen sign (±1 plus an offset from 0), its sign
        taken straight-through. Returns the offsets."""
        assert self.frozen is not None, "start_tuning first"
        self.latent = torch.nn.Parameter(torch.zeros_like(self.frozen))
        return [self.latent]

    def forward(self) -> torch.Tensor:
        return (self._expand(self.alpha()) * self.signs()).sum(0)

    def export(self) -> tuple[np.ndarray, np.ndarray]:
        """(signs (q, N, K) in ±1, α (q, N, G)), hard rounding, float64 numpy."""
        with torch.no_grad():
            return self.signs().double().numpy(), self.alpha().double().numpy()


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Steps and learning rates of the two phases, and the rounding regulariser."""

    clip_steps: int = 100
    round_steps: int = 200
    clip_lr: float = 5e-3
    round_lr: float = 5e-2
    reg: float = 30.0  # in units of the block's error where the rounding phase starts
    warmup: float = 0.2  # fraction of the rounding steps without the regulariser
    seed: int = 0
    loss: str = "tensor"  # the squared error relative to the target's mean square over the tensor | each channel | each token


@dataclasses.dataclass
class BlockResult:
    loss_start: float  # relative output error with round-to-nearest weights
    loss_clip: float  # after learning the clipping
    loss_end: float  # with the final hard rounding
    undecided: float  # fraction of soft roundings not yet at 0 or 1 before hardening


def block_error(output: torch.Tensor, target: torch.Tensor, power: torch.Tensor | str) -> torch.Tensor:
    """The block's output error that :func:`train_block` minimises: the squared error over the target's mean square
    (``power``: :func:`_power`'s value, or the ``Schedule.loss`` it is taken over), averaged."""
    if isinstance(power, str):
        power = _power(target, power)
    return (((output - target) ** 2) / power).mean()


def train_block(
    run: Callable[[int, dict[str, torch.Tensor]], torch.Tensor],
    quantizers: dict[str, IntQuantizer | ShiftQuantizer | BinaryQuantizer | TernaryQuantizer | BCQQuantizer],
    targets: Sequence[torch.Tensor],
    schedule: Schedule,
    *,
    biases: Sequence[torch.nn.Parameter] = (),
    progress: Callable[[str, float], None] | None = None,
) -> BlockResult:
    """Learn ``quantizers`` so that ``run(sample, weights)`` (the block's output on calibration sample ``sample``,
    the target weights fed as the quantizers' (N, K) rows) matches ``targets[sample]``. ``biases`` (float
    parameters that ``run`` reads) learn in both phases at the scales' rate, and are undone with them."""
    rng = np.random.default_rng(schedule.seed)
    power = [_power(t, schedule.loss) for t in targets]

    def loss_of(i: int) -> torch.Tensor:
        weights = {name: q() for name, q in quantizers.items()}
        return block_error(run(i, weights), targets[i], power[i])

    def evaluate() -> float:
        with torch.no_grad():
            return float(np.mean([float(loss_of(i)) for i in range(len(targets))]))

    def order(steps: int) -> list[int]:
        per_epoch = len(targets)
        picks = [rng.permutation(per_epoch) for _ in range(-(-steps // per_epoch))]
        return [int(i) for i in np.concatenate(picks)[:steps]] if picks else []

    start = evaluate()
    clip_params = [p for q in quantizers.values() for p in q.clip_parameters()] + list(biases)
    initial = [p.detach().clone() for p in clip_params]
    if schedule.clip_steps and clip_params:
        opt = torch.optim.Adam(clip_params, lr=schedule.clip_lr)
        for step, i in enumerate(order(schedule.clip_steps)):
            opt.zero_grad(set_to_none=True)
            loss = loss_of(i)
            loss.backward()
            opt.step()
            if progress:
                progress("clip", loss.item())
    clipped = evaluate()
    if clipped > start:  # learned clipping that ends worse than none is undone
        with torch.no_grad():
            for p, value in zip(clip_params, initial, strict=True):
                p.copy_(value)
        clipped = start
    for q in quantizers.values():
        q.start_rounding()
    rounding = [q.v for q in quantizers.values()]
    scales = [p for q in quantizers.values() if getattr(q, "scale_with_rounding", False) for p in q.clip_parameters()]
    scales += list(biases)
    round_params = rounding + scales
    nearest = [p.detach().clone() for p in round_params]
    undecided = 0.0
    if schedule.round_steps:
        groups = [{"params": rounding, "lr": schedule.round_lr}] + ([{"params": scales, "lr": schedule.clip_lr}] if scales else [])
        opt = torch.optim.Adam(groups)
        warm = int(schedule.warmup * schedule.round_steps)
        reg = schedule.reg * max(clipped, 1e-12)  # the regulariser is weighed against the error the rounding starts from
        for step, i in enumerate(order(schedule.round_steps)):
            opt.zero_grad(set_to_none=True)
            loss = loss_of(i)
            rec = loss.item()
            if step >= warm:
                t = (step - warm) / max(1, schedule.round_steps - warm - 1)
                beta = 2 + (20 - 2) * (1 + math.cos(math.pi * t)) / 2  # 20 → 2
                loss = loss + reg * sum(q.regulariser(beta) for q in quantizers.values()) / len(quantizers)
            loss.backward()
            opt.step()
            if progress:
                progress("round", rec)
        with torch.no_grad():
            undecided = float(np.mean([q.undecided() for q in quantizers.values()]))
    for q in quantizers.values():
        q.hard = True
    end = evaluate()
    if end > clipped:  # learned rounding that ends worse than rounding to nearest is undone
        with torch.no_grad():
            for p, value in zip(round_params, nearest, strict=True):
                p.copy_(value)
        end = evaluate()
    return BlockResult(start, clipped, end, undecided)


@dataclasses.dataclass
class TuneResult:
    loss_start: float  # mean loss on the calibration samples before the end-to-end phase (held out: on those alone)
    loss_end: float  # after it (the start's when it did not help: the phase is then undone)
    loss_reached: float  # where the training ended, kept or not
    #: with held-out samples: (step, their mean loss) at the start, every ``check`` steps and at the end
    holdout_curve: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    kept_step: int | None = None  # with held-out samples: the step whose parameters were kept (0: the start)


def tune_scales(
    run: Callable[[int], tuple[torch.Tensor, ...]],
    parameters: Sequence[torch.nn.Parameter],
    samples: int,
    *,
    steps: int,
    lr: float,
    loss: str = "kl",
    seed: int = 0,
    progress: Callable[[float], None] | None = None,
    latent: Sequence[torch.nn.Parameter] = (),
    latent_lr: float = 0.0,
    floats: Sequence[torch.nn.Parameter] = (),
    floats_lr: float = 0.0,
    after_step: Callable[[], None] | None = None,
    batch: int = 1,
    schedule: str = "constant",
    holdout: int = 0,
    holdout_from: int = 0,
    check: int = 16,
) -> TuneResult:
    """Learn ``parameters`` (the quantizers' factors on their scales) and ``latent`` (offsets on their grid values,
    learning rate ``latent_lr``; empty: codes frozen) so that the model's output ``run(sample)[0]`` matches its
    target ``run(sample)[1]``; ``floats`` (e.g. biases and norm affines, learning rate ``floats_lr``) learn with them: the KL divergence from the target's softmax over the last axis (``loss = "kl"``, per
    position) or the squared error relative to the target's mean square (``"mse"``). A third value that ``run``
    returns while gradients are on (e.g. intermediate matching) is added to the training loss; the scores before
    and after are the output loss alone. Adam, ``batch`` samples per step (their gradients averaged) in a seeded order,
    the learning rates held (``schedule = "constant"``) or decayed along a half cosine to zero at the last step
    (``"cosine"``); without held-out samples, ends undone when the mean loss over all samples did not drop. ``after_step`` runs after every step (e.g. to keep
    latent values in range).

    ``holdout > 0`` (early stopping): that many samples, chosen with the seed, are never trained on; their mean loss
    is measured at the start, every ``check`` steps and at the end, and the parameters where it was lowest are kept
    (the start's when no check beat it: the phase is undone). The scores before and after are then theirs: the
    trained samples are not scored. ``holdout_from``: they are drawn among the samples from that index on (those
    before it fitted an earlier phase)."""
    if latent and latent_lr <= 0:
        raise ValueError("latent values need latent_lr > 0")
    if floats and floats_lr <= 0:
        raise ValueError("float values need floats_lr > 0")
    if batch < 1:
        raise ValueError("batch must be >= 1")
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', not {schedule!r}")
    if not 0 <= holdout < samples:
        raise ValueError(f"holdout must leave samples to train on: 0 <= holdout < {samples}, got {holdout}")
    if holdout and not 0 <= holdout_from <= samples - holdout:
        raise ValueError(f"the {holdout} held-out samples are drawn from index {holdout_from} on, of {samples}: too few")
    if check < 1:
        raise ValueError("check must be >= 1")
    rng = np.random.default_rng(seed)
    held = sorted(holdout_from + int(i) for i in rng.permutation(samples - holdout_from)[:holdout]) if holdout else []
    trained = [i for i in range(samples) if i not in set(held)]

    def loss_of(i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        out, target, *extra = run(i)
        if loss == "kl":
            logp = torch.log_softmax(target.double(), -1)
            value = (logp.exp() * (logp - torch.log_softmax(out.double(), -1))).sum(-1).mean()
        else:
            value = ((out - target) ** 2).mean() / (target**2).mean().clamp_min(1e-30)
        return value, (extra[0] if extra else None)

    def evaluate(over: Sequence[int] = range(samples)) -> float:
        with torch.no_grad():
            return float(np.mean([float(loss_of(i)[0]) for i in over]))

    learned = [*parameters, *latent, *floats]
    initial = [p.detach().clone() for p in learned]
    curve = [(0, evaluate(held))] if held else []
    start = curve[0][1] if held else evaluate()
    best, kept_step = (curve[0][1], 0) if held else (None, None)
    kept = initial
    groups = [{"params": list(parameters), "lr": lr}] + ([{"params": list(latent), "lr": latent_lr}] if latent else [])
    groups += [{"params": list(floats), "lr": floats_lr}] if floats else []
    opt = torch.optim.Adam(groups)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / steps))) if schedule == "cosine" and steps else None
    visits = steps * batch
    order = np.asarray(trained)
    picks = np.concatenate([order[rng.permutation(len(order))] for _ in range(-(-visits // len(order)))])[:visits] if steps else []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for i in picks[step * batch : (step + 1) * batch]:
            value, extra = loss_of(int(i))
            ((value if extra is None else value + extra) / batch).backward()
            total += value.item() / batch
        opt.step()
        if decay is not None:
            decay.step()
        if after_step:
            after_step()
        if progress:
            progress(total)
        if held and ((step + 1) % check == 0 or step + 1 == steps):
            curve.append((step + 1, evaluate(held)))
            if curve[-1][1] < best:
                best, kept_step, kept = curve[-1][1], step + 1, [p.detach().clone() for p in learned]
    if held:  # scored on the held-out samples alone: the trained ones' loss says little, and one pass over them
        # costs what a quarter of the steps do on a large calibration set
        if kept_step != steps:  # the held-out samples' loss was lowest earlier (or at the start: undone)
            with torch.no_grad():
                for p, value in zip(learned, kept, strict=True):
                    p.copy_(value)
        return TuneResult(start, best, curve[-1][1], curve, kept_step)
    reached = end = evaluate() if steps else start
    if end > start:
        with torch.no_grad():
            for p, value in zip(learned, initial, strict=True):
                p.copy_(value)
        end = start
    return TuneResult(start, end, reached)


def _power(target: torch.Tensor, over: str) -> torch.Tensor:
    """The target's mean square that the squared error is divided by: one value, one per channel (last axis), or one
    per token (every position but the last axis)."""
    t2 = target.double() ** 2
    if over == "channel":
        p = t2.reshape(-1, t2.shape[-1]).mean(0)
    elif over == "token":
        p = t2.mean(-1, keepdim=True)
    else:
        p = t2.mean()
    return torch.where(p > 0, p, torch.ones_like(p)).to(target.dtype)
