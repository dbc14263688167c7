"""Class-conditional latent diffusion on the latent cache: train a `models.Denoiser` through the
engine (`training.DenoisingObjective`), save it with the latent normalisation and the autoencoder
it belongs to, and sample latents and decoded images per class.

The denoiser works on normalised latents, (z - mean) / std * sigma_data per channel (statistics of
the training partition's cache entry); sampling maps back to the autoencoder's latent space.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..config import DataConfig, DiffusionConfig, DiffusionTrainConfig
from ..data.base import ImageDataset
from ..data.splits import Split
from ..errors import MedlatentInputError
from ..io import atomic_write_json, read_json_object, read_safetensors
from ..rundir import check_out, finish_folder, partial_folder

RECORD = "diffusion.json"
NORMALISATION = "latent_normalisation.safetensors"
SPLIT = "split.safetensors"  # the split whose training and validation images the model learnt from


def run_diffusion_train(config: DiffusionTrainConfig) -> Path:
    """`medlatent diffusion train`: the denoiser trained on the cached latents and saved into `out`."""
    check_out(config.run.out, "diffusion train", config.run.overwrite)
    run = config.run
    return train_latent_diffusion(
        run.out, config.data, config.autoencoder, config.diffusion, device=run.device, progress=run.progress
    )


def train_latent_diffusion(
    out: str | Path,
    data: DataConfig,
    autoencoder: str,
    config: DiffusionConfig,
    device: str = "auto",
    progress: bool = True,
) -> Path:
    """Encode the training images (cached), train the denoiser, save it into `out`.

    The model trains on one split's training and validation images, never its test images: the
    official split, or fold `config.fold` of `data.folds`. The split is saved with the model
    (`split.safetensors`), so that `medlatent augment` tests on images the model never saw."""
    from ..autoencoders import load_autoencoder
    from ..device import seed_everything

    out = Path(out)
    ae = load_autoencoder(autoencoder, device=device, progress=progress)
    dataset, split = _training_split(data, config)
    stored, mean, std = _training_latents(dataset, split, ae, data, device, progress)
    source = None
    if config.init:
        source = _fine_tuning_source(config, ae, dataset, stored["latents"])
        # fine-tuning keeps the source model's normalisation: the target's shift from it is what drift can absorb
        mean, std = source.mean, source.std
    x = (stored["latents"] - mean) / std * config.sigma_data
    multilabel = dataset.task == "multilabel"
    labels = torch.as_tensor(dataset.labels[stored["indices"].numpy()])
    labels = labels.float() if multilabel else labels.long()  # label vectors, or class indices
    seed_everything(config.seed)
    if source is not None:  # its architecture and weights
        model = source.denoiser
    else:
        model = _new_denoiser(config, x.shape[1], x.shape[-1], dataset.num_outputs, multilabel)
    objective = _objective(model.parameterisation, config)
    on_step = _grid_writer(_grids_folder(out), config, ae, mean, std, len(dataset.class_names))
    started = time.perf_counter()
    result = _train(out, model, objective, {"x": x, "y": labels}, config, data, ae, device, progress, on_step)
    _save_model(out, result, ae, dataset, split, config, data, mean, std, started)
    # the model is complete: no run resumes from its checkpoint any more
    shutil.rmtree(_checkpoint_folder(out), ignore_errors=True)
    return out


def _training_split(data: DataConfig, config: DiffusionConfig) -> tuple[ImageDataset, Split]:
    """The dataset and the split the model learns from: the official split, or fold `config.fold`."""
    from ..data import load_dataset
    from ..data.splits import make_splits

    dataset = load_dataset(data.dataset, data.size, **data.csv_options())
    splits = make_splits(
        dataset, data.folds, seed=config.seed, val_fraction=data.val_fraction, train_limit=data.train_limit
    )
    if not 0 <= config.fold < len(splits):
        raise MedlatentInputError(
            f"--fold {config.fold}: {dataset.name} has {len(splits)} split(s) here; use 0 to {len(splits) - 1}"
        )
    return dataset, splits[config.fold]


def _training_latents(
    dataset: ImageDataset, split: Split, ae, data: DataConfig, device: str, progress: bool
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The latents and dataset indices of the split's training and validation images (through the
    cache), and their per-channel mean and std, shaped (1, C, 1, 1)."""
    from ..cache import LatentCache
    from ..device import resolve_device

    seen = np.sort(np.concatenate([split.train, split.val]))
    entry = LatentCache(data.cache_dir, progress=progress).encode(
        dataset, f"{split.name}-trainval", seen, ae, resolve_device(device), reconstruct=False
    )
    stored = entry.read(("latents", "indices"))
    mean, std = entry.channel_mean.view(1, -1, 1, 1), entry.channel_std.view(1, -1, 1, 1).clamp_min(1e-6)
    return stored, mean, std


