"""Counterfactual images of a model's held-out images, or of a folder of images (`medlatent counterfactual`).

Each held-out image not of the target class (or of `source_class`), or each image of `images` (a
folder, resized to the model's size and channels; their classes are unknown), is encoded, noised
to each strength (or inverted, `inversion`) and denoised as the target class
(`diffusion.counterfactual`), with each drift delta, and decoded. Measured per (strength, drift),
over the images:

- validity: the share an independent image-space classifier (`judge`, not the one that guides)
  assigns to the target class, with a Wilson 95% interval;
- proximity: mean L1 and SSIM between the counterfactual and the input image;
- sparsity: the share of pixels the counterfactual changes by more than 0.1 against the reconstruction
  decode(encode(x)) (so the autoencoder's own error does not count);
- realism: the Frechet distance, in the judge's feature space, to the real held-out images of the target class;
- where the dataset knows its lesions (the synthetic benchmark), how often the difference map's
  peak falls on the lesion of an image that has one (removing a nodule).

`drift="auto"` first searches the grid for the delta whose counterfactuals (at the first
strength) lie closest to the real target images (lowest Frechet distance) and records the curve.
The images of the first strength and drift are written with their difference maps; results.json
and report.html hold the rest.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ..diffusion.counterfactual import counterfactual_latents, strength_sigma
from ..diffusion.explain import peak_in_lesion, saliency
from ..errors import MedlatentInputError
from ..evaluation.metrics import wilson_interval
from ..io import atomic_write
from ..pipelines.latent_diffusion import LatentDiffusion
from ..reports.provenance import provenance
from ..rundir import check_out, finish_run, mark
from .config import CounterfactualConfig

CHANGED = 0.1  # a pixel counts as changed when it moves by more than this (images in [0, 1])
DISTANCES = {
    "fd": "frechet_distance",
    "kid": "kernel_distance",
}  # what --drift auto minimises (config.DRIFT_DISTANCES)


def drift_grid(low: float = -0.2, high: float = 0.2, step: float = 0.02) -> list[float]:
    if step <= 0 or high < low:
        raise MedlatentInputError(
            f"--drift-grid {low}:{high}:{step}: the grid is empty; use LOW:HIGH:STEP with LOW <= HIGH and STEP > 0"
        )
    return [round(float(v), 10) + 0.0 for v in np.arange(low, high + step / 2, step)]  # + 0.0: no -0.0


def run_counterfactual(config: CounterfactualConfig, log=None) -> dict:
    """Counterfactuals of the model's held-out images (or of the folder `images`) as the target
    class at each strength and drift (numbers or "auto"), from added noise or, with `inversion`,
    from the DDIM inversion; with validity (by the independent `judge`), proximity, sparsity,
    realism and, where lesions are known, the difference map's peak; results.json into `out`."""
    out = check_out(config.run.out, "counterfactual", resumable=True)
    auto = [d for d in config.drifts if d == "auto"]
    fixed = [float(d) for d in config.drifts if d != "auto"]
    deltas = drift_grid(*config.grid()) if auto else []
    started = time.perf_counter()
    ldm, target, source = _checked_model(config)
    referee, guide = _checked_classifiers(config, ldm)
    dataset, ae, cache = ldm.data(config.run.progress)
    labels = dataset.labels[ldm.held_out]
    # realism is measured against the model's own held-out images
    real_target = dataset.load(ldm.held_out[labels == target])
    edited, z, chosen, names = _inputs(config, ldm, dataset, ae, cache, labels, target, source)
    inputs = edited.load(chosen)
    reconstruction = ldm.images(ae, z, dataset)
    if log:
        what = f"images of {config.images}" if config.images is not None else f"held-out images of {dataset.name}"
        log(
            f"counterfactual: {len(chosen)} {what} -> {ldm.class_names[target]}, strengths {list(config.strengths)}, "
            f"drifts {fixed + (['auto'] if auto else [])}{', DDIM inversion' if config.inversion else ''}"
        )
    options = _sampler_options(config, guide)
    make = _maker(ldm, ae, dataset, z, target, options)
    results: dict = {
        "kind": "medlatent.counterfactual",
        "model": str(config.model),
        "dataset": dataset.describe(),
        "input_folder": edited.describe() if config.images is not None else None,
        "inversion": config.inversion,
        "class_names": ldm.class_names,
        "target_class": ldm.class_names[target],
        "source_class": ldm.class_names[source] if source is not None else None,
        "images": len(chosen),
        "settings": {
            **options,
            "guidance_classifier": str(config.guidance_classifier) if guide else None,
            "judge": str(config.judge) if config.judge else None,
        },
    }
    if auto:
        results["drift_search"] = _drift_search(config, deltas, make, referee, real_target)
        best = results["drift_search"]["chosen"]
        fixed = [best] + [d for d in fixed if d != best]
    score = partial(
        measure,
        images=inputs,
        reconstruction=reconstruction,
        target=target,
        judge=referee,
        real_target=real_target,
        dataset=edited,
        indices=chosen,
    )
    results["curves"], first = _curves(config.strengths, fixed, make, score, ldm.denoiser)
    results["provenance"] = provenance(config=asdict(config), device=ldm.device)
    mark(out, "counterfactual")
    results["examples"] = _write_examples(
        Path(out), first, inputs, reconstruction, chosen, names, edited, ldm.class_names[target], config.examples
    )
    results["seconds"] = time.perf_counter() - started
    finish_run(out, "counterfactual", results, config)
    return results


