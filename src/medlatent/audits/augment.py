"""Generative augmentation: does synthetic data from a latent diffusion model help a classifier?

For each seed and space (image, latent), three classifiers are trained by the audit's protocol
(`TrainConfig`, early stopping on the *real* validation images) on

- real: the split's real training images;
- real+synthetic: those plus synthetic ones (`--synthetic balance`: each class topped up to the
  largest; RATIO: that many per real image of each class);
- synthetic: synthetic images only, as many per class as the real training set has;

and all are tested on the split's real test images, which the diffusion model never saw (its
split is saved with it). Scores: AUROC, balanced accuracy and MCC, the mean over seeds with 95%
intervals, and the difference of each condition against real only with paired intervals (the
same bootstrap resamples of the test set for every condition, or t intervals of the per-seed
differences). The real-only image classifier of each seed also judges the synthetic images
(class consistency, Frechet distance, precision/recall, near copies): it is independent of the
diffusion model and of any guidance.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..autoencoders import load_autoencoder
from ..cache import LatentCache
from ..classifiers import DeepClassifier
from ..classifiers.space import fit_space_classifier, predict_raw
from ..config import DataConfig
from ..data import load_dataset
from ..data.spaces import dataset_parts, encode_spaces, load_images
from ..data.splits import Split
from ..device import fix_threads, resolve_device, seed_everything
from ..diffusion.quality import score_samples
from ..errors import MedlatentInputError
from ..evaluation.aggregate import RunScores, RunTests, gap_summary, resolve_method
from ..evaluation.metrics import METRICS
from ..evaluation.summaries import run_health
from ..io import atomic_write
from ..pipelines.latent_diffusion import LatentDiffusion, save_grid
from ..reports import provenance
from ..rundir import check_out, finish_run, mark, stored_or_computed
from .config import CONDITIONS, AugmentConfig


def synthetic_counts(real_counts: np.ndarray, ratio: float | None) -> dict[str, np.ndarray]:
    """Synthetic images per class for each condition: `real+synthetic` (balance: up to the largest
    class; else round(ratio * n_c)) and `synthetic` (the real class counts)."""
    added = real_counts.max() - real_counts if ratio is None else np.round(ratio * real_counts).astype(np.int64)
    return {"real+synthetic": added.astype(np.int64), "synthetic": real_counts.astype(np.int64)}


def run_augment(config: AugmentConfig, log=None) -> dict:
    """Train and test every (seed, space, condition); write results.json and report.html into
    `config.run.out` and return the results. A rerun resumes from the classifiers already stored."""
    started = time.perf_counter()
    out = check_out(config.run.out, "augment", resumable=True)
    fix_threads(config.train.loop.threads)
    device = resolve_device(config.run.device)
    ldm, data, dataset, autoencoder = _checked_model(config)
    split, y = ldm.split, dataset.labels
    real_counts = np.bincount(y[split.train], minlength=len(ldm.class_names))
    counts = synthetic_counts(real_counts, config.synthetic_ratio())
    model_hash = _file_hash(ldm.folder / "model.safetensors")  # the resolved folder (hf-hub: specs too)
    parts_dir = out / "parts" / config.protocol_hash(model_hash)
    mark(out, "augment")  # before its first part: a resume finds the folder marked
    total = len(config.run.seeds) * len(config.spaces) * len(CONDITIONS)
    if log:
        log(
            f"augment: {dataset.name} "
            f"({', '.join(f'{n} {c}' for n, c in zip(ldm.class_names, real_counts, strict=False))} "
            f"real training images), test on {len(split.test)} held-out images; synthetic per class: "
            f"+{', +'.join(map(str, counts['real+synthetic']))} ({config.synthetic}); "
            f"{len(config.run.seeds)} seed(s) x {len(config.spaces)} space(s) x {len(CONDITIONS)} conditions "
            f"= {total} classifier trainings"
        )
    t0 = time.perf_counter()
    real = {"image": load_images(dataset)} if "image" in config.spaces else {}
    if "latent" in config.spaces:
        cache = LatentCache(data.cache_dir, progress=config.run.progress)
        _, spaces = encode_spaces(dataset, dataset_parts(dataset, data.folds), autoencoder, cache, device)
        real["latent"] = spaces["latent"].take(np.arange(len(dataset)))
    timings = {"real inputs": time.perf_counter() - t0}
    records, quality, grids = _seed_runs(
        config, ldm, autoencoder, dataset, real, counts, (out, parts_dir), device, timings
    )
    results = _summarise(config, dataset, split, records, quality, counts, real_counts)
    results["synthetic_grids"] = grids
    results["model"] = {
        "path": str(config.model),
        "sha256": model_hash,
        "autoencoder": ldm.record["autoencoder"],
        "autoencoder_hash": ldm.record["autoencoder_hash"],
        "diffusion": ldm.record["config"],
    }
    results["timings_seconds"] = {
        **timings,
        "classifiers": sum(float(r["seconds"]) for r in records.values()),
        "total": time.perf_counter() - started,
    }
    results["resumed_classifiers"] = sum(bool(r["resumed"]) for r in records.values())
    results["provenance"] = provenance(config=asdict(config), device=device)
    finish_run(out, "augment", results, config)
    return results


def _checked_model(config: AugmentConfig) -> tuple[LatentDiffusion, DataConfig, object, object]:
    """The diffusion model, its data settings, dataset and autoencoder, checked before any work:
    single-label, the same classes, test images it never learnt from, the same autoencoder weights."""
    ldm = LatentDiffusion(config.model, device=config.run.device)
    ldm.require_decoder("augment")
    data = DataConfig(**ldm.record["data"])
    dataset = load_dataset(data.dataset, data.size, **data.csv_options())
    if dataset.task == "multilabel":
        raise MedlatentInputError(
            f"--model {config.model}: augment is built for single-label datasets; {dataset.name} is multi-label"
        )
    if [str(c) for c in dataset.class_names] != ldm.class_names:
        raise MedlatentInputError(
            f"--model {config.model}: its classes ({', '.join(ldm.class_names)}) are "
            f"not those of {dataset.name} ({', '.join(map(str, dataset.class_names))})"
        )
    # Cannot happen for a model saved by diffusion train; checked because it is the premise.
    if np.intersect1d(ldm.split.test, ldm.trained_on).size:
        raise MedlatentInputError(
            f"--model {config.model}: it was trained on some of its test "
            "images; train it again with `medlatent diffusion train`"
        )
    autoencoder = load_autoencoder(ldm.record["autoencoder"], device=config.run.device, progress=config.run.progress)
    if autoencoder.content_hash != ldm.record["autoencoder_hash"]:
        raise MedlatentInputError(
            f"{ldm.record['autoencoder']}: its weights differ from those the model was trained on"
        )
    return ldm, data, dataset, autoencoder


def _seed_runs(config: AugmentConfig, ldm, autoencoder, dataset, real: dict, counts: dict, folders, device, timings):
    """Per seed: its synthetic images, the classifiers of every (space, condition) and the judge's
    quality measures of the synthetic images. folders: the run folder and its parts folder.
    Returns the records, the qualities and the grids."""
    split, y = ldm.split, dataset.labels
    out, parts_dir = folders
    pool_counts = np.maximum(counts["real+synthetic"], counts["synthetic"])
    records: dict[tuple[int, str, str], dict] = {}
    quality, grids = [], None
    total = len(config.run.seeds) * len(config.spaces) * len(CONDITIONS)
    counter = tqdm(total=total, desc="classifiers", unit="fit", disable=not config.run.progress)
    for seed in config.run.seeds:
        t0 = time.perf_counter()
        latents, labels = _synthetic_pool(
            parts_dir / f"synthetic-seed{seed}.safetensors", ldm, pool_counts, config, seed
        )
        images = autoencoder.restore(ldm.decode(latents, autoencoder), dataset.channels, dataset.size)
        timings[f"synthetic seed{seed}"] = time.perf_counter() - t0
        if grids is None:
            grids = _write_grids(out, images, labels, ldm.class_names)
        synthetic = {"image": images, "latent": latents}
        for space in config.spaces:
            for condition in CONDITIONS:
                x, target = _training_set(real[space], synthetic[space], y, split.train, labels, counts, condition)
                counter.set_postfix_str(f"{space} {condition} seed {seed}")
                records[(seed, space, condition)] = _fit(
                    parts_dir, space, condition, seed, x, target, real[space], y, split, dataset, config, device
                )
                counter.update()
        if "image" in config.spaces:
            judge = DeepClassifier.from_pretrained(parts_dir / f"image-real-seed{seed}", device=str(device))
            keep = _take_per_class(labels, counts["synthetic"])
            quality.append(
                score_samples(
                    judge,
                    images[keep],
                    labels[keep],
                    ldm.class_names,
                    real["image"][split.test],
                    real["image"][ldm.trained_on],
                )
            )
    counter.close()
    return records, quality, grids


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _synthetic_pool(
    path: Path, ldm: LatentDiffusion, per_class: np.ndarray, config: AugmentConfig, seed: int
) -> tuple[torch.Tensor, np.ndarray]:
    """`per_class[c]` latents of each class c, sampled once per seed and stored (a rerun reads them)."""
    if path.is_file():
        stored = load_file(path)
        if np.array_equal(np.bincount(stored["labels"].numpy(), minlength=len(per_class)), per_class):
            return stored["latents"], stored["labels"].numpy()
    labels = torch.from_numpy(np.repeat(np.arange(len(per_class)), per_class))
    latents = (
        ldm.sample(labels, steps=config.sample_steps, cfg=config.cfg, seed=seed, sampler=config.sampler)
        if len(labels)
        else torch.zeros(0)
    )
    atomic_write(
        path, lambda tmp: save_file({"latents": latents.contiguous(), "labels": labels.contiguous()}, str(tmp))
    )
    return latents, labels.numpy()


def _take_per_class(labels: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Indices of the first counts[c] entries of each class c."""
    return np.concatenate([np.flatnonzero(labels == c)[:n] for c, n in enumerate(counts)]).astype(np.int64)


