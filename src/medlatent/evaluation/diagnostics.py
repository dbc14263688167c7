"""Per-classifier diagnostics for the report: confusion matrix, per-class metrics, calibration, ROC.

Each takes the runs of one classifier (folds x seeds) as lists of test labels and probabilities.
Counts (confusion, reliability bins) are summed over runs; ECE and ROC are computed per run and
averaged (ROC by vertical averaging of the true positive rate on a fixed false-positive grid), so
no figure compares scores of different models on one scale.
"""

from __future__ import annotations

import numpy as np

from .metrics import predictions


def confusion(task: str, labels: list[np.ndarray], probs: list[np.ndarray]) -> list:
    """Rows = truth, columns = prediction, summed over runs: (K, K); (L, 2, 2) per label for multilabel."""
    if task == "multilabel":
        k = probs[0].shape[1]
        cm = np.zeros((k, 2, 2), dtype=np.int64)
        for y, p in zip(labels, probs, strict=False):
            pred = predictions(task, p)
            for j in range(k):
                np.add.at(cm[j], (y[:, j], pred[:, j]), 1)
        return cm.tolist()
    k = probs[0].shape[1]
    cm = np.zeros((k, k), dtype=np.int64)
    for y, p in zip(labels, probs, strict=False):
        np.add.at(cm, (y, predictions(task, p)), 1)
    return cm.tolist()


def per_class(task: str, cm: list) -> list[dict]:
    """Precision, recall (sensitivity), F1 and support per class (per label for multilabel)."""
    cm = np.asarray(cm, float)
    if task == "multilabel":
        tp, fp, fn, support = cm[:, 1, 1], cm[:, 0, 1], cm[:, 1, 0], cm[:, 1].sum(1)
    else:
        tp = np.diag(cm)
        fp, fn, support = cm.sum(0) - tp, cm.sum(1) - tp, cm.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision, recall = tp / (tp + fp), tp / (tp + fn)
        f1 = 2 * precision * recall / (precision + recall)
    clean = lambda v: None if not np.isfinite(v) else round(float(v), 4)  # noqa: E731
    return [
        {"precision": clean(p), "recall": clean(r), "f1": clean(f), "support": int(s)}
        for p, r, f, s in zip(precision, recall, f1, support, strict=False)
    ]


def _confidence(task: str, y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-label confidence and correctness (single-label); each label's probability and truth (multilabel)."""
    if task == "multilabel":
        return p.ravel(), y.ravel().astype(float)
    return p.max(1), (p.argmax(1) == y).astype(float)


def calibration(task: str, labels: list[np.ndarray], probs: list[np.ndarray], bins: int = 10) -> dict:
    """Expected calibration error (mean over runs) and reliability bins (counts over all runs)."""
    edges = np.linspace(0, 1, bins + 1)
    ece, count, conf_sum, acc_sum = [], np.zeros(bins), np.zeros(bins), np.zeros(bins)
    for y, p in zip(labels, probs, strict=False):
        conf, correct = _confidence(task, y, p)
        which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
        n = np.bincount(which, minlength=bins)
        c = np.bincount(which, weights=conf, minlength=bins)
        a = np.bincount(which, weights=correct, minlength=bins)
        ece.append(float(np.abs(a - c).sum() / max(len(conf), 1)))  # sum_b |B_b|/n * |acc_b - conf_b|
        count, conf_sum, acc_sum = count + n, conf_sum + c, acc_sum + a
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf, accuracy = conf_sum / count, acc_sum / count
    rounded = lambda v: [None if not np.isfinite(x) else round(float(x), 4) for x in v]  # noqa: E731
    return {
        "ece": float(np.mean(ece)),
        "bin_edges": edges.round(4).tolist(),
        "count": count.astype(int).tolist(),
        "confidence": rounded(mean_conf),
        "accuracy": rounded(accuracy),
    }


def mean_roc(task: str, labels: list[np.ndarray], probs: list[np.ndarray], points: int = 101) -> dict | None:
    """ROC averaged over runs (binary; micro-averaged one-vs-rest for multi-class; None for multilabel)."""
    from sklearn.metrics import roc_curve
    from sklearn.preprocessing import label_binarize

    if task == "multilabel":
        return None
    grid = np.linspace(0, 1, points)
    curves = []
    for y, p in zip(labels, probs, strict=False):
        if len(np.unique(y)) < 2:
            continue
        if p.shape[1] == 2:
            fpr, tpr, _ = roc_curve(y, p[:, 1])
        else:
            fpr, tpr, _ = roc_curve(label_binarize(y, classes=np.arange(p.shape[1])).ravel(), p.ravel())
        curves.append(np.interp(grid, fpr, tpr))
    if not curves:
        return None
    return {"fpr": grid.round(4).tolist(), "tpr": np.mean(curves, axis=0).round(4).tolist(), "runs": len(curves)}