def _checked_model(config: CounterfactualConfig) -> tuple[LatentDiffusion, int, int | None]:
    """The model, checked before any work (single-label, with a decoder), and the target and
    source classes' indices (source: None for every class but the target)."""
    ldm = LatentDiffusion(config.model, device=config.run.device)
    ldm.require_decoder("counterfactual")
    if ldm.denoiser.multilabel:
        raise MedlatentInputError(f"--model {config.model}: counterfactuals are built for single-label models")
    target = ldm.class_index(config.target_class, "--target-class")
    source = ldm.class_index(config.source_class, "--source-class") if config.source_class is not None else None
    if source == target:
        raise MedlatentInputError(
            f"--source-class {config.source_class}: the same as --target-class; choose another class"
        )
    if config.images is not None and source is not None:
        raise MedlatentInputError(
            f"--source-class {config.source_class}: the images of --images {config.images} have no labels; "
            "leave --source-class out"
        )
    return ldm, target, source


def _checked_classifiers(config: CounterfactualConfig, ldm: LatentDiffusion) -> tuple:
    """The judge (an image-space classifier of the model's classes) and the guiding classifier,
    each loaded and checked before any work (None where not given)."""
    from ..classifiers import DeepClassifier

    device = config.run.device
    referee = (
        DeepClassifier.from_pretrained(config.judge, device=device, option="--judge")
        if config.judge is not None
        else None
    )
    if referee is not None and (
        referee.space != "image" or referee.input_scaler is None or referee.num_outputs_ != len(ldm.class_names)
    ):
        raise MedlatentInputError(
            f"--judge {config.judge}: expected an image-space classifier of the model's "
            f"{len(ldm.class_names)} classes (medlatent classifier train --space image)"
        )
    guide = (
        DeepClassifier.from_pretrained(config.guidance_classifier, device=device, option="--guidance-classifier")
        if config.guidance_classifier is not None
        else None
    )
    if guide is not None:
        ldm.guidance(guide, torch.zeros(1, dtype=torch.long))  # checks it before any work
    return referee, guide


def _inputs(config: CounterfactualConfig, ldm: LatentDiffusion, dataset, ae, cache, labels, target: int, source):
    """The images to edit: the first `n` of the folder `images`, or of the held-out images of the
    source class (else of every class but the target). Returns the dataset they come from, their
    latents, their indices in it and the names their files are written under."""
    from ..data.manifest import load_image_folder

    if config.images is not None:
        edited = load_image_folder(config.images, dataset.size, dataset.channels, ldm.class_names)
        z, chosen, _ = ldm.encode(edited, np.arange(min(config.n, len(edited))), "images", ae, cache)
        return edited, z, chosen, [Path(edited.source["files"][i]).stem for i in chosen]
    chosen = ldm.held_out[(labels == source) if source is not None else (labels != target)][: config.n]
    if not len(chosen):
        raise MedlatentInputError(
            f"--model {config.model}: no held-out images of "
            f"{'class ' + config.source_class if source is not None else 'another class than ' + config.target_class}"
        )
    z, chosen, _ = ldm.encode(dataset, chosen, "test", ae, cache)
    return dataset, z, chosen, [str(int(i)) for i in chosen]


def _sampler_options(config: CounterfactualConfig, guide) -> dict:
    """The sampler's settings, the same for every counterfactual (and recorded with the results)."""
    return dict(
        steps=config.steps,
        cfg=config.cfg,
        seed=config.run.seed,
        guidance_classifier=guide,
        guidance_scale=config.guidance_scale,
        inversion=config.inversion,
    )


def _maker(ldm: LatentDiffusion, ae, dataset, z: torch.Tensor, target: int, options: dict):
    """`make(strength, delta)`: the decoded counterfactuals of the latents `z` as the target class."""
    wanted = torch.full((len(z),), target, dtype=torch.long)

    def make(strength: float, delta: float) -> torch.Tensor:
        return ldm.images(
            ae,
            counterfactual_latents(ldm, z, wanted, strength_sigma(strength, ldm.denoiser), drift=delta, **options),
            dataset,
        )

    return make