def _training_set(
    real: torch.Tensor,
    synthetic: torch.Tensor,
    y: np.ndarray,
    train: np.ndarray,
    labels: np.ndarray,
    counts: dict,
    condition: str,
):
    if condition == "real":
        return real[train], y[train]
    keep = _take_per_class(labels, counts[condition])
    if condition == "synthetic":
        return synthetic[keep], labels[keep]
    return torch.cat([real[train], synthetic[keep].to(real.dtype)]), np.concatenate([y[train], labels[keep]])


def _fit(
    parts_dir: Path,
    space: str,
    condition: str,
    seed: int,
    x: torch.Tensor,
    target: np.ndarray,
    real: torch.Tensor,
    y: np.ndarray,
    split: Split,
    dataset,
    config: AugmentConfig,
    device,
) -> dict:
    """One classifier: trained on (x, target), early-stopped on the real validation images, its
    test probabilities stored (a rerun reads them); the real-only image classifier is also saved
    (it judges the synthetic images)."""
    tag = f"{space}-{condition.replace('+', '-')}-seed{seed}"
    judge = parts_dir / f"image-real-seed{seed}" if (space, condition) == ("image", "real") else None
    checkpoints = parts_dir / "checkpoints" / tag

    def fit() -> dict:
        seed_everything(seed)
        t0 = time.perf_counter()
        clf = fit_space_classifier(
            space,
            (x, target),
            (real[split.val], y[split.val]),
            dataset.task,
            config.train_config(seed),
            latent_std=config.run.latent_std,
            num_outputs=dataset.num_outputs,
            device=device,
            progress=config.run.progress,
            name=tag,
            checkpoint_dir=checkpoints,
        )
        record = {
            "probs": predict_raw(clf, real[split.test]),
            "best_epoch": clf.best_epoch_,
            "stop_reason": np.array(clf.stop_reason_),
            "train_size": len(target),
            **{f"history_{k}": v for k, v in clf.history_arrays().items()},
            "seconds": time.perf_counter() - t0,
        }
        if judge is not None:
            clf.save_pretrained(judge)  # atomic: built beside and renamed
        return record

    record, stored = stored_or_computed(
        parts_dir / f"{tag}.npz", fit, lambda _: judge is None or (judge / "estimator.json").is_file()
    )
    shutil.rmtree(checkpoints, ignore_errors=True)
    return {**record, "seconds": float(record["seconds"]), "resumed": stored}


