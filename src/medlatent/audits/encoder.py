"""The encoder audit (`medlatent audit`): how a latent space treats images, section by section.

- perturbation: for each family and severity (`data.perturbations`), the latent displacement
  against the pixel displacement (both in units of their space's per-channel std), their ratio
  and rank correlation; shift equivariance (translating the image by the encoder's stride against
  translating its latent by one cell); the reconstruction's PSNR under perturbation.
- neighbourhood: k-NN overlap, trustworthiness and continuity of pixel space -> latent space, and
  class separation (silhouette) in each space; also for the image classifier's penultimate features.
- probes: synthetic lesions of known diameter and contrast inserted into real images; per cell,
  does the lesion survive the reconstruction (matched-filter response of the change it makes,
  1 = kept, 0 = removed) and how well a linear probe and a small CNN detect it in each space: the
  learnability map, with image - latent (and reconstruction - latent) gaps of either sign.
- robustness: the space classifiers evaluated on perturbed test sets at each severity; and Shi et
  al.'s protocol (ICLR 2023): frozen representations, a logistic-regression head trained on n
  out-of-distribution samples, evaluated out of distribution.
- information: mutual information with the label (`evaluation.information`, PCA-reduced) and
  V-information of the linear and CNN families, per space.
- shortcuts (only when chosen; it needs the dataset's confounder): the confounder's learnability
  from each space and each space classifier's reliance on it, before and after retraining its last
  layer on a little decorrelated data (`audits.shortcuts`).
- concepts (only when chosen; it needs the dataset's concepts): concept bottlenecks in each space,
  each concept's AUROC, the task through the bottleneck against the plain classifier and
  intervention curves (`audits.concepts`).

Encoder-only spaces (no decoder) skip what needs decoding, with the reason stated. results.json
holds one card per autoencoder; one report per autoencoder, and an index, go beside it.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, replace

import numpy as np
import torch
from scipy.stats import spearmanr

from ..autoencoders import display_name, load_autoencoder
from ..classifiers.space import fit_space_classifier, predict_raw
from ..data import load_dataset, make_splits
from ..data.perturbations import perturb, translate
from ..data.spaces import encode_images, tensor_spaces
from ..device import fix_threads, resolve_device
from ..errors import MedlatentInputError
from ..evaluation.information import infonce_mi, label_mi, pca_reduce, subsample_interval, v_information
from ..evaluation.metrics import bootstrap_indices, interval, replicate_scores, score
from ..evaluation.neighbourhood import class_separation, neighbourhood_scores
from ..reports.provenance import provenance
from ..rundir import check_out, finish_run
from .concepts import concepts_section
from .config import EncoderAuditConfig
from .shortcuts import check_confounder, shortcuts_section

NO_DECODER = "skipped: an encoder-only latent space has no decoder"


def run_encoder_audit(config: EncoderAuditConfig, log=None) -> dict:
    """Audit every autoencoder, section by section, on one split of the dataset; write results.json
    and one report per autoencoder into `config.run.out` and return the results."""
    started = time.perf_counter()
    out = check_out(config.run.out, "audit", resumable=True)
    fix_threads(config.train.loop.threads)
    device = resolve_device(config.run.device)
    autoencoders, dataset, split, shift = _checked_inputs(config)
    rng = np.random.default_rng(config.run.seed)
    sample = np.sort(rng.choice(split.test, size=min(config.n, len(split.test)), replace=False))
    if log:
        log(
            f"audit: {len(autoencoders)} autoencoder(s) on {dataset.name} "
            f"({len(sample)} test images sampled), sections {', '.join(config.sections)}"
        )
    shared: dict = {}  # the image-space classifier, trained once for every autoencoder
    cards = [
        _card(ae.to(device).eval(), spec, dataset, split, sample, shift, config, device, shared)
        for ae, spec in zip(autoencoders, config.autoencoders, strict=True)
    ]
    results = {
        "kind": "medlatent.audit",
        "dataset": dataset.describe(),
        "split": {"name": split.name, **split.sizes()},
        "sample": len(sample),
        "shift": shift["name"],
        "autoencoders": cards,
        "seconds": time.perf_counter() - started,
        "provenance": provenance(config=asdict(config), device=device),
    }
    finish_run(out, "audit", results, config)
    return results


def _checked_inputs(config: EncoderAuditConfig) -> tuple[list, object, object, dict]:
    """The autoencoders, the dataset, its split and the shift, checked before any work (the
    dataset first: its errors come before an autoencoder is downloaded or built)."""
    dataset = load_dataset(
        config.data.dataset,
        config.data.size,
        confounder_column=config.confounder_column,
        concept_columns=config.concept_columns,
        **config.data.csv_options(),
    )
    if dataset.task == "multilabel":
        raise MedlatentInputError(
            f"--dataset {config.data.dataset}: the encoder audit is built for single-label tasks"
        )
    check_confounder(dataset, config.sections)
    autoencoders = [
        load_autoencoder(spec, device=config.run.device, progress=config.run.progress) for spec in config.autoencoders
    ]
    split = make_splits(
        dataset,
        config.data.folds,
        seed=config.run.seed,
        val_fraction=config.data.val_fraction,
        train_limit=config.data.train_limit,
    )[0]
    shift = _shift(config, dataset, split)
    too_many = [n for n in config.ood_n if n > shift["pool_size"]]
    if "robustness" in config.sections and too_many:
        raise MedlatentInputError(
            f"--ood-n {too_many[0]}: larger than the {shift['pool_size']} "
            f"out-of-distribution training images of --shift {config.shift}"
        )
    too_large = [d for d in config.lesion_sizes if 2 * (int(np.ceil(d / 2)) + 1) >= dataset.size]
    if "probes" in config.sections and too_large:
        raise MedlatentInputError(
            f"--lesion-size {too_large[0]:g}: too large for {dataset.size} "
            f"px images; use diameters under {dataset.size - 4} px"
        )
    return autoencoders, dataset, split, shift


def _card(ae, spec: str, dataset, split, sample, shift, config: EncoderAuditConfig, device, shared: dict) -> dict:
    """One autoencoder's card: each chosen section's results and the seconds it took."""
    images, labels = dataset.load(sample), dataset.labels[sample]
    # sections that need the space classifiers (shortcuts: without the noise-conditioned variant)
    trains = bool({"robustness", "information", "shortcuts", "concepts"} & set(config.sections))
    card = {"autoencoder": {**ae.describe(), "name": display_name(spec)}, "sections": {}}
    z0, r0 = encode_images(ae, images, device, dataset)
    inputs = {"image": images, "latent": z0, **({"reconstruction": r0} if r0 is not None else {})}  # the test sample
    memo: dict = {}  # this autoencoder's encoded training part and classifiers, made once for every section

    def classifiers(variants: bool = True) -> dict:
        return _space_classifiers(ae, dataset, split, config, device, shared, memo, variants)

    for section in config.sections:
        t0 = time.perf_counter()
        if section == "perturbation":
            result = perturbation_section(ae, images, z0, r0, config, device, dataset)
        elif section == "neighbourhood":
            result = neighbourhood_section(images, z0, labels, config, classifiers(False) if trains else {}, device)
        elif section == "probes":
            result = probe_section(ae, dataset, split, config, device)
        elif section == "robustness":
            result = robustness_section(ae, dataset, split, sample, config, device, shift, classifiers())
        elif section == "shortcuts":
            result = shortcuts_section(ae, dataset, split, sample, inputs, config, device, classifiers(False))
        elif section == "concepts":
            train_inputs = _train_spaces(ae, dataset, split, device, memo)
            result = concepts_section(
                dataset, split, sample, inputs, train_inputs, config, device, classifiers(False), shared
            )
        else:
            spaces = _train_spaces(ae, dataset, split, device, memo)
            result = information_section(spaces, dataset, split, images, z0, r0, labels, config, classifiers())
        result["seconds"] = time.perf_counter() - t0
        card["sections"][section] = result
    return card


# -- encoding -------------------------------------------------------------------------------------


def _rms(delta: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """Per-sample RMS of a difference in units of each channel's std."""
    return (delta / scale.view(1, -1, 1, 1)).pow(2).mean(dim=(1, 2, 3)).sqrt().numpy()


