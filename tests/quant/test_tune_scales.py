"""tune_scales: the end-to-end phase's training loop (batches, the undo rule) on toy objectives."""

from __future__ import annotations

import math

import pytest
import torch

from bitfold.quant.reconstruct import tune_scales

# two samples whose gradients on p pull opposite ways at p = 1 (sample 0 down, to 0.9; sample 1 up, to 3); their
# mean pulls up, to the joint optimum 1.0735 (where 2(p − 0.9)/0.81 + 8(4p − 12)/144 = 0)
XS, YS = (torch.tensor([1.0]), torch.tensor([4.0])), (torch.tensor([0.9]), torch.tensor([12.0]))


def _fit(batch: int, steps: int = 1) -> tuple[float, object]:
    p = torch.nn.Parameter(torch.tensor([1.0]))
    result = tune_scales(lambda i: (p * XS[i], YS[i]), [p], 2, steps=steps, lr=0.1, loss="mse", seed=0, batch=batch)
    return float(p.detach()), result


def test_a_batch_steps_along_the_mean_gradient_of_its_samples():
    # a one-sample first step follows whichever sample comes first in the seeded order, a two-sample step their mean
    value, _ = _fit(batch=2)
    assert value == pytest.approx(1.1, abs=1e-6)  # Adam's first step: lr along the mean gradient's sign
    value, result = _fit(batch=1)
    if value == 1.0:  # the first sample pulled down, away from the mean's optimum: the step raised the loss, undone
        assert result.loss_reached > result.loss_start == result.loss_end
    else:
        assert value == pytest.approx(1.1, abs=1e-6) and result.loss_end < result.loss_start


def test_training_that_lowers_the_loss_is_kept_and_its_losses_are_reported():
    value, result = _fit(batch=2, steps=100)
    assert result.loss_end < result.loss_start and result.loss_end == result.loss_reached
    assert value == pytest.approx(1.0735, abs=2e-3)


def test_a_batch_below_one_is_refused():
    with pytest.raises(ValueError, match="batch must be >= 1"):
        _fit(batch=0)


def test_cosine_schedule_decays_each_step_to_zero_at_the_end():
    # one sample far from its optimum: Adam's normalized step is the learning rate itself, so p's path is the sum of
    # the rates: 4 × 0.1 held, or 0.1 × Σ (1 + cos(πk/4)) / 2 over k = 0..3 along the half cosine
    paths = {}
    for schedule in ("constant", "cosine"):
        p = torch.nn.Parameter(torch.tensor([1.0]))
        tune_scales(lambda i: (p * XS[0], torch.tensor([100.0])), [p], 1, steps=4, lr=0.1, loss="mse", schedule=schedule)
        paths[schedule] = float(p.detach()) - 1.0
    rates = [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert paths["constant"] == pytest.approx(0.4, rel=1e-3)
    assert paths["cosine"] == pytest.approx(0.1 * sum(rates), rel=1e-3)


def test_an_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="schedule must be"):
        tune_scales(lambda i: (XS[0], YS[0]), [], 1, steps=1, lr=0.1, schedule="linear")
