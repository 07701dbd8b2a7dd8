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
    names = list(params)
    tensors = [params[name] for name in names]
    generator = torch.Generator().manual_seed(seed)
    totals, count = dict.fromkeys(names, 0.0), 0
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):  # the fused kernels lack double backward
        for batch in batches:
            grads = torch.autograd.grad(loss(module, batch), tensors, create_graph=True)
            for _ in range(probes):
                vs = [(torch.randint(0, 2, t.shape, generator=generator) * 2 - 1).to(t.dtype) for t in tensors]
                hvs = torch.autograd.grad(grads, tensors, grad_outputs=vs, retain_graph=True)
                for name, t, v, hv in zip(names, tensors, vs, hvs, strict=True):
                    totals[name] += float((v * hv).sum()) / t.numel()
                count += 1
    return {name: total / max(count, 1) for name, total in totals.items()}


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
    names = list(params)
    tensors = [params[name] for name in names]
    generator = torch.Generator().manual_seed(seed)
    totals, count = dict.fromkeys(names, 0.0), 0
    for batch in batches:
        outputs = forward(module, batch)
        for _ in range(probes):
            u = (torch.randint(0, 2, outputs.shape, generator=generator) * 2 - 1).to(outputs.dtype)
            grads = torch.autograd.grad(outputs, tensors, grad_outputs=u, retain_graph=True)
            for name, t, g in zip(names, tensors, grads, strict=True):
                totals[name] += 2.0 * float((g.double() ** 2).sum()) / t.numel()
            count += 1
    return {name: total / max(count, 1) for name, total in totals.items()}
