"""A classifier's scores in the groups of a confounder: how much it relies on a shortcut.

Every test image falls in one group, its (class, confounder value) pair. An image is *aligned*
when its class is the class its confounder value goes with in training (the class among whose
training images the value is most frequent) and *conflicting* otherwise: a shortcut raises the
scores of the aligned images and lowers those of the conflicting ones. Reported: AUROC and
balanced accuracy (the mean accuracy of its groups) of each part, their aligned - conflicting
differences, each group's accuracy and the worst of them, each with a bootstrap 95% interval. The bootstrap
resamples within each group, so every group keeps its size in each replicate, and resamples the
same way for every classifier given the same test images: the interval of a difference, between
parts or between classifiers, is paired.
"""

from __future__ import annotations

import numpy as np

from .metrics import bootstrap_indices, interval, replicate_scores, score


def aligned_classes(labels: np.ndarray, codes: np.ndarray, num_classes: int, num_levels: int) -> np.ndarray:
    """Per confounder value, the class it goes with: the class among whose images (the training
    images) the value is most frequent, argmax_y P(value | y). With balanced classes that is the
    value's majority class; with imbalanced ones it is the class the value is over-represented in,
    where the majority class would be every value's. Ties go to the lower class id, a value without
    images gets -1."""
    counts = np.zeros((num_levels, num_classes), dtype=np.int64)
    np.add.at(counts, (codes, labels), 1)
    rates = counts / np.maximum(counts.sum(0, keepdims=True), 1)
    return np.where(counts.sum(1) > 0, rates.argmax(1), -1)


def estimate(point: float, replicates: np.ndarray | None) -> dict:
    """{"value", "ci95"}, undefined parts (NaN, or too few images) as None."""
    value = None if point is None or not np.isfinite(point) else float(point)
    if replicates is None or not np.isfinite(replicates).any():
        return {"value": value, "ci95": [None, None]}
    return {"value": value, "ci95": list(interval(replicates))}


def subgroup_scores(
    task: str,
    labels: np.ndarray,
    codes: np.ndarray,
    probs: np.ndarray,
    aligned_class: np.ndarray,
    n_boot: int,
    seed: int,
    replicates: dict | None = None,
) -> dict:
    """The aligned and conflicting parts' AUROC and balanced accuracy, their differences, and each
    (class, confounder) group's accuracy with the worst one, for predicted probabilities `probs` of
    test images of `labels` and confounder `codes`; `aligned_class` from `aligned_classes`.
    `replicates`, if given, receives the bootstrap replicates of the summary (`SUMMARY`, by path).

    A part's balanced accuracy is the mean accuracy of its groups (with a binary task and a binary
    confounder each part holds one group per class: its balanced accuracy), so the part's mix of
    classes, which the confounder's rate sets, does not move it."""
    levels = len(aligned_class)
    groups = labels * levels + codes
    present, sizes = np.unique(groups, return_counts=True)
    idx = bootstrap_indices(groups, "multiclass", n_boot, seed)  # columns grouped by `present`, in order
    column_group = np.repeat(present, sizes)
    correct = (probs.argmax(1) == labels).astype(np.float64)
    group_points = np.array([correct[groups == g].mean() for g in present])
    group_reps = np.stack([correct[idx[:, column_group == g]].mean(1) for g in present], axis=1)  # (B, groups)
    is_aligned = (present // levels) == aligned_class[present % levels]
    parts, replicates_of = {}, {}
    for name, chosen in (("aligned", is_aligned), ("conflicting", ~is_aligned)):
        members = np.isin(groups, present[chosen])
        auroc, auroc_reps = part_auroc(task, labels, probs, members, idx[:, np.isin(column_group, present[chosen])])
        accuracy = group_points[chosen].mean() if chosen.any() else None
        accuracy_reps = group_reps[:, chosen].mean(1) if chosen.any() else np.full(len(idx), np.nan)
        parts[name] = {
            "images": int(members.sum()),
            "auroc": estimate(auroc, auroc_reps),
            "balanced_accuracy": estimate(accuracy, accuracy_reps),
        }
        replicates_of[name] = {"auroc": auroc_reps, "balanced_accuracy": accuracy_reps}
    replicates_of["aligned_minus_conflicting"] = {
        metric: replicates_of["aligned"][metric] - replicates_of["conflicting"][metric]
        for metric in ("auroc", "balanced_accuracy")
    }
    difference = {
        metric: estimate(_difference(parts["aligned"][metric]["value"], parts["conflicting"][metric]["value"]), reps)
        for metric, reps in replicates_of["aligned_minus_conflicting"].items()
    }
    worst = int(np.argmin(group_points))
    if replicates is not None:
        replicates.update({f"{part}.{m}": reps for part, kept in replicates_of.items() for m, reps in kept.items()})
        replicates["worst_group_accuracy"] = group_reps.min(1)
    rows = [
        {
            "class": int(g // levels),
            "confounder": int(g % levels),
            "aligned": bool(is_aligned[i]),
            "images": int(sizes[i]),
            "accuracy": estimate(group_points[i], group_reps[:, i]),
        }
        for i, g in enumerate(present)
    ]
    return {
        **parts,
        "aligned_minus_conflicting": difference,
        "worst_group_accuracy": estimate(group_points[worst], group_reps.min(1)),
        "worst_group": {"class": rows[worst]["class"], "confounder": rows[worst]["confounder"]},
        "groups": rows,
    }


SUMMARY = (
    "aligned.auroc",
    "aligned.balanced_accuracy",
    "conflicting.auroc",
    "conflicting.balanced_accuracy",
    "aligned_minus_conflicting.auroc",
    "aligned_minus_conflicting.balanced_accuracy",
    "worst_group_accuracy",
)


def mean_over_runs(results: list[dict], replicates: list[dict]) -> dict:
    """The summary (`SUMMARY`) of several runs' `subgroup_scores` as the mean over the runs, each
    interval from the mean of the runs' replicates (resample b of every run together): the
    bootstrap of the mean where the runs' resamples are independent (folds) or the same (seeds on
    one test set). A part undefined in some run (None) is undefined in the mean."""
    out: dict = {"runs": len(results)}
    for path in SUMMARY:
        points = [_at(result, path)["value"] for result in results]
        value = None if any(v is None for v in points) else float(np.mean(points))
        merged = np.mean([r[path] for r in replicates], axis=0) if value is not None else None
        node = out
        *parents, leaf = path.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = estimate(value, merged)
    return out


def _at(result: dict, path: str) -> dict:
    for key in path.split("."):
        result = result[key]
    return result


def part_auroc(
    task: str, labels: np.ndarray, probs: np.ndarray, members: np.ndarray, idx: np.ndarray
) -> tuple[float | None, np.ndarray]:
    """The AUROC of the images `members` and its bootstrap replicates over the resamples `idx`
    (the part's columns of the group-stratified resamples); undefined (None, NaN) with one class."""
    if len(np.unique(labels[members])) < 2:
        return None, np.full(len(idx), np.nan)
    return score(task, labels[members], probs[members])["auroc"], replicate_scores(task, labels, probs, idx)["auroc"]


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b
