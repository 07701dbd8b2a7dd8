"""Kernels for bitfold's ops (and for ONNX Runtime's ``com.microsoft.MatMulNBits``, which TVM does not import):
TE compute definitions with explicit schedules for llvm (CPU) and CUDA.

A kernel module registers one :class:`Kernel` with :func:`kernel`. Its faces:

- ``prepare(weights, attrs) -> Prepared`` (numpy, once per model): the op's constant inputs rearranged into the
  kernel's layout, e.g. packed codes with the output axis innermost so one vector load reads the codes of
  consecutive outputs and a CUDA warp reads consecutive bytes; plus the static integers the compute needs;
- ``compute(x, arrays, **params) -> te.Tensor``: the TE definition for activations x of shape [M, K], returning
  Y [M, N];
- optionally ``lowering(prepared, m, target) -> PrimFunc | None``: a hand-written TIR kernel for the targets it
  supports (e.g. ``lut``'s AVX-512 lookup microkernel), taking the same arguments; None falls back to ``compute``;
- optionally ``select(weights, attrs, device) -> bool``: whether a node with these constant inputs takes the kernel
  on ``device`` ("cpu" or "cuda"; default: every node whose weights are constants). A kernel for a standard ONNX op
  (``dense``) uses it to take only the nodes its layout speeds up.

Blocks are named for the schedule (``bitfold.kernels.schedule``): ``part*`` reduce a group of inputs for a tile
of outputs, ``gemv*`` reduce the groups into [..., N] (outputs innermost), ``row*`` compute per-activation
helpers (sums, lookup tables, bit-packed signs) and ``out*`` are element-wise epilogues. A kernel with another
shape of loop nest (the Walsh–Hadamard transform) brings its own ``schedule``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Constant operands in kernel layout, the static parameters of ``compute``, and the op's K and N."""

    arrays: tuple[np.ndarray, ...]
    params: Mapping[str, int]
    k: int
    n: int

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays)


@dataclasses.dataclass(frozen=True)
class Kernel:
    domain: str
    op_type: str
    #: indices of the op's inputs that must be constants (all but the activations)
    weights: tuple[int, ...]
    prepare: Callable[[Sequence[np.ndarray | None], Mapping[str, int]], Prepared]
    compute: Callable
    schedule: Callable | None = None
    lowering: Callable | None = None
    select: Callable[[Sequence[np.ndarray | None], Mapping[str, int], str], bool] | None = None

    @property
    def key(self) -> str:
        return f"{self.domain}.{self.op_type}"


KERNELS: dict[str, Kernel] = {}


def kernel(
    domain: str, op_type: str, weights: tuple[int, ...], prepare: Callable, compute: Callable,
    schedule: Callable | None = None, lowering: Callable | None = None, select: Callable | None = None,
) -> Kernel:  # fmt: skip
    """Register the kernel of ``domain.op_type``; returns it."""
    entry = Kernel(domain, op_type, weights, prepare, compute, schedule, lowering, select)
    KERNELS[entry.key] = entry
    return entry


def find(domain: str, op_type: str) -> Kernel | None:
    _load()
    return KERNELS.get(f"{domain or 'ai.onnx'}.{op_type}")


def _load() -> None:
    from bitfold.kernels import (  # noqa: F401  (register)
        bcq,
        binary,
        csr,
        dense,
        hadamard,
        nbits,
        shift,
        sparse,
        ternary,
    )
