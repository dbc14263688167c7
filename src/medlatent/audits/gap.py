"""The learnability-gap audit.

For each autoencoder, classifiers are trained with one protocol in three spaces of the same
split: the images, their reconstructions decode(encode(x)), and the latents encode(x).

    fidelity gap     = score(image) - score(reconstruction)   # what the autoencoder loses
    learnability gap = score(reconstruction) - score(latent)  # what is kept but hard to learn

Intervals are paired bootstrap intervals over test samples (the same resamples for every space);
across folds or seeds a paired test compares the latent and reconstruction spaces.
Finished classifiers are stored under the run folder, so a rerun after a crash resumes.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..autoencoders import load_autoencoder
from ..cache import LatentCache
from ..classifiers import DeepClassifier, LinearProbe, SpaceScaler
from ..data import ImageDataset, Split, load_dataset, make_splits
from ..device import resolve_device, seed_everything
from ..diffusion.noise import sigma_grid
from ..errors import MedlatentInputError
from ..evaluation.metrics import METRICS, bootstrap_indices, interval, paired_test, replicate_scores, score
from ..evaluation.reconstruction import reconstruction_quality
from ..io import atomic_write
from .config import GapConfig
from ..reports import provenance, write_report, write_results

SPACES = ("image", "reconstruction", "latent")


class SpaceData:
    """Inputs of one space for every sample of the dataset, indexed by dataset index."""

    def __init__(self, tensor: torch.Tensor, index_of: np.ndarray):
        self.tensor, self.index_of = tensor, index_of

    def take(self, indices: np.ndarray) -> torch.Tensor:
        return self.tensor[self.index_of[indices]]


def dataset_parts(dataset: ImageDataset, folds: int | None) -> dict[str, np.ndarray]:
    """What the cache encodes: the official partitions, or everything at once for K folds."""
    return dataset.partitions if folds is None and dataset.partitions else {"all": np.arange(len(dataset))}


def encode_spaces(dataset: ImageDataset, parts: dict[str, np.ndarray], ae, cache: LatentCache, device) -> tuple[dict, dict[str, SpaceData]]:
    """Cache entries of every part, and the reconstruction and latent spaces indexed by dataset index."""
    entries = {name: cache.encode(dataset, name, idx, ae, device) for name, idx in parts.items()}
    index_of = np.empty(len(dataset), dtype=np.int64)
    offset = 0
    latents, recons = [], []
    for entry in entries.values():
        idx = entry.indices()
        index_of[idx] = np.arange(offset, offset + len(idx))
        offset += len(idx)
        latents.append(entry.latents())
        recons.append(entry.reconstructions())
    return entries, {"reconstruction": SpaceData(torch.cat(recons), index_of), "latent": SpaceData(torch.cat(latents), index_of)}


def run_gap(config: GapConfig) -> dict:
    """Run the audit, write results.json and report.html into `config.out`, return the results."""
    started = time.perf_counter()
    out = Path(config.out)
    device = resolve_device(config.device)
    # Cheap checks first: a bad autoencoder spec fails before any data is read.
    autoencoders = [load_autoencoder(spec, device=config.device, progress=config.progress) for spec in config.autoencoders]
    dataset = load_dataset(config.dataset, config.size, image_column=config.image_column, label_columns=config.label_columns, patient_column=config.patient_column, split_column=config.split_column, task=config.task)
    splits = make_splits(dataset, config.folds, seed=config.seeds[0], val_fraction=config.val_fraction)
    if config.loss == "ldam" and dataset.task == "multilabel":
        raise MedlatentInputError("--loss ldam is defined for single-label tasks; use ce or cb")
    cache = LatentCache(config.cache_dir, progress=config.progress)
    timings: dict[str, float] = {}

    everything = np.arange(len(dataset))
    images = SpaceData(load_images(dataset), everything)
    parts = dataset_parts(dataset, config.folds)
    parts_dir = out / "parts" / config.protocol_hash()

    results_by_ae = []
    for ae in autoencoders:
        t0 = time.perf_counter()
        entries, spaces = encode_spaces(dataset, parts, ae, cache, device)
        spaces["image"] = images
        timings[f"encode {ae.spec}"] = time.perf_counter() - t0
        test_all = np.concatenate([s.test for s in splits])
        quality = reconstruction_quality(images.take(test_all), spaces["reconstruction"].take(test_all))
        results_by_ae.append({"autoencoder": ae.describe(), "spaces": spaces, "quality": quality, "cache": {n: str(e.folder) for n, e in entries.items()}, "latent_shape": list(entries[next(iter(entries))].meta["latent_shape"])})

    # Train: the image space once per split and seed (shared by every autoencoder), then the
    # reconstruction and latent spaces of each autoencoder.
    predictions: dict[tuple, dict] = {}
    models = ["deep", "linear"] if config.linear_probe else ["deep"]
    for seed in config.seeds:
        for split in splits:
            for model in models:
                image = _fit_space(parts_dir, "image", "image", images, model, config, dataset, split, seed, device, timings)
                for a, entry in enumerate(results_by_ae):
                    predictions[(a, "image", model, split.name, seed)] = image
                    ae_tag = entry["autoencoder"]["content_hash"][7:19]
                    for space in ("reconstruction", "latent"):
                        predictions[(a, space, model, split.name, seed)] = _fit_space(
                            parts_dir, f"{space}-{ae_tag}", space, entry["spaces"][space], model, config, dataset, split, seed, device, timings
                        )
                    if model != "deep":
                        continue
                    for variant in config.latent_variants:
                        teacher = image["train_logits"] if variant == "distilled" else None
                        predictions[(a, variant, model, split.name, seed)] = _fit_space(
                            parts_dir, f"latent-{variant}-{ae_tag}", "latent", entry["spaces"]["latent"], model, config, dataset, split, seed, device, timings, variant, teacher
                        )

    results = _summarise(config, dataset, splits, results_by_ae, predictions, models)
    results["timings_seconds"] = {**timings, "total": time.perf_counter() - started}
    results["provenance"] = provenance(config=asdict(config), device=device)
    results["samples"] = _sample_grid(dataset, splits, results_by_ae)
    write_results(out / "results.json", results)
    write_report(out / "report.html", results)
    return results


def load_images(dataset: ImageDataset, batch: int = 512) -> torch.Tensor:
    from ..data.base import check_finite

    return torch.cat([check_finite(dataset.load(np.arange(i, min(i + batch, len(dataset)))), dataset.name) for i in range(0, len(dataset), batch)])


def _fit_space(
    parts_dir: Path, tag: str, space: str, data: SpaceData, model: str, config: GapConfig, dataset: ImageDataset, split: Split, seed: int, device, timings: dict,
    variant: str | None = None, teacher_logits: np.ndarray | None = None,
) -> dict:
    """Train one classifier and predict the test split, or reuse the stored predictions.

    Deep models also store their logits on the training split (the distillation teacher's targets);
    noise-conditioned variants also store test predictions over a sweep of noise levels."""
    path = parts_dir / f"{tag}-{model}-{split.name}-seed{seed}.npz"
    if path.is_file():
        stored = dict(np.load(path))
        if np.array_equal(stored["test_indices"], split.test):
            return {**stored, "epochs": int(stored["epochs"]), "seconds": float(stored["seconds"]), "resumed": True}
    seed_everything(seed)
    y = dataset.labels
    t0 = time.perf_counter()
    scaler = SpaceScaler(config.latent_std if space == "latent" else 1.0).fit(data.take(split.train))
    x_train, x_val, x_test = (scaler.transform(data.take(part)) for part in (split.train, split.val, split.test))
    record = {"test_indices": split.test}
    if model == "linear":
        clf = LinearProbe(seed=seed).fit(x_train, y[split.train], dataset.task)
        record["epochs"] = 0
    else:
        clf = DeepClassifier(config.train_config(seed, variant), latent_space=space == "latent", device=str(device), progress=config.progress, name=f"{tag} {split.name} seed {seed}")
        teacher = torch.from_numpy(teacher_logits) if teacher_logits is not None else None
        clf.fit(x_train, y[split.train], x_val, y[split.val], dataset.task, teacher_logits=teacher)
        record["epochs"] = clf.best_epoch_ + 1
        record["train_logits"] = clf.logits(x_train).numpy()
        if variant is not None:
            sigmas = sigma_grid(config.sweep_points)
            noise = torch.randn(x_test.shape, generator=torch.Generator().manual_seed(seed))  # the same noise at every sigma
            record["sweep_sigmas"] = sigmas.numpy()
            record["sweep_probs"] = np.stack([clf.predict_proba(x_test + float(sigma) * noise, sigma=float(sigma)) for sigma in sigmas])
    record["probs"] = clf.predict_proba(x_test)
    record["seconds"] = time.perf_counter() - t0
    atomic_write(path, lambda tmp: _savez(tmp, record))
    timings[f"train {model} {tag} {split.name} seed{seed}"] = record["seconds"]
    return {**record, "resumed": False}


def _savez(path: Path, arrays: dict) -> None:
    with open(path, "wb") as handle:  # a handle, so numpy does not append ".npz" to the temporary name
        np.savez(handle, **arrays)


def _summarise(config: GapConfig, dataset: ImageDataset, splits: list[Split], results_by_ae: list[dict], predictions: dict, models: list[str]) -> dict:
    task = dataset.task
    test = np.concatenate([s.test for s in splits])  # out-of-fold: every test sample once per seed
    labels = dataset.labels[test]
    idx = bootstrap_indices(labels, task, config.bootstrap, seed=config.seeds[0])
    rows = []
    for a, entry in enumerate(results_by_ae):
        for model in models:
            pooled = {space: [np.concatenate([predictions[(a, space, model, s.name, seed)]["probs"] for s in splits]) for seed in config.seeds] for space in SPACES}
            # Replicate score = mean over seeds of the score on the same resample.
            reps = {space: _mean_over_seeds([replicate_scores(task, labels, p, idx) for p in pooled[space]]) for space in SPACES}
            points = {space: _mean_over_seeds([score(task, labels, p) for p in pooled[space]]) for space in SPACES}
            row = {"autoencoder": entry["autoencoder"]["spec"], "model": model, "scores": {}, "gaps": {}, "per_split": {}}
            for space in SPACES:
                row["scores"][space] = {m: {"value": float(points[space][m]), "ci95": interval(reps[space][m])} for m in METRICS}
            for gap, (hi, lo) in {"fidelity": ("image", "reconstruction"), "learnability": ("reconstruction", "latent")}.items():
                row["gaps"][gap] = {}
                for m in METRICS:
                    ci = interval(reps[hi][m] - reps[lo][m])
                    row["gaps"][gap][m] = {"value": float(points[hi][m] - points[lo][m]), "ci95": ci, "excludes_zero": bool(ci[0] > 0 or ci[1] < 0)}
            per_split = {space: [score(task, dataset.labels[s.test], predictions[(a, space, model, s.name, seed)]["probs"])["auroc"] for seed in config.seeds for s in splits] for space in SPACES}
            row["per_split"] = {"runs": [f"{s.name}/seed{seed}" for seed in config.seeds for s in splits], "auroc": per_split}
            row["paired_test_latent_vs_reconstruction"] = paired_test(per_split["latent"], per_split["reconstruction"]) if len(per_split["latent"]) >= 2 else None
            row["epochs"] = {space: [predictions[(a, space, model, s.name, seed)]["epochs"] for seed in config.seeds for s in splits] for space in SPACES}
            if model == "deep" and len(config.seeds) == 1 and dataset.task != "multilabel":
                row["roc"] = {space: _roc_points(task, labels, pooled[space][0]) for space in SPACES}
            if model == "deep" and config.latent_variants:
                row["variants"] = {v: _variant_summary(config, task, labels, splits, predictions, a, v, reps, points, idx) for v in config.latent_variants}
            rows.append(row)
    return {
        "kind": "medlatent.gap",
        "dataset": dataset.describe(),
        "splits": [{"name": s.name, **s.sizes()} for s in splits],
        "autoencoders": [{**e["autoencoder"], "reconstruction_quality": e["quality"], "latent_shape": e["latent_shape"], "cache": e["cache"]} for e in results_by_ae],
        "rows": rows,
        "primary_metric": "auroc",
    }


def _variant_summary(config: GapConfig, task: str, labels: np.ndarray, splits: list[Split], predictions: dict, a: int, variant: str, reps: dict, points: dict, idx: np.ndarray) -> dict:
    """Scores of a latent variant, the share of the learnability gap it closes, and its sigma sweep.

    share closed = (score(variant) - score(latent)) / (score(reconstruction) - score(latent)),
    undefined (None) where the learnability gap's interval contains zero."""
    runs = [[predictions[(a, variant, "deep", s.name, seed)] for s in splits] for seed in config.seeds]
    pooled = [np.concatenate([r["probs"] for r in seed_runs]) for seed_runs in runs]
    v_reps = _mean_over_seeds([replicate_scores(task, labels, p, idx) for p in pooled])
    v_points = _mean_over_seeds([score(task, labels, p) for p in pooled])
    out = {"scores": {m: {"value": float(v_points[m]), "ci95": interval(v_reps[m])} for m in METRICS}, "share_of_gap_closed": {}}
    for m in METRICS:
        gap_reps = reps["reconstruction"][m] - reps["latent"][m]
        lo, hi = interval(gap_reps)
        if lo <= 0 <= hi:
            out["share_of_gap_closed"][m] = None
            continue
        gap = points["reconstruction"][m] - points["latent"][m]
        with np.errstate(divide="ignore", invalid="ignore"):
            share_reps = (v_reps[m] - reps["latent"][m]) / gap_reps
        out["share_of_gap_closed"][m] = {"value": float((v_points[m] - points["latent"][m]) / gap), "ci95": interval(share_reps)}
    sigmas = runs[0][0]["sweep_sigmas"]
    sweep = {"sigma": sigmas.tolist(), "auroc": [], "balanced_accuracy": []}
    for k in range(len(sigmas)):
        per_seed = [score(task, labels, np.concatenate([r["sweep_probs"][k] for r in seed_runs])) for seed_runs in runs]
        sweep["auroc"].append(float(np.mean([p["auroc"] for p in per_seed])))
        sweep["balanced_accuracy"].append(float(np.mean([p["balanced_accuracy"] for p in per_seed])))
    out["sigma_sweep"] = sweep
    return out


def _mean_over_seeds(scores: list[dict]) -> dict:
    return {m: np.mean([s[m] for s in scores], axis=0) for m in METRICS}


def _roc_points(task: str, labels: np.ndarray, probs: np.ndarray, points: int = 101) -> dict:
    """ROC curve (binary; micro-averaged one-vs-rest otherwise) on a fixed FPR grid."""
    from sklearn.metrics import roc_curve
    from sklearn.preprocessing import label_binarize

    if probs.shape[1] == 2:
        fpr, tpr, _ = roc_curve(labels, probs[:, 1])
    else:
        fpr, tpr, _ = roc_curve(label_binarize(labels, classes=np.arange(probs.shape[1])).ravel(), probs.ravel())
    grid = np.linspace(0, 1, points)
    return {"fpr": grid.round(4).tolist(), "tpr": np.interp(grid, fpr, tpr).round(4).tolist()}


def _sample_grid(dataset: ImageDataset, splits: list[Split], results_by_ae: list[dict], count: int = 8) -> dict:
    """A few test images and their reconstructions, as uint8 lists, for the report's grid."""
    rng = np.random.default_rng(0)
    test = splits[0].test
    chosen = np.sort(rng.choice(test, size=min(count, len(test)), replace=False))
    to_uint8 = lambda t: (t.float().clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy().tolist()  # noqa: E731
    return {
        "indices": chosen.tolist(),
        "labels": dataset.labels[chosen].tolist(),
        "original": to_uint8(results_by_ae[0]["spaces"]["image"].take(chosen)),
        "reconstructions": {e["autoencoder"]["spec"]: to_uint8(e["spaces"]["reconstruction"].take(chosen)) for e in results_by_ae},
    }
