"""GPTQ (Frantar et al., 2022) as a pure array function in the paper's symbols.

Minimises ||W X - Q X||² row by row, quantizing one column of W (N, K) at a time and spreading its rounding error
over the not-yet-quantized columns with the inverse Hessian H⁻¹ of the layer input (H = 2 XᵀX, the factor 2
cancels). The inverse is used through its upper Cholesky factor U (H⁻¹ = UᵀU), whose rows give every column's
update; columns are processed in blocks of ``block_size`` with the updates to later blocks applied lazily, once
per block. ``damp`` adds damp · mean(diag H) to the diagonal. With ``act_order`` columns are visited by
decreasing diag(H); scale groups then keep their original column membership, with parameters fixed from the
unquantized weights ("static groups"). Dead inputs (diag H = 0) get weight 0.

A Hessian that is not positive definite even after dampening (an indefinite matrix, or one too ill-conditioned for
float64) gets 10×, 100× and 1000× the dampening in turn; if all fail, the loop keeps only diag(H) (U diagonal), so
no rounding error is spread and every column is rounded to nearest (RTN) with the same grid. Either event appends
one sentence to ``notes`` when a list is given. ``damp`` must lie in (0, 1]; H must be finite.

The quantization grid is an argument. :func:`gptq_loop` takes any :class:`Grid` (``fit`` a group of columns,
``round`` one column): binary codes, powers of two, ternary or salient-plus-binary grids reuse the same loop.
:func:`gptq` is the loop over a :class:`~bitfold.quant.formats.Format` with a granularity.
"""

from __future__ import annotations

import math
import numbers
import os
import tempfile
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

from bitfold.errors import BitfoldError, PassParameterError
from bitfold.quant.clip import Clip, group_params
from bitfold.quant.formats import Format, Granularity, PerChannel, PerGroup


class Grid(Protocol):
    """What the GPTQ loop rounds to: ``round`` maps one column (N,) to grid values (or prunes it)."""

    def round(self, w: np.ndarray, col: int) -> np.ndarray: ...


class GroupGrid(Grid, Protocol):
    """A grid fitted per group of columns: ``fit`` sees a group's current (error-updated) columns before any of
    them is rounded, with the diagonal of the inverse-Hessian Cholesky factor for those columns (the OBS
    denominators: the error of zeroing or rounding w_j costs w_j² / U_jj²)."""

    def fit(self, w: np.ndarray, start: int, u_diag: np.ndarray) -> None: ...