def _fine_tuning_source(config: DiffusionConfig, ae, dataset: ImageDataset, latents: torch.Tensor) -> LatentDiffusion:
    """The model `--init` names, checked to fit this run: same autoencoder, classes, latent shape
    and sigma_data."""
    source = LatentDiffusion(config.init, device="cpu", option="--init")
    if source.record["autoencoder_hash"] != ae.content_hash:
        raise MedlatentInputError(
            f"--init {config.init}: trained on {source.record['autoencoder']}'s "
            f"latents, not {ae.spec}'s; fine-tune with the same autoencoder"
        )
    if source.denoiser.num_classes != dataset.num_outputs or source.denoiser.multilabel != (
        dataset.task == "multilabel"
    ):
        raise MedlatentInputError(
            f"--init {config.init}: {source.denoiser.num_classes} classes, {dataset.name} has {dataset.num_outputs}"
        )
    if source.denoiser.sigma_data != config.sigma_data or (
        source.denoiser.latent_channels,
        source.denoiser.latent_size,
    ) != tuple(latents.shape[1::2]):
        raise MedlatentInputError(
            f"--init {config.init}: its latents are {source.denoiser.latent_channels}"
            f"x{source.denoiser.latent_size}px at sigma_data "
            f"{source.denoiser.sigma_data}; use the same --size and --sigma-data"
        )
    return source


def _new_denoiser(
    config: DiffusionConfig, channels: int, size: int, num_outputs: int, multilabel: bool
) -> torch.nn.Module:
    """A denoiser of `config.preset`: a preset's name, or a diffusers UNet2DModel folder (its
    architecture, and its weights where it has them)."""
    from ..models import Denoiser

    if not Path(config.preset).is_dir():
        return Denoiser(
            channels, size, num_outputs, config.preset, config.sigma_data, config.parameterisation, multilabel
        )
    from diffusers import UNet2DModel

    model = Denoiser(
        channels,
        size,
        num_outputs,
        "custom",
        config.sigma_data,
        config.parameterisation,
        multilabel,
        unet_config=dict(UNet2DModel.load_config(config.preset)),
    )
    if any(Path(config.preset).glob("diffusion_pytorch_model*.safetensors")):
        model.unet.load_state_dict(UNet2DModel.from_pretrained(config.preset).state_dict())
    return model


def _objective(parameterisation: str, config: DiffusionConfig):
    """The training objective of the denoiser's parameterisation: EDM's, or the VP one (eps or v)."""
    from ..training import DenoisingObjective, VPDenoisingObjective

    if parameterisation == "edm":
        return DenoisingObjective(config.sigma_data, config.p_mean, config.p_std, config.label_dropout, config.drift)
    return VPDenoisingObjective(parameterisation, config.min_snr_gamma, config.label_dropout, config.drift)


def _grids_folder(out: Path) -> Path:
    """Where the sample grids made while training go: beside the model, kept after it is saved."""
    return out.with_name(f"{out.name}-samples")


def _checkpoint_folder(out: Path) -> Path:
    """The training checkpoint beside the model: an interrupted run resumes from it."""
    return out.with_name(f".{out.name}.checkpoint")


