"""Early stops of the diffusion classifier chosen for a stated tolerance instead of fixed.

How many draws an image needs depends on how far apart its classes' errors are, which the data
and the model decide, so no fixed rule suits every dataset. Given every draw's errors of a full
run on some images (`classify(stop="none")`), each candidate stop (`Stop`: a rule, its level,
its minimum and its budget of draws) is replayed on them (`replay_early_stop`) and scored against
the full vote; the chosen stop is the cheapest (fewest network evaluations per image) whose loss

    loss = metric(full vote) - metric(stopped)

stays within the tolerance at the upper end of its one-sided 95% paired bootstrap interval (the
same resamples of the images for both), so a stop is chosen only where the images show it holds.
None holding, the full vote is kept.

`cross_fit_stop` chooses on the other folds of held-out images and applies the choice to each
fold, as the temperature is fitted (`classify.cross_fit`): the images a denoiser was trained on,
its validation images included, are memorised and far easier to stop on than new ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..evaluation.metrics import bootstrap_indices, replicate_scores, score
from .classify import ALPHA, MIN_DRAWS, error_probabilities, replay_early_stop, vote_probabilities

TOLERANCE_METRICS = ("auroc", "balanced_accuracy")
LEVELS = (0.001, 0.01, 0.05, 0.2)
MINIMA = (3, 5)
BUDGETS = (4, 5, 7, 10, 15, 25)  # at most this many draws (and the full run's own number)


@dataclass(frozen=True)
class Stop:
    """An early stop: `rule` ("none", "decided", "sequential", "paired"), the sequential tests'
    level `alpha`, the draws before they may stop, and their budget `max_draws` (None: the draws)."""

    rule: str
    alpha: float = ALPHA
    min_draws: int = MIN_DRAWS
    max_draws: int | None = None

    def label(self) -> str:
        if self.rule in ("none", "decided"):
            return {"none": "full vote", "decided": "vote, stopped when decided"}[self.rule]
        budget = f", at most {self.max_draws} draws" if self.max_draws else ""
        test = "paired sequential test" if self.rule == "paired" else "sequential test"
        return f"{test} (alpha {self.alpha:g}, at least {self.min_draws}{budget})"


def candidates(draws: int) -> list[Stop]:
    """The stops a tolerance chooses from, for runs of `draws` draws: stopped when decided, and each
    sequential test at every level, minimum and budget that fits in the draws."""
    budgets = sorted({b for b in BUDGETS if b < draws} | {draws})
    found = [Stop("decided")]
    for rule in ("paired", "sequential"):
        for alpha in LEVELS:
            for least in (m for m in MINIMA if m <= draws):
                found += [Stop(rule, alpha, least, b) for b in budgets if b >= least]
    return found


def stopped(draw_errors: np.ndarray, stop: Stop, temperature) -> tuple[np.ndarray, np.ndarray]:
    """`stop` replayed on a full run's draw errors (B, J, K): each image's probabilities (the mean
    error's softmax for the paired test, which decides on the errors; the vote shares otherwise)
    and the draws it used."""
    votes, used, mean = replay_early_stop(draw_errors, stop.rule, stop.alpha, stop.min_draws, stop.max_draws)
    if stop.rule == "paired":
        return error_probabilities(mean, temperature), used
    return vote_probabilities(votes, used, draw_errors), used


def loss_against(task: str, labels, reference, probs, metric: str, resamples) -> tuple[float, float]:
    """metric(reference) - metric(probs) and the upper end of its one-sided 95% paired bootstrap interval."""
    point = score(task, labels, reference)[metric] - score(task, labels, probs)[metric]
    replicates = (
        replicate_scores(task, labels, reference, resamples)[metric]
        - replicate_scores(task, labels, probs, resamples)[metric]
    )
    return float(point), float(np.nanpercentile(replicates, 95))


def choose_stop(
    draw_errors: np.ndarray,
    labels: np.ndarray,
    temperature,
    tolerance: float,
    metric: str = "auroc",
    task: str = "binary",
    n_boot: int = 200,
    seed: int = 0,
    stops: list[Stop] | None = None,
) -> dict:
    """The cheapest of `stops` (default: `candidates`) whose loss against the full vote on these
    images stays within `tolerance` (the upper end of its interval); the full vote where none does.
    Returns the stop, its loss and the interval's upper end, its evaluations per image (draws
    used times the classes) and how many candidates were scored."""
    k = draw_errors.shape[2]
    full = Stop("none")
    reference, _ = stopped(draw_errors, full, temperature)
    replayed = [
        (stop, *stopped(draw_errors, stop, temperature)) for stop in (stops or candidates(draw_errors.shape[1]))
    ]
    replayed.sort(key=lambda item: float(item[2].mean()))
    resamples = bootstrap_indices(labels, task, n_boot, seed)
    for tried, (stop, probs, used) in enumerate(replayed, 1):
        loss, upper = loss_against(task, labels, reference, probs, metric, resamples)
        if upper <= tolerance:
            return {
                "stop": stop,
                "loss": loss,
                "loss_upper": upper,
                "evaluations": float(used.mean() * k),
                "tried": tried,
            }
    return {
        "stop": full,
        "loss": 0.0,
        "loss_upper": 0.0,
        "evaluations": float(draw_errors.shape[1] * k),
        "tried": len(replayed),
    }


def cross_fit_stop(
    draw_errors: np.ndarray,
    labels: np.ndarray,
    temperature,
    tolerance: float,
    metric: str = "auroc",
    task: str = "binary",
    seed: int = 0,
    folds: int = 5,
    n_boot: int = 200,
) -> dict:
    """Per fold of held-out images, the stop chosen on the other folds (`choose_stop`) applied to
    it. Returns each image's probabilities and draws used under its fold's stop, and each fold's
    choice with its loss on the images it was chosen on."""
    n = len(labels)
    folds = max(2, min(folds, n // 10))
    fold = np.random.default_rng(seed).permutation(n) % folds
    temperature = np.broadcast_to(np.asarray(temperature, dtype=float), (n,))
    probs, used, chosen = np.zeros((n, draw_errors.shape[2])), np.zeros(n, dtype=int), []
    for f in range(folds):
        fit, apply = fold != f, fold == f
        choice = choose_stop(
            draw_errors[fit], labels[fit], temperature[fit], tolerance, metric, task, n_boot, seed + f
        )
        probs[apply], used[apply] = stopped(draw_errors[apply], choice["stop"], temperature[apply])
        chosen.append({**choice, "stop": choice["stop"].label(), "images": int(apply.sum())})
    return {"probs": probs, "draws_used": used, "folds": chosen}
