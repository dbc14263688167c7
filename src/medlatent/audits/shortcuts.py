"""The encoder audit's shortcuts section: does a latent space make a confounder (a scanner, a
site, a text marker that goes with the diagnosis in training) easier or harder to learn than the
image does, and how much does each space's classifier rely on it?

Per space (image, reconstruction, latent):

- the confounder's learnability: a linear probe (`classifiers.LinearProbe`: logistic regression
  on the space's standardised, flattened inputs) predicts the confounder from the test images,
  out of fold (five folds stratified by the confounder), AUROC with a bootstrap interval;
- the reliance of the audit's classifier of the space (trained by the audit's protocol on the
  training images, as in the robustness and information sections) on it: AUROC and accuracy of
  the aligned and conflicting test images, their difference and the worst-group accuracy
  (`evaluation.subgroups`);
- the same after retraining only its last linear layer on a small decorrelated set (Kirichenko et
  al., *Last Layer Re-Training is Sufficient for Robustness to Spurious Correlations*, ICLR 2023;
  the few-sample linear heads of Shi et al., ICLR 2023): `decorrelated_share` of the validation
  images, the same number from every (class, confounder) group. A gap the new head closes was in
  the head; a gap it keeps is in the representation.
"""

from __future__ import annotations

import numpy as np
import torch

from ..classifiers.space import fit_space_classifier, predict_raw
from ..data.spaces import tensor_spaces
from ..errors import MedlatentInputError
from ..evaluation.information import v_information
from ..evaluation.metrics import bootstrap_indices, replicate_scores, score
from ..evaluation.subgroups import aligned_classes, estimate, mean_over_runs, subgroup_scores
from .config import EncoderAuditConfig

SHORTCUT_SPACES = ("image", "reconstruction", "latent")


def check_confounder(dataset, sections: list[str]) -> None:
    """The shortcuts section needs a confounder; refused in one line before any work otherwise."""
    if "shortcuts" in sections and dataset.confounder is None:
        raise MedlatentInputError(
            f"--sections shortcuts: {dataset.name} has no confounder; use synthetic:marker=corner|stripe|offset "
            "or a CSV manifest with --confounder-column COLUMN"
        )


def shortcuts_section(
    ae,
    dataset,
    split,
    sample: np.ndarray,
    inputs: dict[str, torch.Tensor],
    config: EncoderAuditConfig,
    device,
    classifiers: dict,
) -> dict:
    """The section's results for one autoencoder: `inputs` are the test sample in each space
    ("image", "latent" and, with a decoder, "reconstruction"), `classifiers` the audit's space
    classifiers (by space)."""
    confounder = dataset.confounder
    labels, codes = dataset.labels[sample], confounder.codes[sample]
    aligned_class = aligned_classes(
        dataset.labels[split.train], confounder.codes[split.train], dataset.num_outputs, len(confounder.levels)
    )
    rng = np.random.default_rng(config.run.seed + 2)
    chosen, decorrelated = decorrelated_subset(dataset, split.val, config.decorrelated_share, rng)
    heads = tensor_spaces(ae, dataset.load(chosen), device, dataset) if chosen is not None else None

    def groups(probs: np.ndarray) -> dict:
        return subgroup_scores(
            dataset.task, labels, codes, probs, aligned_class, config.run.bootstrap, config.run.seed
        )

    spaces = {}
    for space in (s for s in SHORTCUT_SPACES if s in inputs):
        x, clf = inputs[space], classifiers[space]
        row = {"confounder_auroc": confounder_auroc(space, x, codes, len(confounder.levels), config)}
        probs, features = outputs(clf, x)
        row["classifier"] = groups(probs)
        if heads is not None:
            head = retrained_head(outputs(clf, heads[space])[1], dataset.labels[chosen], config.run.seed)
            row["decorrelated_head"] = groups(head_probs(head, features, dataset.num_outputs))
        spaces[space] = row
    return {
        "confounder": describe_confounder(dataset, split, sample, aligned_class),
        "test_images": len(sample),
        "decorrelated": decorrelated,
        "spaces": spaces,
        "probe": "linear probe (logistic regression, C = 0.01, standardised inputs), 5 folds of the test images",
        "head": "logistic regression on the classifier's last-layer inputs, standardised",
    }


def reliance_over_runs(dataset, trains: list[np.ndarray], records: dict, n_boot: int, seed: int) -> dict:
    """The gap audit's shortcuts table: each classifier's reliance on the dataset's confounder
    (`subgroup_scores` of its test predictions), the mean over the runs with intervals from the
    mean of their replicates (`subgroups.mean_over_runs`). `records`: per classifier (space,
    variant, decoder stage), its runs' records ("test_indices", "probs"); `trains`: each run's
    training images, whose confounder values set the class each value goes with in that run."""
    confounder, labels = dataset.confounder, dataset.labels
    aligned = [
        aligned_classes(labels[train], confounder.codes[train], dataset.num_outputs, len(confounder.levels))
        for train in trains
    ]
    out = {}
    for key, runs in records.items():
        results, replicates = [], []
        for record, goes_with in zip(runs, aligned, strict=True):
            test, kept = np.asarray(record["test_indices"]), {}
            results.append(
                subgroup_scores(
                    dataset.task, labels[test], confounder.codes[test], record["probs"], goes_with, n_boot, seed, kept
                )
            )
            replicates.append(kept)
        out[key] = mean_over_runs(results, replicates)
    names = [[str(dataset.class_names[c]) if c >= 0 else None for c in run] for run in aligned]
    return {
        "confounder": {
            "name": confounder.name,
            "levels": list(confounder.levels),
            "aligned_class": names[0],
            "aligned_class_agrees": all(run == names[0] for run in names),  # over the runs' training parts
        },
        "classifiers": out,
    }


