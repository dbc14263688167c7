"""medlatent's own small KL autoencoder: a diffusers `AutoencoderKL` built from a recipe and
trained here (`medlatent autoencoder train`), saved with `save_pretrained` and loaded like any
other diffusers model. It is the offline default and the "trained on medical data" family.

Training is the standard VAE objective without the perceptual and adversarial terms
(`training.AutoencoderObjective`): L1 reconstruction plus a small KL weight, on random crops
(convolutions do not care about the crop size, and crops make CPU training fast). Afterwards the
latent scaling and shift factors are set from the training latents (scale = 1 / std, shift = mean,
as for SD3 and FLUX.1).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..config import RECIPES, AutoencoderTrainConfig, BuiltinRecipe, LoopConfig
from ..device import seed_everything
from ..errors import MedlatentInputError
from ..io import atomic_write_json, read_json_object
from ..rundir import check_out, finish_folder, partial_folder
from .diffusers_vae import DiffusersAutoencoder
from .registry import register_family

TRAINING_RECORD = "medlatent_training.json"
PACKAGED = Path(__file__).parent / "pretrained"


def builtin_home() -> Path:
    return Path(os.environ.get("MEDLATENT_HOME", Path.home() / ".cache" / "medlatent")).expanduser() / "autoencoders"


def build_vae(recipe: BuiltinRecipe):
    from diffusers import AutoencoderKL

    n = len(recipe.block_out_channels)
    return AutoencoderKL(
        in_channels=recipe.image_channels,
        out_channels=recipe.image_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=recipe.block_out_channels,
        layers_per_block=recipe.layers_per_block,
        latent_channels=recipe.latent_channels,
        norm_num_groups=min(16, recipe.block_out_channels[0]),
        mid_block_add_attention=False,
        sample_size=recipe.size,
    )


def run_autoencoder_train(config: AutoencoderTrainConfig) -> Path:
    """`medlatent autoencoder train`: the recipe's autoencoder, as the options change it, trained and saved."""
    check_out(config.run.out, "autoencoder train", config.run.overwrite)
    return train_autoencoder(
        config.architecture, config.run.out, device=config.run.device, progress=config.run.progress, loop=config.loop
    )


def train_autoencoder(
    recipe: BuiltinRecipe,
    out: str | Path,
    device: str = "auto",
    progress: bool = True,
    loop: LoopConfig | None = None,
    checkpoint_dir: str | Path | None = None,
) -> Path:
    """Train a built-in autoencoder on `recipe.dataset` (train split) and save it to `out`.

    Training runs through the engine (`training.Trainer`, `AutoencoderObjective`); its checkpoint
    is kept in `checkpoint_dir` (default: beside `out`) until the model is saved, so a killed run
    resumes where it stopped and ends with the same weights."""
    from ..data import load_dataset
    from ..training import AutoencoderObjective, Trainer

    out = Path(out).expanduser()
    seed_everything(recipe.seed)
    dataset = load_dataset(recipe.dataset, recipe.size)
    train = dataset.partitions["train"] if dataset.partitions else np.arange(len(dataset))
    images = dataset.load(train)
    if dataset.channels != recipe.image_channels:
        images = images.mean(1, keepdim=True) if recipe.image_channels == 1 else images.expand(-1, 3, -1, -1)
    vae = build_vae(recipe)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else out.with_name(f".{out.name}.checkpoint")
    name = f"train autoencoder -> {out.name}"
    trainer = Trainer(loop, device, seed=recipe.seed, progress=progress, name=name, hparams=asdict(recipe))
    result = trainer.fit(
        vae,
        AutoencoderObjective(recipe.crop, recipe.kl_weight),
        {"x": images},
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        weight_decay=0.0,
        warmup=0.05,
        steps=recipe.steps,
        checkpoint_dir=checkpoint_dir,
        key=json.dumps(asdict(recipe), sort_keys=True),
    )
    vae = result.model.eval()
    dev = next(vae.parameters()).device
    with torch.no_grad():
        z = torch.cat(
            [
                vae.encode(images[i : i + 64].to(dev) * 2 - 1).latent_dist.mode().float().cpu()
                for i in range(0, len(images), 64)
            ]
        )
    vae.register_to_config(scaling_factor=float(1.0 / z.std()), shift_factor=float(z.mean()))

    # Save into a temporary folder and rename: a killed run never leaves a loadable half-model.
    tmp = partial_folder(out)
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp, safe_serialization=True)
    record = {
        "command": " ".join(sys.argv),
        "recipe": asdict(recipe),
        "dataset": dataset.describe(),
        "train_seconds": result.seconds,
        "final_loss": result.final_loss,
        "resumed_from_step": result.resumed_from_step,
    }
    atomic_write_json(tmp / TRAINING_RECORD, record)
    finish_folder(tmp, out, "autoencoder train")
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return out


class BuiltinAutoencoder(DiffusersAutoencoder):
    """`builtin:NAME` (a recipe, trained on first use and kept in MEDLATENT_HOME) or `builtin:FOLDER`."""

    def __init__(self, name_or_path: str, device: str = "auto", progress: bool = True):
        path = Path(name_or_path).expanduser()
        if path.is_dir():
            folder = path
        elif name_or_path in RECIPES:
            # Weights shipped with the package (trained by `medlatent autoencoder train --recipe NAME`),
            # else trained once on first use and kept in MEDLATENT_HOME.
            folder = PACKAGED / name_or_path
            if not (folder / "config.json").is_file():
                folder = builtin_home() / name_or_path
            if not (folder / "config.json").is_file():
                print(f"medlatent: training built-in autoencoder {name_or_path!r} once; it is kept in {folder}")
                train_autoencoder(RECIPES[name_or_path], folder, device=device, progress=progress)
        else:
            raise MedlatentInputError(
                f"builtin:{name_or_path}: neither a built-in recipe ({', '.join(RECIPES)}) "
                "nor a folder saved by `medlatent autoencoder train`"
            )
        super().__init__(str(folder), spec=f"builtin:{name_or_path}")
        record = folder / TRAINING_RECORD
        self.training_record = read_json_object(record, "training record") if record.is_file() else None


@register_family("builtin", "builtin:RECIPE|FOLDER, medlatent's own KL autoencoder")
def load_builtin(target: str, spec: str, *, device: str, progress: bool, encoder_only: bool) -> BuiltinAutoencoder:
    return BuiltinAutoencoder(target, device=device, progress=progress)
