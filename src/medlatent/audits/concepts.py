"""The encoder audit's concepts section: concept bottlenecks in each space (Koh et al., *Concept
Bottleneck Models*, ICML 2020), so one sees whether a learnability gap is a gap in concepts.

Per space (image, reconstruction, latent):

- a concept model: the audit's classifier of the space, trained by the audit's protocol on the
  training images with one output per concept (binary concepts, a multi-label task), and each
  concept's AUROC on the test images;
- two label models, each a logistic regression from the concepts to the class: *independent*
  (fitted on the training images' true concepts) and *sequential* (fitted on the concept model's
  predictions for them, as Koh et al.: for images it was trained on, so nearer the true values
  than its predictions for new images); each predicts the test images' class from their
  predicted concepts, and its AUROC is set against the space's plain classifier (the audit's, as
  in the shortcuts section);
- intervention curves: the label models' AUROC as the true values replace the predicted ones for
  k = 0 .. all concepts, averaged over random sets of k concepts. With every concept replaced,
  the independent model sees what it was fitted on: its AUROC there is the bottleneck's ceiling.

Every interval is a 95% bootstrap interval over the test images, the same resamples for every
space, model and concept (stratified by class), so the interval of a difference is paired.
"""

from __future__ import annotations

from dataclasses import replace
from itertools import combinations

import numpy as np
import torch

from ..classifiers.space import fit_space_classifier, predict_raw
from ..evaluation.metrics import bootstrap_indices, replicate_scores, score
from ..evaluation.subgroups import estimate
from .config import EncoderAuditConfig
from .shortcuts import head_probs

CONCEPT_SPACES = ("image", "reconstruction", "latent")
INTERVENTION_SETS = 10  # random sets of k concepts replaced, per k (all of them where there are fewer)
LABEL_MODEL = "logistic regression from the concepts to the class (L2, C = 1)"


def concepts_section(
    dataset,
    split,
    sample: np.ndarray,
    inputs: dict[str, torch.Tensor],
    train_inputs: dict[str, torch.Tensor],
    config: EncoderAuditConfig,
    device,
    classifiers: dict,
    shared: dict,
) -> dict:
    """The section's results for one autoencoder: `inputs` are the test sample in each space,
    `train_inputs` the split's training then validation images in each space, `classifiers` the
    audit's plain classifiers (by space); `shared` keeps the image space's concept model for every
    autoencoder, as the audit keeps its image classifier."""
    concepts, task = dataset.concepts, dataset.task
    labels = dataset.labels[sample]
    true_train, true_test = concepts.values[split.train], concepts.values[sample]
    idx = bootstrap_indices(labels, task, config.run.bootstrap, config.run.seed)
    independent = label_model(true_train, dataset.labels[split.train], config.run.seed)

    def task_score(probs: np.ndarray) -> tuple[float, np.ndarray]:
        return score(task, labels, probs)["auroc"], replicate_scores(task, labels, probs, idx)["auroc"]

    spaces = {}
    for space in (s for s in CONCEPT_SPACES if s in inputs):
        model = shared.get("image concepts") if space == "image" else None
        if model is None:
            model = concept_model(space, train_inputs[space], dataset, split, config, device)
            if space == "image":
                shared["image concepts"] = model
        predicted_train = predict_raw(model, train_inputs[space][: len(split.train)])
        predicted = predict_raw(model, inputs[space])
        sequential = label_model(predicted_train, dataset.labels[split.train], config.run.seed)
        plain = task_score(predict_raw(classifiers[space], inputs[space]))
        row = {"concepts": concept_scores(concepts.names, true_test, predicted, idx), "plain": estimate(*plain)}
        for name, head in (("independent", independent), ("sequential", sequential)):
            through = task_score(head_probs(head, predicted, dataset.num_outputs))
            row[name] = estimate(*through)
            row[f"{name}_minus_plain"] = estimate(through[0] - plain[0], through[1] - plain[1])
            row[f"{name}_interventions"] = intervention_curve(
                head, predicted, true_test, dataset.num_outputs, task_score, config.run.seed
            )
        spaces[space] = row
    return {
        "concepts": list(concepts.names),
        "source": concepts.source,
        "prevalence": {
            "train": dict(zip(concepts.names, true_train.mean(0).tolist(), strict=True)),
            "test": dict(zip(concepts.names, true_test.mean(0).tolist(), strict=True)),
        },
        "test_images": len(sample),
        "ceiling": estimate(*task_score(head_probs(independent, true_test, dataset.num_outputs))),
        "label_model": LABEL_MODEL,
        "intervention_sets": INTERVENTION_SETS,
        "spaces": spaces,
    }


