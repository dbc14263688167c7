"""Early stops of the diffusion classifier chosen for a stated tolerance instead of fixed.

How many draws an image needs depends on how far apart its classes' errors are, which the data
and the model decide, so no fixed rule suits every dataset. Given every draw's errors of a full
run on some images (`classify(stop="none")`), each candidate stop (`Stop`: a rule, its level,
its minimum and its budget of draws) is replayed on them (`replay_early_stop`) and scored against
the full vote; the chosen stop is the cheapest (fewest network evaluations per image) whose loss

    loss = metric(full vote) - metric(stopped)

stays within the tolerance at the upper end of its one-sided 95% paired bootstrap interval (the
same resamples of the images for both), so a stop is chosen only where the images show it holds.
Every stop is scored the same way, by each class's mean paired evidence over the draws it used
(`classify.evidence_probabilities`), which needs no temperature: images stopped by different rules,
in different folds or at different noise levels rank on one scale. None holding, the full vote is
kept.

`cross_fit_stop` chooses on the other folds of held-out images and applies the choice to each
fold, as the temperature is fitted (`classify.cross_fit`): the images a denoiser was trained on,
its validation images included, are memorised and far easier to stop on than new ones.

Where the same images were also drawn at other noise-level distributions (`--sigma auto` draws
every candidate), a stop may draw at another one: the draws whose paired evidence about the class
is largest (`evidence_per_draw`) decide soonest. The training distribution spends many draws at
large sigma, where both classes denoise alike; on the synthetic benchmark one draw at
ln sigma ~ N(-1.2, 0.6^2) carries 0.87 standard deviations of evidence against 0.65 at the
training distribution's N(-1.2, 1.2^2). An alternative competes only where its evidence per draw
is at least `EVIDENCE_GAIN` times the run's own: a sequential test's draws fall with the square
of the evidence, so a smaller gain saves little, and every distribution that competes doubles
the stops tried on the same images, and with them the chance that one passes by luck. The loss
is still measured against the full vote of the run's own distribution, so the tolerance keeps
its meaning.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..evaluation.metrics import bootstrap_indices, replicate_scores, score
from .classify import (
    ALPHA,
    MIN_DRAWS,
    evidence_probabilities,
    pair_terms,
    replay_early_stop,
    vote_probabilities,
)

TOLERANCE_METRICS = ("auroc", "balanced_accuracy")
LEVELS = (0.001, 0.01, 0.05, 0.2)
MINIMA = (3, 5)
BUDGETS = (4, 5, 7, 10, 15, 25)  # at most this many draws (and the full run's own number)
EVIDENCE_GAIN = 1.25  # an alternative noise-level distribution competes from this much more evidence per draw


@dataclass(frozen=True)
class Stop:
    """An early stop: `rule` ("none", "decided", "sequential", "paired"), the sequential tests'
    level `alpha`, the draws before they may stop, their budget `max_draws` (None: the draws), and
    the noise levels its draws take, ln sigma ~ N(mean, std^2) (None: the run's own)."""

    rule: str
    alpha: float = ALPHA
    min_draws: int = MIN_DRAWS
    max_draws: int | None = None
    sigma: tuple[float, float] | None = None

    def label(self) -> str:
        where = f", ln sigma ~ N({self.sigma[0]:g}, {self.sigma[1]:g}^2)" if self.sigma else ""
        if self.rule in ("none", "decided"):
            return {"none": "full vote", "decided": "vote, stopped when decided"}[self.rule] + where
        budget = f", at most {self.max_draws} draws" if self.max_draws else ""
        test = "paired sequential test" if self.rule == "paired" else "sequential test"
        return f"{test} (alpha {self.alpha:g}, at least {self.min_draws}{budget}{where})"


def candidates(draws: int, sigma: tuple[float, float] | None = None) -> list[Stop]:
    """The stops a tolerance chooses from, for runs of `draws` draws (at noise levels `sigma`):
    stopped when decided, and each sequential test at every level, minimum and budget that fits
    in the draws."""
    budgets = sorted({b for b in BUDGETS if b < draws} | {draws})
    found = [Stop("decided", sigma=sigma)]
    for rule in ("paired", "sequential"):
        for alpha in LEVELS:
            for least in (m for m in MINIMA if m <= draws):
                found += [Stop(rule, alpha, least, b, sigma) for b in budgets if b >= least]
    return found


def evidence_per_draw(draw_errors: np.ndarray, labels: np.ndarray) -> float:
    """The evidence one draw carries about the class: over the images and draws of a full run
    (B, J, K), the mean of the true class's paired evidence against the others (`pair_terms`
    r[y, c], averaged over c != y) divided by its standard deviation. A sequential test needs
    about (z / this)^2 draws to decide, so the larger, the sooner the draws decide."""
    errors = np.asarray(draw_errors, dtype=float)
    b, j, k = errors.shape
    r = pair_terms(torch.from_numpy(errors.reshape(b * j, k))).numpy().reshape(b, j, k, k)
    truth = r[np.arange(b), :, labels]  # (B, J, K): r[y, c] for every class c, 0 at c = y
    d = truth.sum(2) / max(k - 1, 1)
    return float(d.mean() / max(d.std(), 1e-12))


def stopped(draw_errors: np.ndarray, stop: Stop) -> tuple[np.ndarray, np.ndarray]:
    """`stop` replayed on a full run's draw errors (B, J, K): each image's probabilities from the
    mean paired evidence of the draws it used (`evidence_probabilities`), and the draws it used.
    The rule decides how many draws an image takes; every rule is scored the same way, but for
    "none", the full vote itself (`full_vote`), so that keeping every draw loses nothing against it."""
    if stop.rule == "none":
        return full_vote(draw_errors), np.full(len(draw_errors), draw_errors.shape[1])
    _, used, _ = replay_early_stop(draw_errors, stop.rule, stop.alpha, stop.min_draws, stop.max_draws)
    return evidence_probabilities(draw_errors, used), used


def full_vote(draw_errors: np.ndarray) -> np.ndarray:
    """The full vote's probabilities (vote shares, ties broken by the paired evidence): the reference
    a stop's loss is measured against."""
    n, draws, k = draw_errors.shape
    votes = np.eye(k)[draw_errors.argmin(2)].sum(1)
    return vote_probabilities(votes, np.full(n, draws), draw_errors)


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
    tolerance: float,
    metric: str = "auroc",
    task: str = "binary",
    n_boot: int = 200,
    seed: int = 0,
    stops: list[Stop] | None = None,
    alternatives: dict | None = None,
) -> dict:
    """The cheapest of `stops` (default: `candidates`) whose loss against the full vote on these
    images stays within `tolerance` (the upper end of its interval); the full vote where none does.
    `alternatives` maps other noise-level distributions (mean, std of ln sigma) to the same
    images' full runs there (B, J', K): their stops
    (default: `candidates` at that distribution) compete too, always against the full vote of
    `draw_errors`. Returns the stop, its loss and the interval's upper end, its evaluations per
    image (draws used times the classes) and how many candidates were scored."""
    k = draw_errors.shape[2]
    reference = full_vote(draw_errors)
    runs = {None: draw_errors, **(alternatives or {})}
    if stops is None:
        stops = [stop for sigma, errors in runs.items() for stop in candidates(errors.shape[1], sigma)]
    replayed = [(stop, *stopped(runs[stop.sigma], stop)) for stop in stops]
    replayed.sort(key=lambda item: float(item[2].mean()))
    every = Stop("none")
    replayed.append((every, *stopped(draw_errors, every)))
    resamples = bootstrap_indices(labels, task, n_boot, seed)
    for tried, (stop, probs, used) in enumerate(replayed, 1):
        loss, upper = loss_against(task, labels, reference, probs, metric, resamples)
        if upper <= tolerance or stop is every:
            return {
                "stop": stop,
                "loss": loss,
                "loss_upper": upper,
                "evaluations": float(used.mean() * k),
                "tried": tried,
            }
    raise AssertionError("unreachable: the full vote is the last candidate")


