"""Hutchinson's estimate of each parameter's average Hessian diagonal against the exact Hessian of a small net."""

from __future__ import annotations

import numpy as np
import torch

from bitfold.quant.hutchinson import hessian_traces, output_traces


def test_trace_estimate_matches_the_exact_hessian_trace():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x, y = torch.randn(16, 6), torch.randn(16, 3)

    def loss(module, batch):
        return torch.nn.functional.mse_loss(module(batch[0]), batch[1])

    params = {"0.weight": net[0].weight, "2.weight": net[2].weight}
    estimate = hessian_traces(net, loss, [(x, y)], params, probes=2000)
    for name, p in params.items():

        def as_function(w, name=name):
            return torch.nn.functional.mse_loss(torch.func.functional_call(net, {name: w}, (x,)), y)

        exact = torch.autograd.functional.hessian(as_function, p.detach().clone()).reshape(p.numel(), p.numel())
        average = float(torch.diagonal(exact).mean())
        assert np.isclose(estimate[name], average, rtol=0.1), (name, estimate[name], average)
    assert estimate["2.weight"] > 0 and estimate["0.weight"] != estimate["2.weight"]


def test_output_traces_are_the_hessian_of_the_distance_to_the_unquantized_outputs():
    """At the current weights ‖f(W) - f(W₀)‖² has Hessian 2 JᵀJ: the output-space estimate matches its exact trace
    block by block and is never negative."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    x = torch.randn(8, 5)
    with torch.no_grad():
        y0 = net(x)
    params = {"0.weight": net[0].weight, "2.weight": net[2].weight}
    estimate = output_traces(net, lambda module, batch: module(batch), [x], params, probes=3000)
    for name, p in params.items():

        def distance(w, name=name):
            return ((torch.func.functional_call(net, {name: w}, (x,)) - y0) ** 2).sum()

        exact = torch.autograd.functional.hessian(distance, p.detach().clone()).reshape(p.numel(), p.numel())
        assert np.isclose(estimate[name], float(torch.diagonal(exact).mean()), rtol=0.1), name
        assert estimate[name] > 0
