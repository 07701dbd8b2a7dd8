"""A 2-D Conv as a MatMul over input patches, for the Hessian that GPTQ and output clipping need on Conv weights.

A Conv with weight W (C_out, C_in/groups, kh, kw) computes, for every output pixel and group g, the product of the
group's rows W_g (C_out/groups, K), K = C_in/groups · kh · kw, with the pixel's input patch (K,), in the order
(channel, kernel row, kernel column) that ``W.reshape(C_out, -1)`` also has. The Gram matrix of a group's patches,
H_g = Σ pᵀp over pixels and samples, is therefore the Hessian of that group's rows exactly as XᵀX is a MatMul's.
:func:`patch_gram` computes (groups, K, K) from one batch of NCHW inputs (torch ``unfold`` after explicit ONNX
padding); only 2-D Convs with constant attributes are described (:meth:`ConvGeometry.of` says why not otherwise).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import torch


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """A 2-D Conv's kernel, strides, dilations, ONNX pads (top, left, bottom, right) or auto_pad, and groups."""

    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    dilations: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    auto_pad: str = "NOTSET"
    groups: int = 1

    @classmethod
    def of(cls, node: ir.Node) -> ConvGeometry | str:
        """The geometry of Conv ``node``, or the reason it has none (not 2-D, no constant weight)."""
        weight = node.inputs[1]
        tensor = weight.const_value if weight is not None else None
        if tensor is None or len(tensor.shape) != 4:
            return "not a 2-D Conv with a constant weight"
        a = node.attributes
        kernel = tuple(tensor.shape[2:])
        return cls(
            kernel=kernel,  # type: ignore[arg-type]
            strides=tuple(a.get_ints("strides", [1, 1])),  # type: ignore[arg-type]
            dilations=tuple(a.get_ints("dilations", [1, 1])),  # type: ignore[arg-type]
            pads=tuple(a.get_ints("pads", [0, 0, 0, 0])),  # type: ignore[arg-type]
            auto_pad=a.get_string("auto_pad", "NOTSET"),
            groups=a.get_int("group", 1),
        )

    def padding(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) for an input of this size."""
        if self.auto_pad in ("NOTSET", "VALID"):
            return self.pads if self.auto_pad == "NOTSET" else (0, 0, 0, 0)
        begin, end = [], []
        for size, k, s, d in zip((height, width), self.kernel, self.strides, self.dilations, strict=True):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begin.append(large if self.auto_pad == "SAME_LOWER" else small)
            end.append(small if self.auto_pad == "SAME_LOWER" else large)
        return begin[0], begin[1], end[0], end[1]


def patches(x: np.ndarray, geometry: ConvGeometry) -> torch.Tensor:
    """Input patches of NCHW ``x`` as (batch, groups, K, pixels), float64."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
    top, left, bottom, right = geometry.padding(*t.shape[2:])
    t = torch.nn.functional.pad(t, (left, right, top, bottom))
    cols = torch.nn.functional.unfold(t, geometry.kernel, dilation=geometry.dilations, stride=geometry.strides)
    return cols.reshape(t.shape[0], geometry.groups, -1, cols.shape[-1])


def patch_gram(x: np.ndarray, geometry: ConvGeometry) -> np.ndarray:
    """Σ over batch and pixels of pᵀp per group: (groups, K, K), float64."""
    p = patches(x, geometry)
    return torch.einsum("bgkl,bgml->gkm", p, p).numpy()