def _channel_std(x: torch.Tensor) -> torch.Tensor:
    """Per-channel std, floored at 1% of the mean one: a dead (constant) channel would otherwise
    turn any change into an enormous number of its own units."""
    std = x.transpose(0, 1).reshape(x.shape[1], -1).std(dim=1)
    return std.clamp_min(max(1e-2 * float(std.mean()), 1e-8))


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a - b).pow(2).mean())
    return float(10 * np.log10(1.0 / max(mse, 1e-12)))


# -- sections -------------------------------------------------------------------------------------


def perturbation_section(
    ae,
    images: torch.Tensor,
    z0: torch.Tensor,
    clean_recon: torch.Tensor | None,
    config: EncoderAuditConfig,
    device,
    dataset,
) -> dict:
    sx, sz = _channel_std(images), _channel_std(z0)
    families = {}
    for family in config.perturbations:
        rows, pixel_all, latent_all = [], [], []
        for severity in config.severities:
            xp = perturb(images, family, severity, seed=config.run.seed)
            zp, rp = encode_images(ae, xp, device, dataset)
            pixel, latent = _rms(xp - images, sx), _rms(zp - z0, sz)
            pixel_all.append(pixel)
            latent_all.append(latent)
            row = {
                "severity": severity,
                "pixel_displacement": float(pixel.mean()),
                "latent_displacement": float(latent.mean()),
                "ratio": float(latent.mean() / max(pixel.mean(), 1e-12)),
            }
            if rp is not None:
                row["reconstruction_psnr"] = _psnr(rp, xp)
            rows.append(row)
        pixel_all, latent_all = np.concatenate(pixel_all), np.concatenate(latent_all)
        rho = (
            spearmanr(pixel_all, latent_all).statistic
            if np.ptp(pixel_all) > 0 and np.ptp(latent_all) > 0
            else float("nan")
        )
        families[family] = {"severities": rows, "rank_correlation": float(rho)}
    result = {"families": families, "shift_equivariance": shift_equivariance(ae, images, device)}
    result["clean_reconstruction_psnr"] = _psnr(clean_recon, images) if clean_recon is not None else None
    if clean_recon is None:
        result["reconstruction"] = NO_DECODER
    return result