def _summarise(
    config: AugmentConfig,
    dataset,
    split: Split,
    records: dict,
    quality: list[dict],
    counts: dict,
    real_counts: np.ndarray,
) -> dict:
    task, seeds = dataset.task, config.run.seeds
    method = resolve_method(config.run.interval, len(seeds))
    labels = dataset.labels[split.test]
    tests = RunTests.build(
        [f"seed{s}" for s in seeds], [labels] * len(seeds), [0] * len(seeds), task, config.run.bootstrap, seed=seeds[0]
    )  # one test set: shared resamples
    table = {}
    for space in config.spaces:
        scores = {c: RunScores.of(task, tests, [records[(s, space, c)]["probs"] for s in seeds]) for c in CONDITIONS}
        rows = {}
        for condition in CONDITIONS:
            runs = [records[(s, space, condition)] for s in seeds]
            health = run_health(task, [f"seed{s}" for s in seeds], runs)
            rows[condition] = {
                "scores": scores[condition].summary(method),
                "per_seed": {m: scores[condition].points[m].tolist() for m in METRICS},
                "difference_vs_real": None
                if condition == "real"
                else gap_summary(scores[condition], scores["real"], method),
                "train_size": int(runs[0]["train_size"]),
                "health": health,
                "flagged": any(h["flags"] for h in health),
            }
        table[space] = rows
    return {
        "kind": "augment",
        "dataset": dataset.describe(),
        "class_names": [str(c) for c in dataset.class_names],
        "split": {"name": split.name, **split.sizes()},
        "real_train_counts": real_counts.tolist(),
        "synthetic_counts": {k: v.tolist() for k, v in counts.items()},
        "interval_method": method,
        "metrics": list(METRICS),
        "table": table,
        "quality": _mean_quality(quality) if quality else None,
        "quality_per_seed": quality,
    }


def _mean_quality(per_seed: list[dict]) -> dict:
    """The quality measures averaged over seeds (each seed: its own synthetic images and judge)."""
    mean = lambda key: float(np.mean([q[key] for q in per_seed]))  # noqa: E731
    classes = per_seed[0]["class_consistency"]
    return {
        "class_consistency": {c: float(np.mean([q["class_consistency"][c] for q in per_seed])) for c in classes},
        "frechet_distance": mean("frechet_distance"),
        "precision": mean("precision"),
        "recall": mean("recall"),
        "near_copy_share": float(np.mean([q["memorisation"]["near_copy_share"] for q in per_seed])),
        "seeds": len(per_seed),
    }


def _write_grids(
    out: Path, images: torch.Tensor, labels: np.ndarray, class_names: list[str], per_class: int = 16
) -> dict[str, str]:
    """samples/<class>.png: the first synthetic images of each class (seed of the first run)."""
    grids = {}
    for c, name in enumerate(class_names):
        chosen = np.flatnonzero(labels == c)[:per_class]
        if len(chosen):
            relative = f"samples/synthetic-{c}.png"
            save_grid(images[chosen], out / relative, nrow=8)
            grids[name] = relative
    return grids
