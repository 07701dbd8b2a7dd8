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


def test_held_out_samples_are_never_trained_on_and_pick_the_step_kept():
    # sample 0 pulls p to 0.9, sample 1 to 3; the seeded choice holds one of them out, so training follows the other
    # and moves p away from the held-out one's optimum: the start is its lowest loss, and the phase is undone
    p = torch.nn.Parameter(torch.tensor([1.0]))
    result = tune_scales(lambda i: (p * XS[i], YS[i]), [p], 2, steps=8, lr=0.1, loss="mse", holdout=1, check=2)
    assert [step for step, _ in result.holdout_curve] == [0, 2, 4, 6, 8]
    assert result.kept_step == 0 and float(p.detach()) == 1.0 and result.loss_end == result.loss_start
    # the held-out sample agrees with the trained one (both pull p up toward 3): its loss falls, the last check is kept
    ys = (torch.tensor([3.0]), torch.tensor([12.0]))
    q = torch.nn.Parameter(torch.tensor([1.0]))
    result = tune_scales(lambda i: (q * XS[i], ys[i]), [q], 2, steps=8, lr=0.1, loss="mse", holdout=1, check=2)
    losses = [value for _, value in result.holdout_curve]
    assert losses == sorted(losses, reverse=True) and result.kept_step == 8 and float(q.detach()) > 1.5


def test_with_held_out_samples_only_they_are_scored():
    # the trained samples are read with gradients on (training steps) and never scored: on a large calibration set a
    # pass over them costs what many steps do; the scores before and after are the held-out curve's start and best
    ys = (torch.tensor([3.0]), torch.tensor([12.0]), torch.tensor([6.0]))
    xs = (torch.tensor([1.0]), torch.tensor([4.0]), torch.tensor([2.0]))
    p = torch.nn.Parameter(torch.tensor([1.0]))
    scored = []

    def run(i):
        if not torch.is_grad_enabled():
            scored.append(int(i))
        return p * xs[i], ys[i]

    result = tune_scales(run, [p], 3, steps=6, lr=0.1, loss="mse", holdout=1, check=2)
    [held] = set(scored)
    assert len(scored) == len(result.holdout_curve) == 4
    assert result.loss_start == result.holdout_curve[0][1]
    assert result.loss_end == min(v for _, v in result.holdout_curve) == dict(result.holdout_curve)[result.kept_step]
    assert result.loss_reached == result.holdout_curve[-1][1]
    assert held in range(3)
    scored.clear()  # drawn after the first two (which an earlier phase fitted): the third is the one held out
    tune_scales(run, [p], 3, steps=2, lr=0.1, loss="mse", holdout=1, check=1, holdout_from=2)
    assert set(scored) == {2}
    with pytest.raises(ValueError, match="drawn from index 3 on, of 3: too few"):
        tune_scales(run, [p], 3, steps=2, lr=0.1, holdout=1, holdout_from=3)


def test_early_stopping_keeps_the_parameters_of_the_best_check():
    # training on sample 1 alone overshoots the held-out sample 0's optimum (p = 1.3 for both would be ideal): the
    # step kept is the check nearest 1.3, and p is restored to its value there
    xs, ys = (torch.tensor([1.0]), torch.tensor([1.0])), (torch.tensor([1.3]), torch.tensor([3.0]))
    p = torch.nn.Parameter(torch.tensor([1.0]))
    seen = []
    result = tune_scales(lambda i: (p * xs[i], ys[i]), [p], 2, steps=12, lr=0.1, loss="mse", seed=_seed_holding(0),
                         holdout=1, check=1, progress=lambda _: seen.append(float(p.detach())))  # fmt: skip
    best = min(range(len(seen)), key=lambda k: abs(seen[k] - 1.3))
    assert result.kept_step == best + 1 and float(p.detach()) == pytest.approx(seen[best])
    assert 0 < result.kept_step < 12


def _seed_holding(sample: int) -> int:
    """A seed whose held-out choice of one sample among two is ``sample``."""
    import numpy as np

    return next(s for s in range(100) if int(np.random.default_rng(s).permutation(2)[0]) == sample)


def test_a_holdout_that_leaves_nothing_to_train_is_refused():
    with pytest.raises(ValueError, match="holdout must leave samples"):
        tune_scales(lambda i: (XS[i], YS[i]), [], 2, steps=1, lr=0.1, holdout=2)
