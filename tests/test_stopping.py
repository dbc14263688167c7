"""Early stops chosen for a tolerance, on a denoiser whose class errors are known: the exact denoiser of
two Gaussian classes, N(+m, s^2) and N(-m, s^2) per entry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medlatent.diffusion.classify import classify, classify_held_out, held_out_candidates, held_out_result
from medlatent.diffusion.stopping import (
    Stop,
    candidates,
    choose_stop,
    cross_fit_stop,
    full_vote,
    in_sample_limit,
    probe_score,
    stopped,
)
from medlatent.evaluation.metrics import score


class _ExactGaussian(torch.nn.Module):
    """D(y; sigma, c) = mu_c + s^2 / (sigma^2 + s^2) (y - mu_c): the exact denoiser of class c's data."""

    num_classes, sigma_data, parameterisation, multilabel = 2, 0.5, "edm", False

    def __init__(self, mean: float = 0.1, sd: float = 0.5):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.mean, self.sd = mean, sd

    def forward(self, x, sigma, labels):
        mu = torch.where(labels.view(-1, 1, 1, 1) == 0, self.mean, -self.mean)
        shrink = self.sd**2 / (sigma.view(-1, 1, 1, 1) ** 2 + self.sd**2)
        return mu + shrink * (x - mu)


def draws_of(
    n: int, seed: int, draws: int = 21, sigma: tuple[float, float] = (-1.2, 1.2)
) -> tuple[np.ndarray, np.ndarray]:
    """A full run's draw errors on n images of the two classes (ln sigma ~ N(sigma[0], sigma[1]^2)),
    and their labels."""
    g = torch.Generator().manual_seed(seed)
    labels = np.arange(n) % 2
    mu = torch.where(torch.from_numpy(labels).view(-1, 1, 1, 1) == 0, 0.1, -0.1)
    x = mu + 0.5 * torch.randn(n, 2, 4, 4, generator=g)
    run = classify(_ExactGaussian(), x, draws, stop="none", seed=seed, p_mean=sigma[0], p_std=sigma[1])
    return run["draw_errors"], labels


@pytest.fixture(scope="module")
def validation():
    return draws_of(240, seed=1)


def test_the_chosen_stop_stays_within_the_tolerance_and_costs_less_than_the_full_vote(validation):
    errors, labels = validation
    chosen = choose_stop(errors, labels, tolerance=0.02)
    assert chosen["stop"].rule != "none" and chosen["loss_upper"] <= 0.02
    assert chosen["evaluations"] < 21 * 2
    probs, used = stopped(errors, chosen["stop"])
    assert used.mean() * 2 == pytest.approx(chosen["evaluations"]) and np.allclose(probs.sum(1), 1)


def test_of_two_stops_within_the_tolerance_the_cheaper_is_chosen(validation):
    errors, labels = validation
    cheap, dear = Stop("paired", 0.2, 3, 4), Stop("decided")
    both = [dear, cheap]
    assert all(choose_stop(errors, labels, 1.0, stops=[s])["stop"] == s for s in both)  # each meets it alone
    chosen = choose_stop(errors, labels, tolerance=1.0, stops=both)
    assert chosen["stop"] == cheap and chosen["tried"] == 2  # the costlier tested first
    assert chosen["evaluations"] < choose_stop(errors, labels, 1.0, stops=[dear])["evaluations"]


def test_the_testing_ends_at_the_first_stop_that_breaks_the_tolerance(validation):
    errors, labels = validation
    dear, broken, cheap = Stop("decided"), Stop("paired", 0.2, 3, 5), Stop("paired", 0.2, 3, 4)
    losses = {s: choose_stop(errors, labels, 1.0, stops=[s])["loss_upper"] for s in (dear, broken, cheap)}
    between = (losses[dear] + losses[broken]) / 2  # a tolerance the costliest meets and the middle one breaks
    assert losses[dear] < between < losses[broken]
    chosen = choose_stop(errors, labels, between, stops=[cheap, broken, dear])
    assert chosen["stop"] == dear and chosen["tried"] == 2  # the cheapest, tested after the failure, is never tried


def test_no_stop_within_the_tolerance_keeps_the_full_vote(validation):
    errors, labels = validation
    chosen = choose_stop(errors, labels, tolerance=-1.0, stops=[Stop("paired", 0.2, 3, 4)])
    assert chosen["stop"] == Stop("none") and chosen["evaluations"] == 21 * 2


def test_cross_fitted_stops_are_chosen_on_the_other_folds():
    errors, labels = draws_of(200, seed=2)
    result = cross_fit_stop(errors, labels, tolerance=0.02, folds=4)
    assert len(result["folds"]) == 4 and sum(f["images"] for f in result["folds"]) == 200
    assert all(f["loss_upper"] <= 0.02 for f in result["folds"])
    assert result["draws_used"].mean() < 21 and result["probs"].shape == (200, 2)