def _grid_writer(grids: Path, config: DiffusionConfig, ae, mean: torch.Tensor, std: torch.Tensor, num_classes: int):
    """The trainer's `on_step`: a grid of decoded samples every `config.sample_every` steps and at the
    last, written beside the model and returned for the tracked run."""
    unnormalise = lambda z: z.float().cpu() / config.sigma_data * std + mean  # noqa: E731

    def sample_grid(step: int, denoiser: torch.nn.Module) -> dict | None:
        if ae.has_decoder and (
            (config.sample_every and step % config.sample_every == 0) or step == config.steps
        ):  # an encoder-only space has no images to show
            return {"samples": write_grid(grids / f"step{step:07d}.png", denoiser, unnormalise, ae, num_classes)}
        return None

    return sample_grid


def _train(
    out: Path,
    model: torch.nn.Module,
    objective,
    batch: dict[str, torch.Tensor],
    config: DiffusionConfig,
    data: DataConfig,
    ae,
    device: str,
    progress: bool,
    on_step,
):
    """The engine's training loop. It checkpoints beside `out` (the EMA included) and resumes a
    checkpoint whose key matches: the same settings, data and autoencoder weights."""
    from ..training import Trainer

    hparams = {"autoencoder": ae.spec, "data": asdict(data), **asdict(config)}
    name = f"train denoiser -> {out.name}"
    return Trainer(config.loop, device, seed=config.seed, progress=progress, name=name, hparams=hparams).fit(
        model,
        objective,
        batch,
        batch_size=config.batch_size,
        lr=config.lr,
        weight_decay=0.0,
        warmup=0.05,
        steps=config.steps,
        checkpoint_dir=_checkpoint_folder(out),
        key=json.dumps(
            {"config": asdict(config), "data": asdict(data), "autoencoder": ae.content_hash},
            sort_keys=True,
            default=str,
        ),
        on_step=on_step,
    )


def _save_model(
    out: Path,
    result,
    ae,
    dataset: ImageDataset,
    split: Split,
    config: DiffusionConfig,
    data: DataConfig,
    mean: torch.Tensor,
    std: torch.Tensor,
    started: float,
) -> None:
    """The trained denoiser, its latent normalisation, its split, the last sample grid and the
    record into `out`, written in a partial folder renamed to `out` when complete."""
    tmp = partial_folder(out)
    shutil.rmtree(tmp, ignore_errors=True)
    result.model.cpu().save_pretrained(tmp)
    save_file({"mean": mean.contiguous(), "std": std.contiguous()}, str(tmp / NORMALISATION))
    save_file(
        {
            part: torch.from_numpy(np.asarray(getattr(split, part), dtype=np.int64))
            for part in ("train", "val", "test")
        },
        str(tmp / SPLIT),
    )
    last_grid = _grids_folder(out) / f"step{config.steps:07d}.png"
    if last_grid.is_file():
        shutil.copyfile(last_grid, tmp / "samples.png")
    atomic_write_json(
        tmp / RECORD,
        {
            "autoencoder": ae.spec,
            "autoencoder_hash": ae.content_hash,
            "autoencoder_has_decoder": ae.has_decoder,
            "class_names": [str(c) for c in dataset.class_names],
            "dataset": dataset.describe(),
            "config": asdict(config),
            "data": asdict(data),
            "split": {"name": split.name, **split.sizes()},
            "train_seconds": time.perf_counter() - started,
            "final_loss": result.final_loss,
            "steps": result.steps,
            "resumed_from_step": result.resumed_from_step,
        },
    )
    finish_folder(tmp, out, "diffusion train")