def _drift_search(config: CounterfactualConfig, deltas: list[float], make, referee, real_target) -> dict:
    """--drift auto: the grid's distances to the real target images at the first strength, and the
    delta of the lowest."""
    key = DISTANCES[config.drift_distance]
    curve = [
        {"drift": d, key: _distance(config.drift_distance, referee, make(config.strengths[0], d), real_target)}
        for d in deltas
    ]
    return {
        "strength": config.strengths[0],
        "grid": list(config.grid()),
        "distance": key,
        "curve": curve,
        "chosen": min(curve, key=lambda point: point[key])["drift"],
    }


def _curves(strengths: list[float], drifts: list[float], make, score, denoiser) -> tuple[list[dict], torch.Tensor]:
    """`score`'s measures per (strength, drift), and the counterfactuals of the first (whose images are written)."""
    rows, first = [], None
    for strength in strengths:
        for delta in drifts:
            counterfactuals = make(strength, delta)
            first = first if first is not None else counterfactuals
            rows.append(
                {
                    "strength": strength,
                    "sigma": strength_sigma(strength, denoiser),
                    "drift": delta,
                    **score(counterfactuals),
                }
            )
    return rows, first


def measure(
    counterfactuals: torch.Tensor,
    images: torch.Tensor,
    reconstruction: torch.Tensor,
    target: int,
    judge,
    real_target: torch.Tensor,
    dataset,
    indices: np.ndarray,
) -> dict:
    from skimage.metrics import structural_similarity

    a, b = counterfactuals.float().numpy(), images.float().numpy()
    row = {
        "l1": float(np.abs(a - b).mean()),
        "ssim": float(
            np.mean([structural_similarity(x, y, data_range=1.0, channel_axis=0) for x, y in zip(a, b, strict=False)])
        ),
        "changed_pixels": float(((counterfactuals - reconstruction).abs().amax(1) > CHANGED).float().mean()),
    }
    if judge is not None:
        from ..evaluation.metrics import predictions

        hits = int(
            (
                predictions(judge.task_, judge.predict_proba(judge.input_scaler.transform(counterfactuals))) == target
            ).sum()
        )
        row["validity"] = {"rate": hits / len(counterfactuals), "ci95": wilson_interval(hits, len(counterfactuals))}
        row["frechet_distance"] = _distance("fd", judge, counterfactuals, real_target)
    lesions = dataset.lesions
    if lesions is not None and not np.isnan(lesions["radius"][indices]).all():
        has = ~np.isnan(lesions["radius"][indices])
        hits = peak_in_lesion(
            (counterfactuals - reconstruction)[torch.from_numpy(has)],
            lesions["center"][indices][has],
            lesions["radius"][indices][has],
        )
        row["peak_on_lesion"] = {
            "rate": float(hits.mean()),
            "of": int(has.sum()),
            "ci95": wilson_interval(int(hits.sum()), int(has.sum())),
        }
    return row


def _distance(name: str, judge, images: torch.Tensor, real: torch.Tensor) -> float:
    """Between generated and real images in the judge's feature space: Frechet distance or KID."""
    from ..diffusion.quality import features, frechet_distance, kernel_distance

    return (frechet_distance if name == "fd" else kernel_distance)(features(judge, real), features(judge, images))


def _write_examples(
    out: Path,
    counterfactuals: torch.Tensor,
    images: torch.Tensor,
    reconstruction: torch.Tensor,
    indices: np.ndarray,
    names: list[str],
    dataset,
    target: str,
    limit: int,
) -> list[str]:
    """Each counterfactual and its difference map (0.5 grey = unchanged) as PNGs, and an overlay figure."""
    from PIL import Image

    from ..reports.plots import explanation_figure, to_hwc

    folder = out / "counterfactuals"
    folder.mkdir(parents=True, exist_ok=True)
    as_png = lambda t: (t.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).squeeze(-1).numpy()  # noqa: E731
    files = []
    difference = counterfactuals - reconstruction
    heat = saliency(difference).numpy()
    lesions = dataset.lesions
    for j, (i, stem) in enumerate(zip(indices, names, strict=False)):
        for name, picture in (("counterfactual", counterfactuals[j]), ("difference", 0.5 + difference[j] / 2)):
            path = folder / f"{stem}-{name}.png"
            atomic_write(path, lambda tmp, p=picture: Image.fromarray(as_png(p)).save(tmp, format="PNG"))
        if j < limit:
            lesion = tuple(lesions["center"][i]) + (lesions["radius"][i],) if lesions is not None else None
            png = explanation_figure(
                to_hwc(images[j]), {"difference": heat[j]}, to_hwc(counterfactuals[j]), f"{stem} -> {target}", lesion
            )
            path = folder / f"{stem}-overlay.png"
            atomic_write(path, lambda tmp, b=png: tmp.write_bytes(b))
            files.append(str(path.relative_to(out)))
    return files
