"""Scores across runs, training health and the per-classifier diagnostics."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medlatent.evaluation.aggregate import RunScores, RunTests, gap_summary, resolve_method, t_interval
from medlatent.evaluation.diagnostics import calibration, confusion, mean_roc, per_class
from medlatent.evaluation.health import health_flags


def _shifted_folds(rng, folds=3, n=60):
    """Each fold's model ranks its own test set well, but on a scale shifted by fold."""
    labels, probs = [], []
    for k in range(folds):
        y = np.repeat([0, 1], n // 2)
        p1 = 0.15 * y + rng.normal(0, 0.08, n) + 0.3 * k  # fold k's scores sit 0.3 * k higher
        p1 = np.clip(p1, 0, 1)
        labels.append(y)
        probs.append(np.stack([1 - p1, p1], 1))
    return labels, probs


def test_headline_is_the_mean_of_per_fold_scores_not_the_pooled_score():
    labels, probs = _shifted_folds(np.random.default_rng(0))
    tests = RunTests.build(["fold0", "fold1", "fold2"], labels, [0, 1, 2], "binary", 200, seed=0)
    summary = RunScores.of("binary", tests, probs).summary("bootstrap")["auroc"]
    per_fold = [roc_auc_score(y, p[:, 1]) for y, p in zip(labels, probs, strict=False)]
    pooled = roc_auc_score(np.concatenate(labels), np.concatenate(probs)[:, 1])
    assert summary["value"] == pytest.approx(np.mean(per_fold))
    assert pooled < summary["value"] - 0.1  # what the old headline reported
    assert summary["ci95"][0] < summary["value"] < summary["ci95"][1]


def test_gap_is_before_minus_after_and_its_paired_test_agrees():
    rng = np.random.default_rng(1)
    labels, good = _shifted_folds(rng)
    weak = [np.clip(p + rng.normal(0, 0.25, p.shape), 0, 1) for p in good]
    tests = RunTests.build(["a", "b", "c"], labels, [0, 1, 2], "binary", 200, seed=0)
    before, after = RunScores.of("binary", tests, good), RunScores.of("binary", tests, weak)
    gap = gap_summary(before, after, "bootstrap")["auroc"]
    assert gap["value"] > 0.05 and gap["value"] == pytest.approx(
        before.points["auroc"].mean() - after.points["auroc"].mean()
    )
    assert gap["paired_test"]["mean_difference"] == pytest.approx(gap["value"])  # same sign, same size
    assert gap["excludes_zero"] and gap["ci95"][0] > 0


def test_interval_methods():
    assert (
        resolve_method("auto", 4) == "bootstrap"
        and resolve_method("auto", 5) == "t"
        and resolve_method("bootstrap", 10) == "bootstrap"
    )
    lo, hi = t_interval(np.array([0.80, 0.82, 0.78, 0.81, 0.79]))
    assert lo < 0.80 < hi and hi - lo == pytest.approx(
        2 * 2.776 * np.std([0.80, 0.82, 0.78, 0.81, 0.79], ddof=1) / np.sqrt(5), rel=1e-3
    )
    # Runs on the same split share their resamples (paired across seeds as across spaces).
    y = np.repeat([0, 1], 10)
    tests = RunTests.build(["f0/s0", "f0/s1"], [y, y], [0, 0], "binary", 100, seed=0)
    assert tests.resamples[0] is tests.resamples[1]


def test_constant_and_collapsed_classifiers_are_flagged():
    rng = np.random.default_rng(0)
    constant = np.tile([0.48, 0.52], (40, 1)) + rng.uniform(-0.02, 0.02, (40, 1)) * [1, -1]
    flags = health_flags("binary", constant, {"val_balanced_accuracy": np.array([0.5, 0.5, 0.5])}, best_epoch=0)
    assert (
        any("never left chance" in f for f in flags)
        and any("first of 3" in f for f in flags)
        and any("constant" in f for f in flags)
    )
    p1 = rng.uniform(0, 1, 40)
    healthy = np.stack([1 - p1, p1], 1)
    assert health_flags("binary", healthy, {"val_balanced_accuracy": np.array([0.55, 0.7, 0.8])}, best_epoch=2) == []
    one_class = np.stack([0.9 - 0.3 * p1, 0.1 + 0.3 * p1], 1)
    assert health_flags("binary", one_class) == ["predicts one class for every test sample"]


def test_diagnostics():
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.eye(3)[[0, 1, 1, 1, 2, 0]] * 0.8 + 0.2 / 3
    cm = confusion("multiclass", [y, y], [p, p])
    assert cm == [[2, 2, 0], [0, 4, 0], [2, 0, 2]]
    classes = per_class("multiclass", cm)
    assert classes[1] == {
        "precision": pytest.approx(4 / 6, abs=1e-4),
        "recall": 1.0,
        "f1": pytest.approx(0.8, abs=1e-4),
        "support": 4,
    }
    cal = calibration("multiclass", [y], [p])
    assert sum(cal["count"]) == 6 and cal["ece"] == pytest.approx(abs(0.8667 - 4 / 6), abs=1e-3)
    yb = np.array([0, 0, 1, 1])
    roc = mean_roc("binary", [yb], [np.array([[0.9, 0.1], [0.6, 0.4], [0.4, 0.6], [0.2, 0.8]])])
    assert roc["tpr"][-1] == 1.0 and roc["tpr"][1] == 1.0  # perfect ranking


def test_a_warm_start_that_never_improves_is_flagged_as_its_start():
    p1 = np.random.default_rng(0).uniform(0, 1, 40)
    probs = np.stack([1 - p1, p1], 1)
    history = {"val_balanced_accuracy": np.array([0.6, 0.7])}
    assert (
        health_flags("binary", probs, history, best_epoch=0, warm_start=True) == []
    )  # the first epoch may be best after a warm start
    assert any("starting weights" in f for f in health_flags("binary", probs, history, best_epoch=-1, warm_start=True))
