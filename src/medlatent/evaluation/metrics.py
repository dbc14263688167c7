"""Scores, bootstrap intervals and paired tests.

Point estimates come from scikit-learn. Bootstrap replicates use vectorised versions of the same
formulas (rank-based AUROC, confusion-matrix balanced accuracy and MCC), checked against
scikit-learn in the tests, because 1000 replicates x spaces x metrics through scikit-learn would
dominate a CPU run. All spaces are resampled with the *same* indices, so the interval of a
difference between spaces (a gap) is a paired bootstrap interval.
"""

from __future__ import annotations

import numpy as np
from scipy import stats
from sklearn.metrics import balanced_accuracy_score, matthews_corrcoef, roc_auc_score

METRICS = ("auroc", "balanced_accuracy", "mcc")


def predictions(task: str, probs: np.ndarray) -> np.ndarray:
    """Hard predictions: argmax for single-label tasks, 0.5 threshold per label for multilabel."""
    return (probs >= 0.5).astype(np.int64) if task == "multilabel" else probs.argmax(1)


def score(task: str, labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """AUROC (binary; one-vs-rest macro for multi-class; mean over labels for multi-label),
    balanced accuracy and MCC (means over labels for multi-label)."""
    pred = predictions(task, probs)
    if task == "multilabel":
        present = [j for j in range(labels.shape[1]) if 0 < labels[:, j].sum() < len(labels)]
        return {
            "auroc": float(np.mean([roc_auc_score(labels[:, j], probs[:, j]) for j in present]))
            if present
            else float("nan"),
            "balanced_accuracy": float(np.mean([balanced_accuracy_score(labels[:, j], pred[:, j]) for j in present]))
            if present
            else float("nan"),
            "mcc": float(np.mean([matthews_corrcoef(labels[:, j], pred[:, j]) for j in present]))
            if present
            else float("nan"),
        }
    if probs.shape[1] == 2:
        auroc = roc_auc_score(labels, probs[:, 1]) if len(np.unique(labels)) == 2 else float("nan")
    else:
        classes = np.unique(labels)
        auroc = (
            float(np.mean([roc_auc_score(labels == c, probs[:, c]) for c in classes]))
            if len(classes) > 1
            else float("nan")
        )
    return {
        "auroc": float(auroc),
        "balanced_accuracy": float(balanced_accuracy_score(labels, pred)),
        "mcc": float(matthews_corrcoef(labels, pred)),
    }


# --- vectorised replicates: rows of `idx` are bootstrap resamples --------------------------------


def _auroc_binary(positive: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUROC per row; positive and scores are (B, n)."""
    ranks = stats.rankdata(scores, axis=1)
    n1 = positive.sum(1)
    n0 = positive.shape[1] - n1
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((ranks * positive).sum(1) - n1 * (n1 + 1) / 2) / (n1 * n0)


def _confusion(labels: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """(B, k, k) confusion matrices, rows = truth."""
    b = labels.shape[0]
    flat = (np.arange(b)[:, None] * k * k + labels * k + pred).ravel()
    return np.bincount(flat, minlength=b * k * k).reshape(b, k, k).astype(np.float64)


def _balanced_accuracy(cm: np.ndarray) -> np.ndarray:
    support = cm.sum(2)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.diagonal(cm, axis1=1, axis2=2) / support
    return np.nanmean(np.where(support > 0, recall, np.nan), axis=1)


def _mcc(cm: np.ndarray) -> np.ndarray:
    t, p = cm.sum(2), cm.sum(1)  # true and predicted counts per class
    c, s = np.trace(cm, axis1=1, axis2=2), cm.sum((1, 2))
    num = c * s - (t * p).sum(1)
    den = np.sqrt(s**2 - (p * p).sum(1)) * np.sqrt(s**2 - (t * t).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, 0.0)


def replicate_scores(task: str, labels: np.ndarray, probs: np.ndarray, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Each metric on each resample `idx[b]`; returns arrays of shape (B,)."""
    if task == "multilabel":
        per_label = {m: [] for m in METRICS}
        for j in range(labels.shape[1]):
            y, p = labels[:, j][idx], probs[:, j][idx]
            if labels[:, j].sum() in (0, len(labels)):
                continue
            per_label["auroc"].append(_auroc_binary(y, p))
            cm = _confusion(y, (p >= 0.5).astype(np.int64), 2)
            per_label["balanced_accuracy"].append(_balanced_accuracy(cm))
            per_label["mcc"].append(_mcc(cm))
        return {m: np.nanmean(np.stack(v), axis=0) for m, v in per_label.items()}
    k = probs.shape[1]
    y = labels[idx]
    if k == 2:
        auroc = _auroc_binary(y == 1, probs[:, 1][idx])
    else:
        auroc = np.nanmean(
            np.stack([_auroc_binary(y == c, probs[:, c][idx]) for c in range(k) if (labels == c).any()]), axis=0
        )
    cm = _confusion(y, probs.argmax(1)[idx], k)
    return {"auroc": auroc, "balanced_accuracy": _balanced_accuracy(cm), "mcc": _mcc(cm)}


def bootstrap_indices(labels: np.ndarray, task: str, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) resamples, stratified by class for single-label tasks so every class stays present."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    if task == "multilabel":
        return rng.integers(0, n, size=(n_boot, n))
    parts = [
        rng.choice(np.flatnonzero(labels == c), size=(n_boot, int((labels == c).sum()))) for c in np.unique(labels)
    ]
    return np.concatenate(parts, axis=1)


def interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    lo, hi = np.nanpercentile(values, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(lo), float(hi)


def paired_test(a: list[float] | np.ndarray, b: list[float] | np.ndarray) -> dict:
    """Paired comparison across folds or seeds: mean difference a - b, t-test and Wilcoxon p-values."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    diff = a - b
    out = {"n": len(diff), "mean_difference": float(diff.mean()) if len(diff) else float("nan")}
    if len(diff) >= 2 and np.ptp(diff) > 0:
        out["t_test_p"] = float(stats.ttest_rel(a, b).pvalue)
        out["wilcoxon_p"] = float(stats.wilcoxon(a, b).pvalue) if np.any(diff != 0) else 1.0
    else:
        out["t_test_p"] = out["wilcoxon_p"] = None
    return out


def wilson_interval(hits: int, n: int, z: float = 1.96) -> list[float]:
    """The Wilson 95% interval of a proportion hits / n."""
    p = hits / n
    centre, half = (
        (p + z * z / (2 * n)) / (1 + z * z / n),
        z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n),
    )
    return [float(centre - half), float(centre + half)]