def test_the_candidates_fit_in_the_draws():
    stops = candidates(21)
    assert Stop("decided") in stops and all((s.max_draws or 21) <= 21 for s in stops)
    assert all(s.min_draws <= (s.max_draws or 21) for s in stops)
    assert {s.max_draws for s in stops if s.rule == "paired"} == {4, 5, 7, 10, 15, 21}


def test_draws_at_the_noise_levels_that_rank_best_stop_sooner():
    # the exact denoiser tells the classes apart by their means, which show at large sigma: at small sigma both
    # classes return the noised latent almost unchanged
    small, labels = draws_of(200, seed=2, sigma=(-1.0, 0.3))
    large, same_labels = draws_of(200, seed=2, sigma=(1.0, 0.3))
    assert np.array_equal(labels, same_labels)
    assert probe_score(large, labels) > probe_score(small, labels)
    alone = cross_fit_stop(small, labels, tolerance=0.02, folds=4)
    both = cross_fit_stop(small, labels, tolerance=0.02, folds=4, alternatives={(1.0, 0.3): large})
    assert all(f["sigma"] == (1.0, 0.3) and f["loss_upper"] <= 0.02 for f in both["folds"])
    assert both["folds"][0]["probe"]["1,0.3"] > both["folds"][0]["probe"]["run"]
    assert both["draws_used"].mean() < alone["draws_used"].mean()


def test_the_in_sample_limit_is_no_dearer_than_the_stop_chosen_on_the_same_images(validation):
    errors, labels = validation
    chosen = choose_stop(errors, labels, tolerance=0.02)
    limit = in_sample_limit(errors, labels, tolerance=0.02, share=0.2)
    cheapest, best = limit["cheapest_within_tolerance"], limit["lowest_loss_within_share"]
    # the chosen stop's loss on these images lies below its interval's upper end, so it is one of those within
    # the tolerance here, and the cheapest of them costs no more
    assert cheapest["loss"] <= 0.02 and cheapest["evaluation_share"] * 21 * 2 <= chosen["evaluations"] + 1e-9
    # the lowest loss within a fifth of the evaluations is no higher than that of one such stop
    probs, used = stopped(errors, Stop("paired", 0.2, 3, 4))
    one = score("binary", labels, full_vote(errors))["auroc"] - score("binary", labels, probs)["auroc"]
    assert used.mean() / 21 <= 0.2 and best["evaluation_share"] <= 0.2 and best["loss"] <= one + 1e-12
    strict = in_sample_limit(errors, labels, tolerance=-1.0, share=0.0)
    assert strict["cheapest_within_tolerance"] is None and strict["lowest_loss_within_share"] is None


def test_the_in_sample_limit_counts_every_distribution_in_the_full_vote_s_draws(validation):
    errors, labels = validation  # 21 draws
    alternative, _ = draws_of(240, seed=1, draws=5, sigma=(0.0, 0.6))
    limit = in_sample_limit(errors, labels, tolerance=1.0, alternatives={(0.0, 0.6): alternative}, share=1.0)
    cheapest = limit["cheapest_within_tolerance"]
    # the cheapest stop uses 3 or 4 draws: a share of the full vote's 21, not of the alternative's 5
    _, used = stopped(alternative, Stop("paired", 0.2, 3, 4, (0.0, 0.6)))
    assert 3 / 21 <= cheapest["evaluation_share"] <= used.mean() / 21 <= 4 / 21


def test_the_held_out_result_is_built_from_the_draws_as_classify_held_out_draws_them():
    g = torch.Generator().manual_seed(5)
    labels = np.arange(40) % 2
    x = torch.where(torch.from_numpy(labels).view(-1, 1, 1, 1) == 0, 0.1, -0.1) + 0.5 * torch.randn(
        40, 2, 4, 4, generator=g
    )
    denoiser, training, extra = _ExactGaussian(), (-1.2, 0.6), ((-3.0, 0.6), (-1.2, 0.6))  # training is a candidate
    full = classify_held_out(denoiser, x, labels, 6, "auto", training, seed=3, stop_candidates=extra)
    candidates = held_out_candidates("auto", training)
    assert len(candidates) == len(set(candidates)) == 6 and full["candidates"] == candidates

    def run(sigma, draws):
        return classify(denoiser, x, draws, stop="none", seed=3, p_mean=sigma[0], p_std=sigma[1])["draw_errors"]

    rebuilt = held_out_result({c: run(c, 6) for c in candidates}, {c: run(c, 6) for c in extra}, labels, seed=3)
    for key in ("draw_errors", "mean_errors", "votes", "draws_used", "temperature", "sigma"):
        assert np.allclose(rebuilt[key], full[key]), key
    # five distributions not chosen, drawn 6 times, and one further one (the other is drawn in full), for 2 classes
    assert rebuilt["calibration_evaluations_per_image"] == full["calibration_evaluations_per_image"] == (5 * 6 + 6) * 2
