"""Scores across runs (folds x seeds): the headline is the mean of the per-run scores.

Each run has its own test set and its own model, whose scores may sit on a scale of their own, so
out-of-fold predictions are never pooled into one AUROC for the headline (with weak models that
ranks one fold's negatives above another's positives). Instead, for every space:

    headline = mean over runs r of score_r

with a 95% interval by one of two methods, named in the results:

- "bootstrap": B resamples of each run's test set, the same resamples for every space (and for
  every seed of the same split); replicate b is the mean over runs of the score on resample b.
  The interval of a difference between spaces (a gap) is therefore paired.
- "t": a t interval over the per-run scores (or per-run differences), used by default when there
  are at least 5 runs, since it also covers the variation between trainings.

Gaps follow one sign convention everywhere: space before minus space after.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from .metrics import METRICS, bootstrap_indices, interval, paired_test, replicate_scores, score

T_MIN_RUNS = 5


def resolve_method(method: str, runs: int) -> str:
    """ "auto" is the t interval from T_MIN_RUNS runs on, the paired bootstrap below that."""
    if method == "auto":
        return "t" if runs >= T_MIN_RUNS else "bootstrap"
    return method


@dataclass
class RunTests:
    """The test labels of every run and each run's bootstrap resamples (shared by all spaces)."""

    names: list[str]
    labels: list[np.ndarray]
    resamples: list[np.ndarray]

    @classmethod
    def build(
        cls, names: list[str], labels: list[np.ndarray], groups: list[int], task: str, n_boot: int, seed: int
    ) -> RunTests:
        """`groups[r]` names run r's test set (its split): runs on the same split share resamples."""
        drawn: dict[int, np.ndarray] = {}
        resamples = []
        for label, group in zip(labels, groups, strict=False):
            if group not in drawn:
                drawn[group] = bootstrap_indices(label, task, n_boot, seed=seed + group)
            resamples.append(drawn[group])
        return cls(names, labels, resamples)


@dataclass
class RunScores:
    """Per-run point scores, shape (R,), and bootstrap replicates, shape (R, B), per metric."""

    points: dict[str, np.ndarray]
    replicates: dict[str, np.ndarray]

    @classmethod
    def of(cls, task: str, runs: RunTests, probs: list[np.ndarray]) -> RunScores:
        per_run = [score(task, y, p) for y, p in zip(runs.labels, probs, strict=False)]
        reps = [
            replicate_scores(task, y, p, idx) for y, p, idx in zip(runs.labels, probs, runs.resamples, strict=False)
        ]
        return cls(
            {m: np.array([s[m] for s in per_run]) for m in METRICS},
            {m: np.stack([r[m] for r in reps]) for m in METRICS},
        )

    def __sub__(self, other: RunScores) -> RunScores:
        return RunScores(
            {m: self.points[m] - other.points[m] for m in METRICS},
            {m: self.replicates[m] - other.replicates[m] for m in METRICS},
        )

    def mean_replicates(self, metric: str) -> np.ndarray:
        """Replicate b of the headline: the mean over runs of each run's score on resample b."""
        with np.errstate(invalid="ignore"):
            return np.nanmean(self.replicates[metric], axis=0)

    def summary(self, method: str) -> dict[str, dict]:
        """{metric: {"value", "ci95"}} with the headline = mean of the per-run scores."""
        return {m: {"value": float(np.nanmean(self.points[m])), "ci95": self.interval(m, method)} for m in METRICS}

    def interval(self, metric: str, method: str) -> tuple[float, float]:
        if method == "t":
            return t_interval(self.points[metric])
        return interval(self.mean_replicates(metric))


def t_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """mean +- t_{(1+level)/2, n-1} * sd / sqrt(n) over runs."""
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return (float("nan"), float("nan"))
    half = stats.t.ppf((1 + level) / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


def gap_summary(before: RunScores, after: RunScores, method: str) -> dict[str, dict]:
    """Gap = before - after per metric, its interval, whether it excludes 0, and the paired tests
    across runs of the same difference (when there are at least 2 runs)."""
    diff = before - after
    out = {}
    for m, entry in diff.summary(method).items():
        lo, hi = entry["ci95"]
        entry["excludes_zero"] = bool(lo > 0 or hi < 0)
        entry["paired_test"] = paired_test(before.points[m], after.points[m]) if len(before.points[m]) >= 2 else None
        out[m] = entry
    return out


def share_closed(variant: RunScores, before: RunScores, after: RunScores, gap: dict) -> dict[str, dict | None]:
    """(score(variant) - score(after)) / (score(before) - score(after)) per metric, from the means;
    undefined (None) where the gap's interval contains zero. Interval: paired bootstrap replicates."""
    out: dict[str, dict | None] = {}
    for m in METRICS:
        lo, hi = gap[m]["ci95"]
        if not (lo > 0 or hi < 0):
            out[m] = None
            continue
        v, b, a = (np.nanmean(s.points[m]) for s in (variant, before, after))
        with np.errstate(divide="ignore", invalid="ignore"):
            reps = (variant.mean_replicates(m) - after.mean_replicates(m)) / (
                before.mean_replicates(m) - after.mean_replicates(m)
            )
        reps = np.where(np.isfinite(reps), reps, np.nan)  # a resample whose gap is exactly 0 has no share
        out[m] = {"value": float((v - a) / (b - a)), "ci95": interval(reps), "method": "bootstrap"}
    return out