def describe_confounder(dataset, split, sample: np.ndarray, aligned_class: np.ndarray) -> dict:
    """The confounder's name and values, the class each value goes with in training, and the
    images of each (class, value) group in the training, validation and test parts."""
    confounder = dataset.confounder

    def count(indices: np.ndarray, c: int, v: int) -> int:
        return int(((dataset.labels[indices] == c) & (confounder.codes[indices] == v)).sum())

    groups = [
        {
            "class": c,
            "confounder": v,
            "train": count(split.train, c, v),
            "val": count(split.val, c, v),
            "test": count(sample, c, v),
        }
        for c in range(dataset.num_outputs)
        for v in range(len(confounder.levels))
    ]
    return {
        "name": confounder.name,
        "levels": list(confounder.levels),
        "class_names": [str(c) for c in dataset.class_names],
        "aligned_class": [
            str(dataset.class_names[c]) if c >= 0 else None for c in aligned_class
        ],  # per value: the class it goes with in training
        "groups": groups,
    }


def decorrelated_subset(dataset, pool: np.ndarray, share: float, rng) -> tuple[np.ndarray | None, dict]:
    """`share` of the `pool` images (at least 2 per group), the same number from every (class,
    confounder value) group, so that the confounder is independent of the class: drawn without
    replacement, with replacement from a group smaller than that number. None, with the reason,
    when a group has no image in the pool."""
    confounder = dataset.confounder
    labels, codes = dataset.labels[pool], confounder.codes[pool]
    cells = [(c, v) for c in range(dataset.num_outputs) for v in range(len(confounder.levels))]
    per_group = max(2, round(share * len(pool) / len(cells)))
    chosen, resampled = [], False
    for c, v in cells:
        members = pool[(labels == c) & (codes == v)]
        if not len(members):
            reason = (
                f"skipped: no validation image of class {dataset.class_names[c]} with {confounder.name} "
                f"{confounder.levels[v]}; the decorrelated head needs every (class, confounder) group"
            )
            return None, {"skipped": reason}
        resampled |= len(members) < per_group
        chosen.append(rng.choice(members, size=per_group, replace=len(members) < per_group))
    chosen = np.concatenate(chosen)
    return chosen, {"images": len(chosen), "per_group": per_group, "resampled": resampled}


def confounder_auroc(space: str, x: torch.Tensor, codes: np.ndarray, num_levels: int, config) -> dict:
    """How linearly decodable the confounder is from a space: a linear probe's out-of-fold AUROC
    on the test images (five folds stratified by the confounder, fewer where a value has fewer
    images), with a bootstrap interval, and the V-information of the same predictions (nats: the
    confounder's entropy minus their cross-entropy, `evaluation.information.v_information`). The
    test images, where the synthetic marker is drawn whatever the class: a probe trained where the
    confounder goes with the class could read the finding instead."""
    from sklearn.model_selection import StratifiedKFold

    present, counts = np.unique(codes, return_counts=True)
    if len(present) < 2 or counts.min() < 2:
        return {
            "value": None,
            "ci95": [None, None],
            "v_information": None,
            "reason": "fewer than 2 test images of a confounder value",
        }
    task = "binary" if num_levels == 2 else "multiclass"
    probs = np.full((len(codes), num_levels), 1e-12)
    splitter = StratifiedKFold(n_splits=min(5, int(counts.min())), shuffle=True, random_state=config.run.seed)
    folds = splitter.split(codes, codes)
    for train, test in folds:
        probe = fit_space_classifier(
            space,
            (x[train], codes[train]),
            None,
            task,
            config.train_config(),
            latent_std=config.run.latent_std,
            num_outputs=num_levels,
            model="linear",
        )
        probs[np.ix_(test, probe.model_.classes_)] = predict_raw(probe, x[test])
    idx = bootstrap_indices(codes, task, config.run.bootstrap, config.run.seed)
    auroc = estimate(score(task, codes, probs)["auroc"], replicate_scores(task, codes, probs, idx)["auroc"])
    usable = v_information(probs / probs.sum(1, keepdims=True), codes)  # the same out-of-fold predictions
    return {**auroc, "v_information": usable["v_information"], "entropy": usable["label_entropy"]}


def retrained_head(features: np.ndarray, labels: np.ndarray, seed: int):
    """A new last layer: logistic regression on a classifier's frozen last-layer inputs, standardised."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed)).fit(features, labels)


def head_probs(head, features: np.ndarray, num_outputs: int) -> np.ndarray:
    """A retrained head's probabilities, one column per class (a class it never saw: ~0)."""
    probs = np.full((len(features), num_outputs), 1e-12)
    probs[:, head.classes_] = head.predict_proba(features)
    return probs


def outputs(clf, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """A deep space classifier's probabilities for raw inputs `x` of its space, and what its last
    linear layer reads (its pooled features), from one forward pass: captured there, so that any
    backbone (ResNet, ConvNeXt, the MLP of pooled latents) gives them alike."""
    last = [m for m in clf.model_.backbone.modules() if isinstance(m, torch.nn.Linear)][-1]
    captured: list[torch.Tensor] = []
    handle = last.register_forward_hook(lambda module, args, out: captured.append(args[0].detach().float().cpu()))
    try:
        probs = predict_raw(clf, x)
    finally:
        handle.remove()
    return probs, torch.cat(captured).numpy()
