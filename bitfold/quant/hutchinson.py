"""HAWQ-V2 sensitivity: the average Hessian trace of the task loss per weight, by Hutchinson's estimator.

For a parameter W with n entries, Tr(H_W) / n with H_W the Hessian of the loss w.r.t. W is E[vᵀ H_W v] / n over
Rademacher vectors v (Hutchinson, 1990); each vᵀHv costs one Hessian-vector product, the gradient of (∇L · v)
(double backward). HAWQ-V2 (Dong et al., 2020) scores quantizing W to a format by Ω = Tr(H_W)/n · ‖Q(W) - W‖²,
the second-order loss increase of a perturbation spread evenly over the Hessian's eigenvectors. This needs the model
in torch with a differentiable loss: :func:`hessian_traces` takes the module, a loss function and batches. The
second-order argument holds where the loss is at a minimum, as a trained model's task loss may be.

One probe vector spans all parameters, so each block's estimate also carries the cross terms v_pᵀH_pq v_q: zero
in expectation, but from large blocks they can swamp a small one and turn it negative. :func:`output_traces`
avoids both problems for the loss that is always at its minimum, the squared distance of the outputs y to the
unquantized model's own: its Hessian there is 2 JᵀJ (J = ∂y/∂W), and Tr(J_pᵀJ_p) = E‖J_pᵀu‖² over Rademacher
vectors u in output space, one backward pass per probe for every block at once, each estimate non-negative.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch


def hessian_traces(
    module: torch.nn.Module,
    loss: Callable[[torch.nn.Module, Any], torch.Tensor],
    batches: Iterable[Any],
    params: Mapping[str, torch.nn.Parameter],
    *,
    probes: int = 8,
    seed: int = 0,
) -> dict[str, float]:
    """Tr(H)/n of ``loss(module, batch)`` for each named parameter, averaged over batches and ``probes`` Rademacher
    vectors per batch."""

    def prepare(batch, tensors):
        return torch.autograd.grad(loss(module, batch), tensors, create_graph=True)

    def probe(grads, tensors, generator):
        vs = [_rademacher(t.shape, t.dtype, generator) for t in tensors]
        hvs = torch.autograd.grad(grads, tensors, grad_outputs=vs, retain_graph=True)
        return [float((v * hv).sum()) / t.numel() for t, v, hv in zip(tensors, vs, hvs, strict=True)]

    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):  # the fused kernels lack double backward
        return _average(params, batches, probes, seed, prepare, probe)


def output_traces(
    module: torch.nn.Module,
    forward: Callable[[torch.nn.Module, Any], torch.Tensor],
    batches: Iterable[Any],
    params: Mapping[str, torch.nn.Parameter],
    *,
    probes: int = 8,
    seed: int = 0,
) -> dict[str, float]:
    """Tr(H)/n per named parameter of ‖forward(module, batch) - y₀‖² at the current weights (H = 2 JᵀJ), averaged
    over batches and ``probes`` output-space Rademacher vectors per batch."""

    def probe(outputs, tensors, generator):
        u = _rademacher(outputs.shape, outputs.dtype, generator)
        grads = torch.autograd.grad(outputs, tensors, grad_outputs=u, retain_graph=True)
        return [2.0 * float((g.double() ** 2).sum()) / t.numel() for t, g in zip(tensors, grads, strict=True)]

    return _average(params, batches, probes, seed, lambda batch, _: forward(module, batch), probe)


def _average(params, batches, probes: int, seed: int, prepare, probe) -> dict[str, float]:
    """Mean over batches and probes of ``probe(prepare(batch, tensors), tensors, generator)``, one value per parameter."""
    names = list(params)
    tensors = [params[name] for name in names]
    generator = torch.Generator().manual_seed(seed)
    totals, count = dict.fromkeys(names, 0.0), 0
    for batch in batches:
        state = prepare(batch, tensors)
        for _ in range(probes):
            for name, value in zip(names, probe(state, tensors, generator), strict=True):
                totals[name] += value
            count += 1
    return {name: total / max(count, 1) for name, total in totals.items()}


def _rademacher(shape, dtype, generator: torch.Generator) -> torch.Tensor:
    return (torch.randint(0, 2, shape, generator=generator) * 2 - 1).to(dtype)