@torch.no_grad()
def write_grid(
    path: Path,
    denoiser: torch.nn.Module,
    unnormalise,
    autoencoder,
    num_classes: int,
    per_class: int = 8,
    steps: int = 16,
) -> torch.Tensor:
    """A decoded grid, one row per class, from the same noise every time (seed 0): successive grids
    of one run show the model change, not the noise. Returns the grid, (C, H, W) in [0, 1]."""
    from ..diffusion.sampling import sample

    was_training = denoiser.training
    denoiser.eval()
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    if denoiser.multilabel:  # one row per label, that label alone
        labels = torch.eye(num_classes)[labels]
    latents = unnormalise(sample(denoiser, labels, steps=steps, generator=torch.Generator().manual_seed(0)))
    device = next(denoiser.parameters()).device
    images = autoencoder.to(device).decode(latents.to(device)).float().cpu()
    denoiser.train(was_training)
    return save_grid(images, path, nrow=per_class)


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> torch.Tensor:
    """Images in [0, 1] as one PNG grid, written atomically; returns the grid, (C, H, W) in [0, 1]."""
    from PIL import Image
    from torchvision.utils import make_grid

    from ..io import atomic_write

    grid = make_grid(images.clamp(0, 1), nrow=nrow, padding=2)
    pixels = (grid * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(
        path, lambda tmp: Image.fromarray(pixels[..., 0] if images.shape[1] == 1 else pixels).save(tmp, format="PNG")
    )
    return grid


class LatentDiffusion:
    """A trained denoiser with its normalisation and autoencoder: `sample(labels)` -> latents in
    the autoencoder's space; `decode(latents)` -> images in [0, 1]."""

    def __init__(self, folder: str | Path, device: str = "auto", option: str = "--model"):
        """`folder`: saved by `medlatent diffusion train`, or on the Hub as
        `hf-hub:OWNER/NAME[@REVISION]` (`hub.resolve_model_dir`); `option` names it in the errors."""
        from ..device import resolve_device
        from ..hub import resolve_model_dir
        from ..models import Denoiser

        where = f"{option} {folder}"
        folder = self.folder = resolve_model_dir(folder, option)
        if not (folder / RECORD).is_file():
            raise MedlatentInputError(f"{where}: not a latent diffusion model saved by `medlatent diffusion train`")
        advice = "the model folder is damaged: train it again with `medlatent diffusion train`"
        self.record = read_json_object(folder / RECORD, "diffusion model record", advice)
        self.device = resolve_device(device)
        config = read_json_object(folder / "config.json", "denoiser config", advice)
        state = read_safetensors(folder / "model.safetensors", "denoiser weights", advice)
        stats = read_safetensors(folder / NORMALISATION, "latent normalisation", advice)
        if not (folder / SPLIT).is_file():
            raise MedlatentInputError(
                f"{where}: saved by an older medlatent without its split; "
                "train it again with `medlatent diffusion train`"
            )
        split = read_safetensors(folder / SPLIT, "split", advice)
        try:
            self.denoiser = Denoiser(**config)
            self.denoiser.load_state_dict(state, strict=True)
            self.mean, self.std = stats["mean"], stats["std"]
            self.class_names = self.record["class_names"]
            self.drift = float(
                self.record["config"].get("drift", 0.0)
            )  # the forward noise's mean it was trained with (diffusion train --drift): where sampling starts
            self.has_decoder = bool(self.record.get("autoencoder_has_decoder", True))
            # the split the model learnt from (train, val) and the test images it never saw
            self.split = Split(self.record["split"]["name"], *(split[p].numpy() for p in ("train", "val", "test")))
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
            first = " ".join(str(err).split())[:200]
            raise MedlatentInputError(
                f"{where}: its files do not fit together ({type(err).__name__}: {first}); {advice}"
            ) from err
        self.denoiser.to(self.device).eval()
        self.trained_on = np.sort(np.concatenate([self.split.train, self.split.val]))  # dataset indices it learnt from
        self.held_out = self.split.test

    def require_decoder(self, what: str) -> None:
        """Stop before any work when `what` needs images and the latent space is encoder-only."""
        if not self.has_decoder:
            raise MedlatentInputError(
                f"--model {self.folder}: its latent space ({self.record['autoencoder']}) is encoder-only, "
                f"and {what} needs a decoder to make images; use a model of an autoencoder with a decoder"
            )

    def data(self, progress: bool = True):
        """The dataset the model was trained from, its autoencoder (checked to be the same weights)
        and the latent cache: what an audit of the model reads."""
        from ..autoencoders import load_autoencoder
        from ..cache import LatentCache
        from ..config import DataConfig
        from ..data import load_dataset

        data = DataConfig(**self.record["data"])
        dataset = load_dataset(data.dataset, data.size, **data.csv_options())
        ae = load_autoencoder(self.record["autoencoder"], device=str(self.device), progress=progress)
        if ae.content_hash != self.record["autoencoder_hash"]:
            raise MedlatentInputError(
                f"{self.record['autoencoder']}: its weights differ from those the model was trained on"
            )
        return dataset, ae, LatentCache(data.cache_dir, progress=progress)

    def encode(
        self, dataset, indices: np.ndarray, part: str, autoencoder, cache
    ) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
        """Latents of dataset[indices] (through the cache, entry `part`), normalised as the denoiser
        sees them, the indices in their stored order, and the raw latents."""
        stored = cache.encode(
            dataset, f"{self.record['split']['name']}-{part}", indices, autoencoder, self.device, reconstruct=False
        ).read(("latents", "indices"))
        return self.normalise(stored["latents"]), stored["indices"].numpy(), stored["latents"]

    def normalise(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw latents of the model's autoencoder, standardised as the denoiser sees them."""
        return (latents - self.mean) / self.std * self.denoiser.sigma_data

    def images(self, autoencoder, z: torch.Tensor, dataset) -> torch.Tensor:
        """Normalised latents (as the denoiser sees them) decoded to images at the dataset's channels and size."""
        raw = z.float().cpu() / self.denoiser.sigma_data * self.std + self.mean
        return autoencoder.restore(self.decode(raw, autoencoder), dataset.channels, dataset.size)

    def untrained(self) -> LatentDiffusion:
        """The same model with freshly initialised weights (seed 0): a baseline for quality measures."""
        import copy

        from ..models import Denoiser

        baseline = copy.copy(self)
        torch.manual_seed(0)
        config = read_json_object(self.folder / "config.json", "denoiser config")
        baseline.denoiser = Denoiser(**config).to(self.device).eval()
        return baseline

    def class_index(self, name: str, option: str = "--class") -> int:
        """The index of a class given by name or index; `option` names it in the error."""
        if name in self.class_names:
            return self.class_names.index(name)
        if name.isdigit() and int(name) < len(self.class_names):
            return int(name)
        raise MedlatentInputError(
            f"{option} {name!r}: this model's {'labels' if self.denoiser.multilabel else 'classes'} "
            f"are {', '.join(self.class_names)}"
        )

    def condition(self, name: str, n: int) -> torch.Tensor:
        """`n` copies of the conditioning for `name`: a class index, or for a multi-label model a
        label vector from label names joined by "+" ("none": no label set)."""
        if not self.denoiser.multilabel:
            return torch.full((n,), self.class_index(name), dtype=torch.long)
        vector = torch.zeros(len(self.class_names))
        for part in [] if name == "none" else name.split("+"):
            vector[self.class_index(part.strip())] = 1.0
        return vector.expand(n, -1).clone()

    def guidance(self, classifier, labels: torch.Tensor):
        """grad_x log p(y | x; sigma) in the denoiser's normalised space, from a noise-conditioned
        latent classifier of the same autoencoder. Its inputs are an affine map of x per channel,
        x_c = a x + b (both are standardisations of the same latents), so x's noise sigma is
        a * sigma there (a ~ 1: both target std 0.5) and the gradient is a * grad_{x_c}."""
        from ..diffusion.guidance import log_prob_and_grad

        if self.denoiser.multilabel:
            raise MedlatentInputError(
                "--guidance-classifier: classifier guidance is built for single-label models only; use --cfg"
            )
        if classifier.space != "latent" or not classifier.config.noise_conditioned or classifier.input_scaler is None:
            raise MedlatentInputError(
                "--guidance-classifier: expected a noise-conditioned latent classifier "
                "(medlatent classifier train --space latent --noise-conditioned)"
            )
        if (classifier.autoencoder or {}).get("content_hash") != self.record["autoencoder_hash"]:
            raise MedlatentInputError(
                "--guidance-classifier: trained on another latent space "
                f"({(classifier.autoencoder or {}).get('spec', 'unknown autoencoder')}), "
                f"not {self.record['autoencoder']}"
            )
        if classifier.num_outputs_ != len(self.class_names):
            raise MedlatentInputError(
                f"--guidance-classifier: {classifier.num_outputs_} classes, the model has {len(self.class_names)}"
            )
        scaler, sd = classifier.input_scaler, self.denoiser.sigma_data
        a = (self.std / sd / scaler.std_ * scaler.target_std).to(self.device)  # (1, C, 1, 1)
        b = ((self.mean - scaler.mean_) / scaler.std_ * scaler.target_std).to(self.device)
        targets = labels.to(self.device)  # once: a copy at every sampling step would wait for the GPU

        def grad(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            _, g = log_prob_and_grad(classifier, a * x + b, sigma * a.mean(), targets[: len(x)])
            return a * g.to(x.dtype)

        return grad

    def sample(
        self,
        labels: torch.Tensor,
        steps: int = 32,
        cfg: float = 1.0,
        seed: int = 0,
        batch_size: int = 256,
        guidance_classifier=None,
        guidance_scale: float = 0.0,
        sampler: str = "heun",
        first_index: int = 0,
        drift: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Latents in the autoencoder's space. Sample i's noise comes from seed (seed, first_index + i)
        alone, whatever the batch size: a run split into parts gives the same samples. `drift`: Latent
        Drift's delta at inference (`sampling.drift_shift`, added to every step), in the denoiser's
        normalised latent units, 0 by default; a model trained with `--drift` starts from noise of
        that mean instead (`sample(noise_mean=...)`), which is all its ODE needs."""
        from ..diffusion.sampling import sample

        drift = 0.0 if drift is None else drift
        out = []
        for b in range(0, len(labels), batch_size):
            part = labels[b : b + batch_size]
            seeds = [seed * 1_000_003 + first_index + b + i for i in range(len(part))]
            guidance = self.guidance(guidance_classifier, part) if guidance_classifier is not None else None
            x = sample(
                self.denoiser,
                part,
                steps=steps,
                cfg=cfg,
                seeds=seeds,
                guidance=guidance,
                guidance_scale=guidance_scale,
                sampler=sampler,
                drift=drift,
                noise_mean=self.drift,
            )
            out.append(x.float().cpu() / self.denoiser.sigma_data * self.std + self.mean)
        return torch.cat(out)

    def decode(self, latents: torch.Tensor, autoencoder=None) -> torch.Tensor:
        from ..autoencoders import load_autoencoder

        ae = autoencoder or load_autoencoder(self.record["autoencoder"], device=str(self.device), progress=False)
        if ae.content_hash != self.record["autoencoder_hash"]:
            raise MedlatentInputError(
                f"{self.record['autoencoder']}: its weights differ from those the model was trained on"
            )
        ae = ae.to(self.device)
        with torch.no_grad():
            return torch.cat(
                [ae.decode(latents[b : b + 64].to(self.device)).float().cpu() for b in range(0, len(latents), 64)]
            )


def write_samples(
    model: LatentDiffusion,
    class_name: str,
    n: int,
    out: str | Path,
    steps: int = 32,
    cfg: float = 1.0,
    seed: int = 0,
    guidance_classifier=None,
    guidance_scale: float = 1.0,
    sampler: str = "heun",
    chunk_size: int = 256,
    drift: float | None = None,
) -> Path:
    """latents.safetensors, one PNG per sample and grid.png into `out`.

    Latents are sampled in chunks stored in a temporary folder beside `out`; a rerun with the same
    settings after an interruption keeps the stored chunks and samples the rest (each sample's noise
    depends on its index alone, so the result equals an uninterrupted run). The folder is renamed
    to `out` only when complete: an interrupted run never leaves a folder that looks complete."""
    out = Path(out)
    drift = 0.0 if drift is None else drift
    labels = model.condition(class_name, n)
    if guidance_classifier is not None:
        model.guidance(guidance_classifier, labels)  # checks it before any sampling
    guided = (
        {"guidance_scale": guidance_scale, "guidance_classifier_autoencoder": guidance_classifier.autoencoder}
        if guidance_classifier is not None
        else None
    )
    settings = {
        "model_class": class_name,
        "n": n,
        "steps": steps,
        "sampler": sampler,
        "cfg": cfg,
        "seed": seed,
        "autoencoder": model.record["autoencoder"],
        "classifier_guidance": guided,
        "drift": drift,
        "training_drift": model.drift,
        "model_final_loss": model.record.get("final_loss"),
        "chunk_size": chunk_size,
    }
    tmp = partial_folder(out)
    progress = _resume_or_restart(tmp, settings)
    sampling = dict(
        steps=steps,
        cfg=cfg,
        seed=seed,
        guidance_classifier=guidance_classifier,
        guidance_scale=guidance_scale,
        sampler=sampler,
        drift=drift,
    )
    chunks = _sample_chunks(model, labels, tmp, chunk_size, sampling)
    latents = torch.cat([load_file(path)["latents"] for path in chunks])
    images = model.decode(latents)
    save_file({"latents": latents.contiguous(), "labels": labels}, str(tmp / "latents.safetensors"))
    _save_pngs(images, tmp)
    save_grid(images[:64], tmp / "grid.png")
    for path in [*chunks, progress]:
        path.unlink()
    atomic_write_json(tmp / "samples.json", {key: value for key, value in settings.items() if key != "chunk_size"})
    return finish_folder(tmp, out, "diffusion sample")


def _resume_or_restart(tmp: Path, settings: dict) -> Path:
    """The partial folder's record of the settings its chunks were sampled with: kept when they
    are `settings`, so that the stored chunks are reused; otherwise the folder starts afresh."""
    progress = tmp / "in_progress.json"
    if not (progress.is_file() and json.loads(progress.read_text()) == json.loads(json.dumps(settings, default=str))):
        shutil.rmtree(tmp, ignore_errors=True)  # another run's parts: start afresh
        tmp.mkdir(parents=True)
        atomic_write_json(progress, settings)
    return progress


def _sample_chunks(
    model: LatentDiffusion, labels: torch.Tensor, tmp: Path, chunk_size: int, sampling: dict
) -> list[Path]:
    """The chunks of `chunk_size` samples in `tmp`, sampling those not stored yet (`sampling`: the
    keyword arguments of `LatentDiffusion.sample`)."""
    from ..io import atomic_write

    chunks = []
    for k, start in enumerate(range(0, len(labels), chunk_size)):
        path = tmp / f"chunk-{k:05d}.safetensors"
        if not path.is_file():
            part = model.sample(labels[start : start + chunk_size], **sampling, first_index=start)
            atomic_write(path, lambda file, part=part: save_file({"latents": part.contiguous()}, str(file)))
        chunks.append(path)
    return chunks


def _save_pngs(images: torch.Tensor, folder: Path) -> None:
    """Images in [0, 1] as 00000.png, 00001.png, ... (grey for one channel)."""
    from PIL import Image

    as_uint8 = lambda t: (t.clamp(0, 1) * 255 + 0.5).to(torch.uint8)  # noqa: E731
    for i, image in enumerate(images):
        array = as_uint8(image).permute(1, 2, 0).numpy()
        Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(folder / f"{i:05d}.png")
