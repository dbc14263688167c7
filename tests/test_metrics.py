from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, matthews_corrcoef, roc_auc_score

from medlatent.evaluation.metrics import bootstrap_indices, interval, paired_test, replicate_scores, score


def _probs(rng, labels, k, signal=1.5):
    logits = rng.normal(size=(len(labels), k))
    logits[np.arange(len(labels)), labels] += signal
    e = np.exp(logits)
    return e / e.sum(1, keepdims=True)


@pytest.mark.parametrize("k", [2, 4])
def test_vectorised_replicates_match_sklearn(k):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, k, 120)
    probs = _probs(rng, labels, k)
    idx = bootstrap_indices(labels, "binary" if k == 2 else "multiclass", 5, seed=1)
    reps = replicate_scores("binary" if k == 2 else "multiclass", labels, probs, idx)
    for b in range(5):
        y, p = labels[idx[b]], probs[idx[b]]
        auc = roc_auc_score(y, p[:, 1]) if k == 2 else np.mean([roc_auc_score(y == c, p[:, c]) for c in range(k)])
        assert reps["auroc"][b] == pytest.approx(auc, abs=1e-9)
        assert reps["balanced_accuracy"][b] == pytest.approx(balanced_accuracy_score(y, p.argmax(1)), abs=1e-9)
        assert reps["mcc"][b] == pytest.approx(matthews_corrcoef(y, p.argmax(1)), abs=1e-9)


def test_multilabel_scores_and_replicates():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (80, 3))
    probs = np.clip(labels * 0.4 + rng.random((80, 3)) * 0.6, 0, 1)
    s = score("multilabel", labels, probs)
    assert s["auroc"] == pytest.approx(np.mean([roc_auc_score(labels[:, j], probs[:, j]) for j in range(3)]))
    idx = np.arange(80)[None]
    assert replicate_scores("multilabel", labels, probs, idx)["auroc"][0] == pytest.approx(s["auroc"])


def test_bootstrap_is_stratified_and_interval_brackets_point():
    rng = np.random.default_rng(0)
    labels = (rng.random(200) < 0.1).astype(int)
    idx = bootstrap_indices(labels, "binary", 300, seed=0)
    assert np.all(labels[idx].sum(1) == labels.sum())  # class counts kept in every resample
    probs = _probs(rng, labels, 2)
    reps = replicate_scores("binary", labels, probs, idx)["auroc"]
    lo, hi = interval(reps)
    assert lo < score("binary", labels, probs)["auroc"] < hi
    assert hi - lo > 0.01


def test_paired_test():
    a = [0.80, 0.82, 0.79, 0.85, 0.81]
    b = [0.70, 0.71, 0.72, 0.74, 0.69]
    out = paired_test(a, b)
    assert out["mean_difference"] == pytest.approx(np.mean(np.subtract(a, b)))
    assert out["t_test_p"] < 0.01
    assert paired_test([0.5, 0.5], [0.5, 0.5])["t_test_p"] is None