def cross_fit_stop(
    draw_errors: np.ndarray,
    labels: np.ndarray,
    tolerance: float,
    metric: str = "auroc",
    task: str = "binary",
    seed: int = 0,
    folds: int = 5,
    n_boot: int = 200,
    alternatives: dict | None = None,
) -> dict:
    """Per fold of held-out images, the stop chosen on the other folds (`choose_stop`) applied to
    it. `alternatives` maps other noise-level distributions to the same images' full runs there
    (B, J', K): on the other folds, the one whose draws carry the most evidence (`evidence_per_draw`)
    competes with the run's own distribution if it carries `EVIDENCE_GAIN` times as much. Returns
    each image's probabilities and draws used under its fold's stop, and each fold's choice with
    its loss on the images it was chosen on and the evidence per draw of each distribution there."""
    n = len(labels)
    folds = max(2, min(folds, n // 10))
    fold = np.random.default_rng(seed).permutation(n) % folds
    probs, used, chosen = np.zeros((n, draw_errors.shape[2])), np.zeros(n, dtype=int), []
    for f in range(folds):
        fit, apply = fold != f, fold == f
        evidence, runs = most_evidence(draw_errors, alternatives or {}, labels, fit)
        choice = choose_stop(
            draw_errors[fit],
            labels[fit],
            tolerance,
            metric,
            task,
            n_boot,
            seed + f,
            alternatives={sigma: errors[fit] for sigma, errors in runs.items()},
        )
        stop = choice["stop"]
        errors = draw_errors if stop.sigma is None else runs[stop.sigma]
        probs[apply], used[apply] = stopped(errors[apply], stop)
        if stop.rule != "none":
            # onto the full vote's scale, as fitted on the other folds, so that images of folds that kept the
            # full vote and of folds that stopped rank together
            probs[apply] = on_scale_of(stopped(errors[fit], stop)[0], full_vote(draw_errors[fit]), probs[apply])
        chosen.append(
            {**choice, "stop": stop.label(), "sigma": stop.sigma, "images": int(apply.sum()), "evidence": evidence}
        )
    return {"probs": probs, "draws_used": used, "folds": chosen}


def on_scale_of(scores: np.ndarray, target: np.ndarray, new: np.ndarray) -> np.ndarray:
    """`new` (B, K) mapped class by class onto the scale of `target` by quantile matching, as
    `scores` relates to `target` on the same images (the monotone map taking the empirical
    distribution of one onto the other), then renormalised: each class's order is kept."""
    mapped = np.empty_like(new)
    for a in range(new.shape[1]):
        level = np.searchsorted(np.sort(scores[:, a]), new[:, a], side="right") / len(scores)
        mapped[:, a] = np.quantile(target[:, a], np.clip(level, 0, 1))
    mapped = np.clip(mapped, 1e-12, None)
    return mapped / mapped.sum(1, keepdims=True)


def most_evidence(draw_errors: np.ndarray, alternatives: dict, labels: np.ndarray, fit: np.ndarray):
    """On the images `fit`: the evidence per draw of the run's own distribution ("run") and of each
    alternative (keyed "MEAN,STD"), and the alternative of most evidence, if it carries
    `EVIDENCE_GAIN` times the run's own, as {sigma: its draw errors}."""
    evidence = {"run": evidence_per_draw(draw_errors[fit], labels[fit])}
    for (m, s), errors in alternatives.items():
        evidence[f"{m:g},{s:g}"] = evidence_per_draw(errors[fit], labels[fit])
    best = max(alternatives, key=lambda sigma: evidence[f"{sigma[0]:g},{sigma[1]:g}"], default=None)
    if best is None or evidence[f"{best[0]:g},{best[1]:g}"] < EVIDENCE_GAIN * evidence["run"]:
        return evidence, {}
    return evidence, {tuple(best): alternatives[best]}