@torch.no_grad()
def shift_equivariance(ae, images: torch.Tensor, device) -> dict:
    """Translate the (prepared) image by the encoder's stride f and its latent by one cell: the
    error between encode(shift_f(x)) and shift_1(encode(x)), relative to the error of not
    shifting the latent at all (0: exactly equivariant; 1: no better than ignoring the shift).
    The first latent row and column are left out (the reflected border differs there)."""
    x = ae.prepare(images.to(device))
    f = int(ae.downsampling_factor)
    if x.shape[-1] < 4 * f:
        return {"error": None, "reason": f"the working size {x.shape[-1]} is under 4 strides ({f} px)"}
    z = ae.encode(x).float()
    zs = ae.encode(translate(x, f, f)).float()
    expected = translate(z, 1, 1)
    inner = (..., slice(1, None), slice(1, None))
    err, baseline = (zs - expected)[inner].pow(2).mean().sqrt(), (zs - z)[inner].pow(2).mean().sqrt()
    return {"stride": f, "error": float(err / baseline.clamp_min(1e-12)), "absolute_error": float(err)}


def neighbourhood_section(
    images: torch.Tensor, z0: torch.Tensor, labels: np.ndarray, config: EncoderAuditConfig, classifiers: dict, device
) -> dict:
    # Each space's own geometry: Euclidean distances of the latents as the encoder gives them
    # (rank-based measures ignore a global scale; a pixel-shuffling encoder keeps every rank).
    ks = config.neighbours
    z, x = z0.numpy(), images.numpy()
    result = {
        "latent": neighbourhood_scores(x, z, ks),
        "silhouette": {"image": class_separation(x, labels), "latent": class_separation(z, labels)},
    }
    image_clf = classifiers.get("image")
    if image_clf is not None:
        features = penultimate(image_clf, images, device)
        result["image_classifier_features"] = neighbourhood_scores(x, features, ks)
        result["silhouette"]["image_classifier_features"] = class_separation(features, labels)
    return result


