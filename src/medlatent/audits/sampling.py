"""The sampling workflows: `diffusion sample` (samples of one class into a run folder) and
`diffusion evaluate` (their quality against the images the model held out)."""

from __future__ import annotations

from pathlib import Path

from ..config import DataConfig, EvaluateConfig, SampleConfig
from ..errors import MedlatentInputError
from ..rundir import check_out


def _guide(path: str | None, device: str):
    """The noise-conditioned latent classifier of classifier guidance, if one is given."""
    if path is None:
        return None
    from ..classifiers import DeepClassifier

    return DeepClassifier.from_pretrained(path, device=device, option="--guidance-classifier")


def run_sample(config: SampleConfig) -> Path:
    """latents.safetensors, one PNG per sample and grid.png into `config.run.out` (`write_samples`:
    resumable, renamed when complete)."""
    from ..pipelines.latent_diffusion import LatentDiffusion, write_samples

    c = config
    check_out(c.run.out, "diffusion sample", c.run.overwrite)
    ldm = LatentDiffusion(c.model, device=c.run.device)
    ldm.require_decoder("diffusion sample")
    guide = _guide(c.guidance_classifier, c.run.device)
    return write_samples(
        ldm,
        c.class_name,
        c.n,
        c.run.out,
        steps=c.steps,
        cfg=c.cfg,
        seed=c.run.seed,
        guidance_classifier=guide,
        guidance_scale=c.guidance_scale,
        sampler=c.sampler,
        chunk_size=c.chunk_size,
        drift=c.drift,
    )


def run_evaluate(config: EvaluateConfig) -> dict:
    """The figures of `diffusion evaluate` for the model (and, with `baseline`, an untrained
    denoiser of the same architecture); also written to `json_out` when given."""
    import torch

    from ..classifiers import DeepClassifier
    from ..data import load_dataset
    from ..diffusion.quality import evaluate
    from ..io import atomic_write_json
    from ..pipelines.latent_diffusion import LatentDiffusion
    from ..rundir import check_json_out

    c = config
    check_json_out(c.run.json_out)
    ldm = LatentDiffusion(c.model, device=c.run.device)
    ldm.require_decoder("diffusion evaluate")
    judge = DeepClassifier.from_pretrained(c.classifier, device=c.run.device, option="--classifier")
    if judge.space != "image" or judge.input_scaler is None:
        raise MedlatentInputError(
            f"--classifier {c.classifier}: expected an image-space "
            "classifier saved by `medlatent classifier train --space image`"
        )
    if judge.num_outputs_ != len(ldm.class_names):
        raise MedlatentInputError(
            f"--classifier {c.classifier}: {judge.num_outputs_} classes, the model has {len(ldm.class_names)}"
        )
    guide = _guide(c.guidance_classifier, c.run.device)
    if guide is not None:
        ldm.guidance(guide, torch.zeros(1, dtype=torch.long))  # checks it before any sampling
    data = DataConfig(**ldm.record["data"])
    dataset = load_dataset(data.dataset, data.size, **data.csv_options())
    test = ldm.held_out  # images the model never saw
    real, seen = dataset.load(test), dataset.load(ldm.trained_on)
    extra = dict(train_images=seen, sampler=c.sampler, inception=c.inception, inception_weights=c.inception_weights)
    result = {
        "model": evaluate(
            ldm, judge, real, dataset.labels[test], c.n, c.steps, c.cfg, c.run.seed, guide, c.guidance_scale, **extra
        )
    }
    if c.baseline:
        result["untrained"] = evaluate(
            ldm.untrained(), judge, real, dataset.labels[test], c.n, c.steps, c.cfg, c.run.seed, **extra
        )
    if c.run.json_out is not None:
        atomic_write_json(c.run.json_out, result)
    return result
