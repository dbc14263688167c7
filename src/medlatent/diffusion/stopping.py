"""Early stops of the diffusion classifier chosen for a stated tolerance instead of fixed.

How many draws an image needs depends on how far apart its classes' errors are, which the data
and the model decide, so no fixed rule suits every dataset. Given every draw's errors of a full
run on some images (`classify(stop="none")`), each candidate stop (`Stop`: a rule, its level,
its minimum and its budget of draws) is replayed on them (`replay_early_stop`) and scored against
the full vote by its loss

    loss = metric(full vote) - metric(stopped),

which holds the tolerance where the upper end of its one-sided 95% paired bootstrap interval (the
same resamples of the images for both) does. The stops are tested from the costliest (most network
evaluations per image) to the cheapest, and the testing ends at the first that fails; the chosen
stop is the last that held. Testing in a fixed order this way (Maurer et al. 1995, the
fixed-sequence procedure) keeps at 5% the chance that any stop it accepts breaks the tolerance,
however many are tried; taking the cheapest stop that passes, as a search would, picks among a
hundred stops the one that passed by luck, and such a stop broke the tolerance on images it was
not chosen on.
Every stop is scored the same way, by each class's mean paired evidence over the draws it used
(`classify.evidence_probabilities`), which needs no temperature: images stopped by different rules,
in different folds or at different noise levels rank on one scale. None holding, the full vote is
kept.

`cross_fit_stop` chooses on the other folds of held-out images and applies the choice to each
fold, as the temperature is fitted (`classify.cross_fit`): the images a denoiser was trained on,
its validation images included, are memorised and far easier to stop on than new ones.

Where the same images were also drawn at other noise-level distributions (`--sigma auto` draws
every candidate), a stop may draw at another one: the distribution whose draws rank the images
best decides soonest. Which one that is depends on the finding: a small faint nodule shows only
at small sigma, where the large-sigma draws of the training distribution are wasted; a large mass
shows at large sigma, where the small-sigma draws are. Each distribution is compared by the
tolerance's own metric of the mean paired evidence of its first `PROBE_DRAWS` draws
(`probe_score`) on the other folds, enough draws that the noise of a fold's few images does not
decide, and not by how consistently a draw favours the true class: at large sigma a class may be
favoured on every image alike, which ranks the images no worse but makes the evidence look small.
Where the best alternative ranks better than the run's own distribution, the stop is chosen
among that distribution's stops alone: the run's own stops pass more easily for resembling the
full vote they are measured against, even where they rank the images worse, and trying both
doubles the stops tried on the same images, and with them the chance that one passes by luck.
The loss is still measured against the full vote of the run's own distribution, so the
tolerance keeps its meaning.

`in_sample_limit` tells what limits the chosen stop's cost: of every candidate, the cheapest whose
loss on all the held-out images is within the tolerance. Chosen on the images it is scored on, it
is optimistic. Where it is far cheaper than the stops chosen on the other folds, the images are too
few for a cheaper stop's interval to clear the tolerance; where it is not, the draws themselves
carry too little per evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..evaluation.metrics import bootstrap_indices, replicate_scores, score
from .classify import (
    ALPHA,
    MIN_DRAWS,
    evidence_probabilities,
    replay_early_stop,
    vote_probabilities,
)

TOLERANCE_METRICS = ("auroc", "balanced_accuracy")
LEVELS = (0.001, 0.01, 0.05, 0.2)
MINIMA = (3, 5)
BUDGETS = (4, 5, 7, 10, 15, 25)  # at most this many draws (and the full run's own number)
PROBE_DRAWS = 15  # the draws at which noise-level distributions are compared (at most)


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


def candidates_of(runs: dict) -> list[Stop]:
    """`candidates` at each noise-level distribution of `runs` (sigma, None for the run's own: its
    full run's draw errors (B, J, K)), each fitting in that run's draws."""
    return [stop for sigma, errors in runs.items() for stop in candidates(errors.shape[1], sigma)]


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
    """Of `stops` (default: `candidates`), tested from the costliest to the cheapest until one's
    loss against the full vote on these images exceeds `tolerance` (the upper end of its
    interval), the last that held; the full vote where the costliest already fails.
    `alternatives` maps other noise-level distributions (mean, std of ln sigma) to the same
    images' full runs there (B, J', K): their stops
    (default: `candidates` at that distribution) compete too, always against the full vote of
    `draw_errors`. Returns the stop, its loss and the interval's upper end, its evaluations per
    image (draws used times the classes) and how many candidates were scored."""
    k = draw_errors.shape[2]
    reference = full_vote(draw_errors)
    runs = {None: draw_errors, **(alternatives or {})}
    if stops is None:
        stops = candidates_of(runs)
    replayed = [(stop, *stopped(runs[stop.sigma], stop)) for stop in stops]
    replayed.sort(key=lambda item: -float(item[2].mean()))  # the costliest first
    resamples = bootstrap_indices(labels, task, n_boot, seed)
    # the full vote is the reference itself: no loss, and every draw used
    chosen, tried = (Stop("none"), np.full(len(draw_errors), draw_errors.shape[1]), 0.0, 0.0), 0
    for stop, probs, used in replayed:
        tried += 1
        loss, upper = loss_against(task, labels, reference, probs, metric, resamples)
        if upper > tolerance:
            break
        chosen = (stop, used, loss, upper)
    stop, used, loss, upper = chosen
    return {"stop": stop, "loss": loss, "loss_upper": upper, "evaluations": float(used.mean() * k), "tried": tried}


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
    (B, J', K): on the other folds, the one whose first draws rank the images best (`best_distribution`)
    is drawn at instead of the run's own if they rank them better than the run's own. Returns
    each image's probabilities and draws used under its fold's stop, and each fold's choice with
    its loss on the images it was chosen on and the probe score of each distribution there, each
    image's fold and each fold's `Stop`."""
    n = len(labels)
    folds = max(2, min(folds, n // 10))
    fold = np.random.default_rng(seed).permutation(n) % folds
    probs, used, chosen, stops = np.zeros((n, draw_errors.shape[2])), np.zeros(n, dtype=int), [], []
    for f in range(folds):
        fit, apply = fold != f, fold == f
        probes, runs = best_distribution(draw_errors, alternatives or {}, labels, fit, metric, task)
        choice = choose_stop(
            draw_errors[fit],
            labels[fit],
            tolerance,
            metric,
            task,
            n_boot,
            seed + f,
            # where another distribution ranks better, only its stops are tried: the run's own stops pass more easily
            # for resembling the full vote they are measured against, even where they rank the images worse
            stops=candidates_of(runs) or None,
            alternatives={sigma: errors[fit] for sigma, errors in runs.items()},
        )
        stop = choice["stop"]
        stops.append(stop)
        errors = draw_errors if stop.sigma is None else runs[stop.sigma]
        probs[apply], used[apply] = stopped(errors[apply], stop)
        if stop.rule != "none":
            # onto the full vote's scale, as fitted on the other folds, so that images of folds that kept the
            # full vote and of folds that stopped rank together
            probs[apply] = on_scale_of(stopped(errors[fit], stop)[0], full_vote(draw_errors[fit]), probs[apply])
        chosen.append(
            {**choice, "stop": stop.label(), "sigma": stop.sigma, "images": int(apply.sum()), "probe": probes}
        )
    return {"probs": probs, "draws_used": used, "folds": chosen, "fold": fold, "stops": stops}


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


def probe_score(
    draw_errors: np.ndarray, labels: np.ndarray, metric: str = "auroc", task: str = "binary", draws: int = PROBE_DRAWS
) -> float:
    """How well the first `draws` draws of a full run (B, J, K) rank the images: `metric` of
    their classes' mean paired evidence (`evidence_probabilities`)."""
    used = np.full(len(draw_errors), min(draws, draw_errors.shape[1]))
    return float(score(task, labels, evidence_probabilities(draw_errors, used))[metric])


def best_distribution(
    draw_errors: np.ndarray, alternatives: dict, labels: np.ndarray, fit: np.ndarray, metric: str, task: str
) -> tuple[dict, dict]:
    """On the images `fit`: the probe score (`probe_score`) of the run's own distribution ("run")
    and of each alternative (keyed "MEAN,STD"), and the alternative of the best score, if it ranks
    the images better than the run's own, as {sigma: its draw errors}. All are compared at the same
    number of draws, the fewest any has (at most `PROBE_DRAWS`)."""
    draws = min(PROBE_DRAWS, draw_errors.shape[1], *(errors.shape[1] for errors in alternatives.values()))
    scores = {"run": probe_score(draw_errors[fit], labels[fit], metric, task, draws)}
    for (m, s), errors in alternatives.items():
        scores[f"{m:g},{s:g}"] = probe_score(errors[fit], labels[fit], metric, task, draws)
    best = max(alternatives, key=lambda sigma: scores[f"{sigma[0]:g},{sigma[1]:g}"], default=None)
    if best is None or scores[f"{best[0]:g},{best[1]:g}"] <= scores["run"]:
        return scores, {}
    return scores, {tuple(best): alternatives[best]}


def in_sample_limit(
    draw_errors: np.ndarray,
    labels: np.ndarray,
    tolerance: float,
    metric: str = "auroc",
    task: str = "binary",
    alternatives: dict | None = None,
    share: float = 0.1,
) -> dict:
    """Every candidate stop at the run's own distribution and at each of `alternatives` (as in
    `choose_stop`), and the full vote itself, replayed on all the images and scored against the
    full vote there: the cheapest whose loss is within `tolerance`, and the lowest loss among those
    within `share` of the full vote's evaluations, each with its label, share (of the full vote's
    draws, whatever the draws of its own distribution) and loss (None where there is none)."""
    reference = score(task, labels, full_vote(draw_errors))[metric]
    draws = draw_errors.shape[1]
    cheapest, best = None, None
    runs = {None: draw_errors, **(alternatives or {})}
    for stop in [Stop("none"), *candidates_of(runs)]:
        probs, used = stopped(runs[stop.sigma], stop)
        found = {
            "stop": stop.label(),
            "evaluation_share": float(used.mean() / draws),
            "loss": float(reference - score(task, labels, probs)[metric]),
        }
        cost, loss = found["evaluation_share"], found["loss"]
        if loss <= tolerance and (cheapest is None or cost < cheapest["evaluation_share"]):
            cheapest = found
        if cost <= share and (best is None or loss < best["loss"]):
            best = found
    return {"cheapest_within_tolerance": cheapest, "share": share, "lowest_loss_within_share": best}
