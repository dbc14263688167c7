"""What the run-folder commands report of a classifier trained once per run (fold x seed): its
training health, curves and diagnostics; its scores pooled over the folds; its sigma sweep.

A run's record is what the command stored of one fit: test probabilities `probs` and, for a deep
model, `best_epoch`, `stop_reason`, `warm_start` and its curves as `history_<name>` arrays.
"""

from __future__ import annotations

import numpy as np

from .aggregate import RunTests
from .diagnostics import calibration, confusion, mean_roc, per_class
from .health import health_flags
from .metrics import METRICS, score

HISTORY = "history_"


def history_of(record: dict) -> dict:
    """A run's training curves by name (empty for a model without, e.g. a linear probe)."""
    return {k[len(HISTORY) :]: v for k, v in record.items() if k.startswith(HISTORY)}


def run_health(task: str, names: list[str], records: list[dict]) -> list[dict]:
    """Each run's training-health flags (`evaluation.health`), best epoch, epochs run and stop reason."""
    health = []
    for name, r in zip(names, records, strict=True):
        history = history_of(r)
        best = int(r["best_epoch"]) if r.get("best_epoch") is not None else None
        health.append(
            {
                "run": name,
                "flags": health_flags(task, r["probs"], history or None, best, bool(r.get("warm_start", False))),
                "best_epoch": best,
                "epochs_run": len(history["loss"]) if history else None,
                "stop_reason": str(r["stop_reason"]) if "stop_reason" in r else None,
            }
        )
    return health


def classifier_summary(task: str, tests: RunTests, records: list[dict]) -> dict:
    """Health per run, training curves, confusion matrix, per-class metrics, calibration and ROC of one classifier."""
    health = run_health(task, tests.names, records)
    curves = [
        {"run": name, **{k: np.round(v, 5).tolist() for k, v in history_of(r).items()}}
        for name, r in zip(tests.names, records, strict=True)
        if history_of(r)
    ]
    probs = [r["probs"] for r in records]
    cm = confusion(task, tests.labels, probs)
    return {
        "flagged": any(h["flags"] for h in health),
        "health": health,
        "curves": curves,
        "confusion": cm,
        "per_class": per_class(task, cm),
        "calibration": calibration(task, tests.labels, probs),
        "roc": mean_roc(task, tests.labels, probs),
    }


def pooled_out_of_fold(task: str, labels: np.ndarray, tests: list[np.ndarray], records: list[dict]) -> dict:
    """Out-of-fold predictions of every fold pooled into one score, averaged over seeds (a secondary
    figure: it pools the predictions of different models). `tests`: each fold's test indices;
    `records`: the runs seed by seed, each seed's folds in the order of `tests`."""
    test = np.concatenate(tests)
    folds = len(tests)
    per_seed = [
        score(task, labels[test], np.concatenate([r["probs"] for r in records[i : i + folds]]))
        for i in range(0, len(records), folds)
    ]
    return {m: float(np.mean([p[m] for p in per_seed])) for m in METRICS}


def sigma_sweep(task: str, tests: RunTests, records: list[dict]) -> dict:
    """AUROC and balanced accuracy at each swept sigma: the mean of the per-run scores."""
    sigmas = records[0]["sweep_sigmas"]
    sweep = {"sigma": sigmas.tolist(), "auroc": [], "balanced_accuracy": []}
    for k in range(len(sigmas)):
        per_run = [score(task, y, r["sweep_probs"][k]) for y, r in zip(tests.labels, records, strict=True)]
        for m in ("auroc", "balanced_accuracy"):
            sweep[m].append(float(np.nanmean([p[m] for p in per_run])))
    return sweep