def gptq_loop(
    W: np.ndarray, H: np.ndarray, grid: Grid | GroupGrid, *, group: int = 0, block_size: int = 128, damp: float = 0.01,
    act_order: bool = False, notes: list[str] | None = None, overwrite_h: bool = False, scratch: str | os.PathLike | None = None,
) -> np.ndarray:  # fmt: skip
    """Round W (N, K) column by column onto ``grid``, given H (K, K); returns the rounded W (N, K), float32.

    ``group`` > 0: ``grid.fit`` is called at every ``group``-th column with the group's current columns (groups
    follow column order, so not with ``act_order``). ``group`` = 0: the grid was fitted beforehand. ``round``
    always receives the original column index. ``notes`` receives a sentence when H needed more dampening than
    ``damp`` or the loop fell back to round-to-nearest.

    ``overwrite_h``: H's memory may hold the factorization (its contents are undefined afterwards), so the solve
    needs no K x K matrix of its own; taken only where H is a writable, C-contiguous float64 array (otherwise H is
    copied as without it). The result is the same either way. A copy of the permuted H, read back only if a
    dampening retry needs it, goes to a temporary file in ``scratch`` (default: the system's temporary folder; name
    one on disk where that is a RAM-backed tmpfs).
    """
    if group and act_order:
        raise ValueError("groups fitted during the loop follow column order; fit the grid beforehand for act_order")
    check_damp(damp)
    source = np.asarray(H)  # the caller's array, never changed: read again only if a dampening retry needs H afresh
    if not all(np.isfinite(source[i : i + 1024]).all() for i in range(0, len(source), 1024)):  # no K x K temporary
        raise BitfoldError(
            "the layer's Hessian (the Gram matrix of its calibration inputs) has inf or NaN entries; "
            "use calibration data whose activations stay finite at this layer."
        )
    k = W.shape[1]
    diag = torch.from_numpy(np.diag(source).astype(np.float64))
    dead = diag == 0
    diag[dead] = 1.0  # as the factored matrix holds it
    if group:
        block_size = max(block_size // group, 1) * group  # a group never spans two blocks
    scale = torch.mean(torch.abs(diag))  # the dampening's unit
    perm = torch.argsort(diag + damp * scale, descending=True) if act_order else torch.arange(k)
    n = W.shape[0]
    # transposed, (K, N): a column of W is a contiguous row here, and the rank-1 updates run over whole rows
    W = torch.tensor(np.asarray(W)[:, perm.numpy()].T, dtype=torch.float64)  # permuted before widening: one copy
    W[dead[perm]] = 0.0

    def permuted() -> torch.Tensor:  # H[perm][:, perm] with dead inputs' diagonal at 1, a block of columns at a time
        # column-major, as LAPACK works: the factorizations then run in its memory with no K x K copy of their own
        out = torch.empty((k, k), dtype=torch.float64).T
        order = perm.numpy()
        for j in range(0, k, 512):
            out[:, j : j + 512] = torch.from_numpy(source[:, order[j : j + 512]][order])
        out.diagonal()[dead[perm]] = 1.0
        return out

    if overwrite_h and isinstance(source, np.ndarray) and source.dtype == np.float64 and source.flags.c_contiguous and source.flags.writeable:
        with tempfile.TemporaryFile(prefix="bitfold-gram-", dir=scratch) as backup:  # what a dampening retry starts again from
            H = _permuted_in_place(source, perm.numpy(), dead[perm].numpy())
            source.tofile(backup)
            backup.flush()

            def restored() -> torch.Tensor:
                backup.seek(0)
                backup.readinto(memoryview(source).cast("B"))
                return H

            U = inverse_cholesky(H, damp, scale, notes, rebuild=restored)  # factored in the caller's memory
    else:
        H = permuted()  # the only K x K matrix besides the caller's
        U = inverse_cholesky(H, damp, scale, notes, rebuild=permuted)  # factored in H's own memory
    del H  # the loop reads U only
    Q = torch.zeros((k, n), dtype=torch.float32)  # what is returned: the error feedback uses the float64 values
    E = torch.empty((block_size, n), dtype=torch.float64)
    W1 = U1 = E1 = None  # views into W, U and E, per block
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1, U1, E1 = W[i1:i2], U[i1:i2, i1:i2], E[: i2 - i1]  # W1 is updated in place: its rows are not read later
        for i in range(i2 - i1):
            col = i1 + i
            if group and col % group == 0:
                end = i + min(group, k - col)
                grid.fit(W1[i:end].T.numpy(), col, torch.diag(U1)[i:end].numpy())
            q = torch.from_numpy(np.asarray(grid.round(W1[i].numpy(), int(perm[col])), np.float64))
            Q[col] = q
            e = torch.sub(W1[i], q, out=E1[i]).div_(U1[i, i])
            W1[i + 1 :].addr_(U1[i, i + 1 :], e, alpha=-1.0)
        W[i2:].addmm_(U[i1:i2, i2:].T, E1, alpha=-1.0)
    del U, W, W1, U1, E, E1  # the factor and the updated weights go before the result's unpermuted copy is made
    return Q.T[:, torch.argsort(perm)].numpy()


def _permuted_in_place(a: np.ndarray, order: np.ndarray, dead: np.ndarray) -> torch.Tensor:
    """What ``permuted`` builds (``a[order][:, order]`` with the ``dead`` entries of its diagonal at 1, seen
    column-major), in ``a``'s own memory (a C-contiguous K x K array): rows moved along the permutation's cycles,
    the matrix transposed tile by tile, rows moved again. The memory then holds P aᵀ Pᵀ, whose column-major view is
    P a Pᵀ (a Gram matrix summed in blocks of rows need not be exactly symmetric: the transpose is not skipped).
    Only copies: the values are the same bits."""
    _rows_in_place(a, order)
    tile = 512
    for i in range(0, len(a), tile):
        d = a[i : i + tile, i : i + tile]
        d[...] = d.T.copy()
        for j in range(i + tile, len(a), tile):
            upper = a[i : i + tile, j : j + tile].copy()
            a[i : i + tile, j : j + tile] = a[j : j + tile, i : i + tile].T
            a[j : j + tile, i : i + tile] = upper.T
    _rows_in_place(a, order)
    out = torch.from_numpy(a).T
    out.diagonal()[torch.from_numpy(dead)] = 1.0
    return out


def _rows_in_place(a: np.ndarray, order: np.ndarray) -> None:
    """``a[:] = a[order]`` with one row of scratch memory: each cycle of the permutation moved in turn."""
    done = np.zeros(len(order), dtype=bool)
    for start in range(len(order)):
        if done[start] or order[start] == start:
            continue
        first = a[start].copy()
        i = start
        while True:
            done[i] = True
            j = order[i]
            if j == start:
                a[i] = first
                break
            a[i] = a[j]
            i = j


#: Dampening factors tried in turn, as multiples of ``damp``, before falling back to round-to-nearest.
DAMP_STEPS = (1.0, 10.0, 100.0, 1000.0)


def check_damp(damp: float) -> None:
    """Raise unless ``damp`` (the dampening, a fraction of H's mean diagonal) is a finite number in (0, 1]."""
    if isinstance(damp, bool) or not isinstance(damp, numbers.Real) or not math.isfinite(damp) or not 0.0 < damp <= 1.0:
        raise PassParameterError(f"damp must be a finite number in (0, 1] (a fraction of H's mean diagonal, e.g. 0.01), got {damp!r}.")


def inverse_cholesky(H: torch.Tensor, damp: float, scale: torch.Tensor, notes: list[str] | None = None,
                     rebuild: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
    """The upper Cholesky factor U of (H + λI)⁻¹ (H⁻¹ = UᵀU), λ = damp · ``scale`` (mean |diag H|) raised through
    ``DAMP_STEPS`` until H + λI is positive definite; if none is, the diagonal U = diag(H)^(-1/2) (entries where
    diag H <= 0 take 1), under which the GPTQ loop spreads no error: round-to-nearest.

    The factorizations run in place (LAPACK's own way), so the memory is one K x K matrix besides H: a copy of H
    per attempt, or, given ``rebuild`` (which returns H afresh), none: the first attempt factors H itself (H is
    then gone: its memory holds U) and a retry factors what ``rebuild`` returns."""
    diag = torch.diag(H).clone()
    for attempt, step in enumerate(DAMP_STEPS):
        work = H.clone() if rebuild is None else H if attempt == 0 else rebuild()
        work.diagonal().add_((damp * step) * scale)
        info = torch.zeros((), dtype=torch.int32)
        torch.linalg.cholesky_ex(work, out=(work, info))
        if info == 0:
            torch.cholesky_inverse(work, out=work)
            torch.linalg.cholesky_ex(work, upper=True, out=(work, info))
            if info == 0 and all(torch.isfinite(work[:, j : j + 512]).all() for j in range(0, len(work), 512)):  # no K x K temporary
                if step != 1.0 and notes is not None:
                    notes.append(f"H is not positive definite with damp {damp:g}; used damp {damp * step:g}")
                return work
        del work
    if notes is not None:
        top = damp * DAMP_STEPS[-1]
        notes.append(f"H is not positive definite even with damp {top:g}; rounded to nearest (no GPTQ error feedback)")
    return torch.diag(torch.rsqrt(torch.where(diag > 0, diag, torch.ones_like(diag))))


class FormatGrid:
    """A number format's grid: scale and zero point per row and group of ``group`` columns (1: per column), fitted
    per group (or all at once).

    ``clip = "output"`` fits each group's range to the output error through H's diagonal block (``clip.py``).
    """

    def __init__(self, fmt: Format, shape: tuple[int, int], clip: Clip = "none", H: np.ndarray | None = None, group: int = 1) -> None:
        self.fmt, self.clip, self.group, self.shape = fmt, clip, group, shape
        groups = -(-shape[1] // group)
        # what the output clip reads of H: its diagonal blocks, copied (the loop may factor H in its own memory)
        self.blocks = None if H is None or clip != "output" else [np.array(H[s : s + group, s : s + group]) for s in range(0, shape[1], group)]
        # stored column-major ((G, N) arrays seen through a transpose): the loop reads one column per step, and a
        # strided column of a wide row-major matrix touches a cache line per element
        self.scale, self.zero = np.zeros((groups, shape[0]), np.float32).T, np.zeros((groups, shape[0]), np.float32).T

    def set(self, scale: np.ndarray, zero: np.ndarray, start: int = 0) -> None:
        """Per-element parameters (N, columns from ``start``), constant within each group, stored per group."""
        first, g = start // self.group, self.group
        self.scale[:, first : first + -(-scale.shape[1] // g)] = scale[:, ::g]
        self.zero[:, first : first + -(-zero.shape[1] // g)] = zero[:, ::g]

    def per_element(self) -> tuple[np.ndarray, np.ndarray]:
        """Scale and zero point per element (N, K), float32."""
        return tuple(np.ascontiguousarray(np.repeat(p, self.group, axis=1)[:, : self.shape[1]], np.float32) for p in (self.scale, self.zero))

    def fit(self, w: np.ndarray, start: int, u_diag: np.ndarray) -> None:
        block = None if self.blocks is None else self.blocks[start // self.group]
        self.set(*group_params(np.asarray(w, np.float32), self.fmt, PerChannel(), self.clip, block), start=start)

    def round(self, w: np.ndarray, col: int) -> np.ndarray:
        s, z = self.scale[:, col // self.group], self.zero[:, col // self.group]
        return self.fmt.dequantize(self.fmt.quantize(w.astype(np.float32), s, z), s, z)


def gptq(
    W: np.ndarray,
    H: np.ndarray,
    fmt: Format,
    granularity: Granularity,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    clip: Clip = "none",
    notes: list[str] | None = None,
    overwrite_h: bool = False,
    scratch: str | os.PathLike | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize W (N, K) given H (K, K). Returns (Q dequantized (N, K), scale (N, K), zero (N, K)).

    ``scale``/``zero`` are per element (constant within each scale group) so any emitter can re-derive codes.
    Per-group scales follow the error-updated weights; with ``act_order`` (or per-channel/per-tensor scales) they
    are fixed from the unquantized weights. ``notes``, ``overwrite_h`` and ``scratch``: as for :func:`gptq_loop`.
    """
    check_damp(damp)
    # parameters are held per group while the loop runs, per element only once it is done
    dynamic = isinstance(granularity, PerGroup) and not act_order
    grid = FormatGrid(fmt, W.shape, clip, H if dynamic else None, group=granularity.size if isinstance(granularity, PerGroup) else W.shape[1])
    if not dynamic:
        grid.set(*group_params(np.asarray(W, np.float32), fmt, granularity, clip, H))
    q = gptq_loop(W, H, grid, group=granularity.size if dynamic else 0, block_size=block_size, damp=damp, act_order=act_order,
                  notes=notes, overwrite_h=overwrite_h, scratch=scratch)  # fmt: skip
    return (q, *grid.per_element())