@torch.no_grad()
def penultimate(clf, images: torch.Tensor, device) -> np.ndarray:
    """The pooled features before an image classifier's last layer."""
    model = clf.model_.to(device).eval()
    x = clf.input_scaler.transform(images).to(device)
    backbone = model.backbone
    return backbone.forward_head(backbone.forward_features(x), pre_logits=True).float().cpu().numpy()


def insert_lesions(
    images: torch.Tensor, diameter: float, contrast: float, rng: np.random.Generator
) -> tuple[torch.Tensor, np.ndarray]:
    """Add a soft disk of the given diameter (pixels) and intensity at a random position (wholly
    inside the image); returns the images and the lesion maps (n, H, W)."""
    n, _, h, w = images.shape
    radius = diameter / 2
    margin = int(np.ceil(radius)) + 1
    if 2 * margin >= min(h, w):
        raise MedlatentInputError(
            f"--lesion-size {diameter:g}: too large for {w}x{h} images; use diameters under {min(h, w) - 4} px"
        )
    cy, cx = rng.integers(margin, h - margin, n), rng.integers(margin, w - margin, n)
    yy, xx = np.mgrid[0:h, 0:w]
    dist = np.sqrt((yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2)
    # a disk with a one-pixel linear edge, so sub-pixel diameters still add some intensity
    maps = contrast * np.clip(radius + 0.5 - dist, 0.0, 1.0)
    return (images + torch.from_numpy(maps).float()[:, None]).clamp(0, 1), maps


def survival(ae, clean: torch.Tensor, reconstructed: torch.Tensor, maps: np.ndarray, device, dataset) -> np.ndarray:
    """Per image, the matched-filter response of the change a lesion makes in the reconstruction:
    <recon(x + L) - recon(x), L> / <L, L> (channels averaged); 1 kept, 0 removed."""
    change = (reconstructed - encode_images(ae, clean, device, dataset)[1]).mean(1).numpy().reshape(len(maps), -1)
    template = maps.reshape(len(maps), -1)
    return (change * template).sum(1) / (template**2).sum(1)


def probe_section(ae, dataset, split, config: EncoderAuditConfig, device) -> dict:
    """The learnability map: per (diameter, contrast), survival through the reconstruction and the
    test AUROC of a linear probe and a small CNN in each space."""
    rng = np.random.default_rng(config.run.seed + 1)
    pool = split.train if len(split.train) >= 2 * config.probe_images else np.concatenate([split.train, split.val])
    spaces = ("image", "reconstruction", "latent") if ae.has_decoder else ("image", "latent")
    cells = []
    for diameter in config.lesion_sizes:
        for contrast in config.lesion_contrasts:
            chosen = rng.choice(pool, size=min(2 * config.probe_images, len(pool)), replace=False)
            base = dataset.load(chosen)
            label = np.arange(len(chosen)) % 2  # every other image gets a lesion
            lesioned, maps = insert_lesions(base[label == 1], diameter, contrast, rng)
            x = base.clone()
            x[label == 1] = lesioned
            z, r = encode_images(ae, x, device, dataset)
            cell = {"diameter": diameter, "contrast": contrast}
            cell["survival"] = (
                float(survival(ae, base[label == 1], r[label == 1], maps, device, dataset).mean())
                if r is not None
                else None
            )
            half = len(chosen) // 2
            order = rng.permutation(len(chosen))
            train, test = order[:half], order[half:]
            inputs = {"image": x, "latent": z, **({"reconstruction": r} if r is not None else {})}
            scores = {}
            for space in spaces:
                data = inputs[space]
                scores[space] = {}
                for model, name in (("linear", "linear"), ("deep", "cnn")):
                    clf = fit_space_classifier(
                        space,
                        (data[train], label[train]),
                        (data[test], label[test]),
                        "binary",
                        config.train_config(),
                        latent_std=config.run.latent_std,
                        num_outputs=2,
                        model=model,
                        device=device,
                        name=f"probe {space} {diameter:g}px {contrast:g} {ae.spec}",
                        distributed=True,
                    )
                    scores[space][name] = score("binary", label[test], predict_raw(clf, data[test]))["auroc"]
            cell["auroc"] = scores
            cell["gap"] = {
                model: {
                    "image-latent": scores["image"][model] - scores["latent"][model],
                    **(
                        {"reconstruction-latent": scores["reconstruction"][model] - scores["latent"][model]}
                        if "reconstruction" in scores
                        else {}
                    ),
                }
                for model in ("linear", "cnn")
            }
            cells.append(cell)
    note = (
        "Validation for the CNN's early stopping is its own test half (the probes "
        "compare spaces under one protocol; absolute scores are optimistic)."
    )
    return {
        "cells": cells,
        "spaces": list(spaces),
        "note": note,
        **({} if ae.has_decoder else {"survival": NO_DECODER}),
    }


def _train_spaces(ae, dataset, split, device, memo: dict) -> dict[str, torch.Tensor]:
    """The split's training and validation images (in that order) in each space, encoded once per autoencoder."""
    if "train" not in memo:
        memo["train"] = tensor_spaces(ae, dataset.load(np.concatenate([split.train, split.val])), device, dataset)
    return memo["train"]


def _space_classifiers(
    ae, dataset, split, config: EncoderAuditConfig, device, shared: dict, memo: dict, variants: bool = True
) -> dict:
    """The image classifier (trained once, shared) and this autoencoder's latent (and
    reconstruction) classifiers, trained by the audit's protocol on the split; with `variants` the
    noise-conditioned latent classifier too. Each is trained once, kept in `memo`."""
    order = ("image", "latent", "latent (noise-conditioned)", "reconstruction")
    made = memo.get("classifiers", {})
    if made and (not variants or "latent (noise-conditioned)" in made):
        return {name: made[name] for name in order if name in made}
    spaces = _train_spaces(ae, dataset, split, device, memo)
    n_train = len(split.train)
    y_train, y_val = dataset.labels[split.train], dataset.labels[split.val]

    def fit(space: str, data: torch.Tensor, start=None):
        # The noise-conditioned latent classifier starts from the plain one (FiLM at identity).
        noise_conditioned = start is not None
        return fit_space_classifier(
            space,
            (data[:n_train], y_train),
            (data[n_train:], y_val),
            dataset.task,
            replace(config.train_config(), noise_conditioned=noise_conditioned),
            latent_std=config.run.latent_std,
            num_outputs=dataset.num_outputs,
            device=device,
            progress=config.run.progress,
            name=f"audit {space}{' (noise-conditioned)' if noise_conditioned else ''} {ae.spec}",
            init=start.model_.state_dict() if noise_conditioned else None,
            distributed=True,
        )

    if not made:
        if "image" not in shared:
            shared["image"] = fit("image", spaces["image"])
        made = {"image": shared["image"], "latent": fit("latent", spaces["latent"])}
        if "reconstruction" in spaces:
            made["reconstruction"] = fit("reconstruction", spaces["reconstruction"])
    if variants:
        made["latent (noise-conditioned)"] = fit("latent", spaces["latent"], start=made["latent"])
    memo["classifiers"] = made
    return {name: made[name] for name in order if name in made}


def _auroc_ci(labels: np.ndarray, probs: np.ndarray, config: EncoderAuditConfig) -> dict:
    task = "binary" if probs.shape[1] == 2 else "multiclass"
    value = score(task, labels, probs)["auroc"]
    idx = bootstrap_indices(labels, "binary", config.run.bootstrap, config.run.seed)
    lo, hi = interval(replicate_scores(task, labels, probs, idx)["auroc"])
    return {"value": value, "ci95": [lo, hi]}


def robustness_section(
    ae, dataset, split, sample: np.ndarray, config: EncoderAuditConfig, device, shift: dict, classifiers: dict
) -> dict:
    labels = dataset.labels[sample]
    clean = dataset.load(sample)
    curves: dict = {}
    for family in config.perturbations:
        curves[family] = {space: [] for space in classifiers}
        for severity in [0, *config.severities]:
            inputs = tensor_spaces(ae, perturb(clean, family, severity, seed=config.run.seed), device, dataset)
            for space, clf in classifiers.items():
                curves[family][space].append(
                    {
                        "severity": severity,
                        "auroc": _auroc_ci(labels, predict_raw(clf, inputs[space.split(" ")[0]]), config),
                    }
                )
    return {"curves": curves, "ood_heads": ood_heads(ae, dataset, split, config, device, shift, classifiers["image"])}


def _shift(config: EncoderAuditConfig, dataset, split) -> dict:
    """The out-of-distribution shift: a perturbation at one severity of the split's own images, or
    a second dataset with the same classes and channels (its train and validation images train the
    heads, its test images test them)."""
    kind, _, value = config.shift.partition(":")
    if kind != "dataset":
        return {
            "name": config.shift,
            "family": kind,
            "severity": int(value),
            "pool_size": len(split.train) + len(split.val),
        }
    other = load_dataset(value, config.data.size, **config.data.csv_options())
    if other.channels != dataset.channels or [str(c) for c in other.class_names] != [
        str(c) for c in dataset.class_names
    ]:
        raise MedlatentInputError(
            f"--shift {config.shift}: {other.name} has {other.channels} channel(s) and classes "
            f"{other.class_names}; the audit's dataset has {dataset.channels} and {dataset.class_names}"
        )
    parts = make_splits(other, None if other.partitions else 5, seed=config.run.seed)[0]
    return {"name": config.shift, "dataset": other, "split": parts, "pool_size": len(parts.train) + len(parts.val)}


def ood_heads(ae, dataset, split, config: EncoderAuditConfig, device, shift: dict, image_clf) -> dict:
    """Shi et al. (ICLR 2023): frozen representations, a logistic head on n out-of-distribution
    samples, tested out of distribution; 5 draws of the n samples, mean and range."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if "dataset" in shift:
        other, parts = shift["dataset"], shift["split"]
        pool_x, pool_y = (
            other.load(np.concatenate([parts.train, parts.val])),
            other.labels[np.concatenate([parts.train, parts.val])],
        )
        test_x, test_y = other.load(parts.test), other.labels[parts.test]
    else:
        pool_idx = np.concatenate([split.train, split.val])
        pool_x, pool_y = (
            perturb(dataset.load(pool_idx), shift["family"], shift["severity"], seed=config.run.seed),
            dataset.labels[pool_idx],
        )
        test_x, test_y = (
            perturb(dataset.load(split.test), shift["family"], shift["severity"], seed=config.run.seed + 1),
            dataset.labels[split.test],
        )

    def representations(images: torch.Tensor) -> dict[str, np.ndarray]:
        z = encode_images(ae, images, device, dataset)[0]
        return {
            "latent": z.reshape(len(z), -1).numpy(),
            "pooled latent": z.mean(dim=(2, 3)).numpy(),
            "image classifier features": penultimate(image_clf, images, device),
        }

    pool, test = representations(pool_x), representations(test_x)
    rng = np.random.default_rng(config.run.seed)
    out = {}
    for name in pool:
        rows = []
        for n in config.ood_n:
            scores = []
            for _ in range(5):
                chosen = _stratified(pool_y, n, rng)
                scaler = StandardScaler().fit(pool[name][chosen])
                head = LogisticRegression(max_iter=2000).fit(scaler.transform(pool[name][chosen]), pool_y[chosen])
                probs = np.zeros((len(test_y), dataset.num_outputs))
                probs[:, head.classes_] = head.predict_proba(scaler.transform(test[name]))
                scores.append(score("binary" if dataset.num_outputs == 2 else "multiclass", test_y, probs)["auroc"])
            rows.append({"n": n, "auroc": float(np.mean(scores)), "range": [float(min(scores)), float(max(scores))]})
        out[name] = rows
    return {"shift": config.shift, "test_images": len(test_y), "heads": out}


def _stratified(labels: np.ndarray, n: int, rng) -> np.ndarray:
    """n indices with every class present (at least one each), the rest drawn at random."""
    classes = np.unique(labels)
    first = np.array([rng.choice(np.flatnonzero(labels == c)) for c in classes])
    rest = rng.choice(np.setdiff1d(np.arange(len(labels)), first), size=max(0, n - len(first)), replace=False)
    return np.concatenate([first, rest])[:n]


def information_section(
    train_inputs: dict[str, torch.Tensor],
    dataset,
    split,
    images,
    z0,
    r0,
    labels: np.ndarray,
    config: EncoderAuditConfig,
    classifiers: dict,
) -> dict:
    """Mutual information with the label (PCA to `pca_dims`, Ross's kNN estimator, subsampling
    interval) against V-information of the linear and CNN families, per space, in nats."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.preprocessing import StandardScaler

    train = np.concatenate([split.train, split.val])  # the order of `train_inputs`
    test_inputs = {"image": images, "latent": z0, **({"reconstruction": r0} if r0 is not None else {})}
    out = {}
    for space, test_x in test_inputs.items():
        train_flat = train_inputs[space].reshape(len(train), -1).numpy()
        test_flat = test_x.reshape(len(test_x), -1).numpy()
        reduced_train, reduced_test = pca_reduce(train_flat, test_flat, dims=config.pca_dims)
        present = subsample_interval(lambda a, b: label_mi(a, b), reduced_test, labels, reps=50, seed=config.run.seed)
        neural = infonce_mi(
            reduced_train, dataset.labels[train], seed=config.run.seed
        )  # a variational lower bound, on the larger training part
        scaler = StandardScaler().fit(train_flat)
        # the family's best model: the regularisation chosen by cross-validated log-loss
        with warnings.catch_warnings():  # scikit-learn 1.8+ announces changes to LogisticRegressionCV's attributes
            warnings.simplefilter("ignore", FutureWarning)
            linear = LogisticRegressionCV(
                Cs=[1e-4, 1e-3, 1e-2, 1e-1, 1.0], cv=3, scoring="neg_log_loss", max_iter=2000
            ).fit(scaler.transform(train_flat), dataset.labels[train])
        probs = np.full((len(labels), dataset.num_outputs), 1e-12)
        probs[:, linear.classes_] = linear.predict_proba(scaler.transform(test_flat))
        usable = {"linear": v_information(probs, labels)}
        clf = classifiers.get(space)
        if clf is not None:
            usable["cnn"] = v_information(predict_raw(clf, test_x), labels)
        out[space] = {"mutual_information": present, "mutual_information_infonce": neural, "v_information": usable}
    return {"spaces": out, "pca_dims": config.pca_dims, "units": "nats"}