def concept_model(space: str, data: torch.Tensor, dataset, split, config: EncoderAuditConfig, device):
    """The space's classifier of the concepts, a multi-label task of one output per concept, trained
    by the audit's protocol on the training images and stopped on the validation images, with the
    plain per-concept cross-entropy: the class-balanced weights of `--loss cb` would let a concept
    absent from the training images outweigh the rest, and LDAM is defined for single labels."""
    n_train, values = len(split.train), dataset.concepts.values
    return fit_space_classifier(
        space,
        (data[:n_train], values[split.train]),
        (data[n_train:], values[split.val]),
        "multilabel",
        replace(config.train_config(), loss="ce"),
        latent_std=config.run.latent_std,
        num_outputs=values.shape[1],
        device=device,
        progress=config.run.progress,
        name=f"audit {space} concepts",
        distributed=True,
    )


def label_model(concepts: np.ndarray, labels: np.ndarray, seed: int):
    """The class from concept values (true 0/1, or predicted probabilities): a logistic regression."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=1.0, max_iter=2000, random_state=seed).fit(concepts, labels)


def concept_scores(names: list[str], true: np.ndarray, predicted: np.ndarray, idx: np.ndarray) -> dict:
    """Each concept's AUROC on the test images with its interval (None where the test images hold
    one value of it), and their mean over the concepts that have one."""
    rows, points, replicates = {}, [], []
    for j, name in enumerate(names):
        if true[:, j].min() == true[:, j].max():
            rows[name] = {"value": None, "ci95": [None, None], "reason": "one value in the test images"}
            continue
        probs = np.stack([1 - predicted[:, j], predicted[:, j]], axis=1)
        point = score("binary", true[:, j].astype(np.int64), probs)["auroc"]
        reps = replicate_scores("binary", true[:, j].astype(np.int64), probs, idx)["auroc"]
        rows[name] = estimate(point, reps)
        points.append(point)
        replicates.append(reps)
    mean = estimate(float(np.mean(points)), np.nanmean(replicates, axis=0)) if points else estimate(None, None)
    return {"per_concept": rows, "mean_auroc": mean}


def intervention_curve(head, predicted: np.ndarray, true: np.ndarray, num_outputs: int, task_score, seed: int) -> dict:
    """The label model's task AUROC as the true values replace the predicted ones for k = 0 .. all
    concepts: for each k the mean over random sets of k concepts (every set where there are at most
    `INTERVENTION_SETS`), the same sets in every bootstrap replicate."""
    rng = np.random.default_rng(seed)
    count = predicted.shape[1]
    curve = []
    for k in range(count + 1):
        sets = [list(s) for s in combinations(range(count), k)]
        if len(sets) > INTERVENTION_SETS:  # distinct sets, none counted twice
            sets = [sets[i] for i in sorted(rng.choice(len(sets), size=INTERVENTION_SETS, replace=False))]
        points, replicates = [], []
        for chosen in sets:
            given = predicted.copy()
            given[:, chosen] = true[:, chosen]
            point, reps = task_score(head_probs(head, given, num_outputs))
            points.append(point)
            replicates.append(reps)
        curve.append(estimate(float(np.mean(points)), np.mean(replicates, axis=0)))
    return {"k": list(range(count + 1)), "auroc": curve}
