"""medlatent's own small KL autoencoder: a diffusers `AutoencoderKL` built from a recipe and
trained here (`medlatent autoencoder train`), saved with `save_pretrained` and loaded like any
other diffusers model. It is the offline default and the "trained on medical data" family.

Training is the standard VAE objective without the perceptual and adversarial terms:
L1 reconstruction plus a small KL weight, on random crops (convolutions do not care about the
crop size, and crops make CPU training fast). Afterwards the latent scaling and shift factors
are set from the training latents (scale = 1 / std, shift = mean, as for SD3 and FLUX.1).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..device import resolve_device, seed_everything
from ..errors import MedlatentInputError
from ..io import atomic_write_json
from .diffusers_vae import DiffusersAutoencoder

TRAINING_RECORD = "medlatent_training.json"
PACKAGED = Path(__file__).parent / "pretrained"


@dataclass(frozen=True)
class BuiltinRecipe:
    """Architecture and training recipe of a built-in autoencoder."""

    block_out_channels: tuple[int, ...] = (16, 32, 64)
    latent_channels: int = 4
    layers_per_block: int = 1
    image_channels: int = 1
    dataset: str = "synthetic"
    size: int = 64
    crop: int = 32
    steps: int = 3000
    batch_size: int = 16
    lr: float = 2e-3
    kl_weight: float = 1e-6
    seed: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


RECIPES: dict[str, BuiltinRecipe] = {
    "kl-f4-synthetic": BuiltinRecipe(),
    "kl-f8-synthetic": BuiltinRecipe(block_out_channels=(16, 32, 64, 64), latent_channels=8),
}


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


def train_autoencoder(recipe: BuiltinRecipe, out: str | Path, device: str = "auto", progress: bool = True) -> Path:
    """Train a built-in autoencoder on `recipe.dataset` (train split) and save it to `out`."""
    from ..data import load_dataset

    out = Path(out).expanduser()
    dev = resolve_device(device)
    generator = seed_everything(recipe.seed)
    dataset = load_dataset(recipe.dataset, recipe.size)
    train = dataset.partitions["train"] if dataset.partitions else np.arange(len(dataset))
    images = dataset.load(train)
    if dataset.channels != recipe.image_channels:
        images = images.mean(1, keepdim=True) if recipe.image_channels == 1 else images.expand(-1, 3, -1, -1)
    vae = build_vae(recipe).to(dev).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=recipe.steps, pct_start=0.05)
    start = time.perf_counter()
    for step in tqdm(range(recipe.steps), desc=f"train autoencoder -> {out.name}", disable=not progress, unit="step"):
        batch = images[torch.randint(0, len(images), (recipe.batch_size,), generator=generator)]
        batch = random_crop(batch, recipe.crop, generator).to(dev)
        posterior = vae.encode(batch * 2 - 1).latent_dist
        recon = (vae.decode(posterior.sample()).sample + 1) / 2
        loss = (recon - batch).abs().mean() + recipe.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()

    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(images[i : i + 64].to(dev) * 2 - 1).latent_dist.mode().cpu() for i in range(0, len(images), 64)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()), shift_factor=float(z.mean()))

    # Save into a temporary folder and rename: a killed run never leaves a loadable half-model.
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp, safe_serialization=True)
    record = {"command": " ".join(sys.argv), "recipe": asdict(recipe), "dataset": dataset.describe(), "train_seconds": time.perf_counter() - start, "final_loss": loss.item()}
    atomic_write_json(tmp / TRAINING_RECORD, record)
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


def random_crop(images: torch.Tensor, crop: int, generator: torch.Generator) -> torch.Tensor:
    size = images.shape[-1]
    if crop >= size:
        return images
    i, j = torch.randint(0, size - crop + 1, (2,), generator=generator).tolist()
    return images[..., i : i + crop, j : j + crop]


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
                f"builtin:{name_or_path}: neither a built-in recipe ({', '.join(RECIPES)}) nor a folder saved by `medlatent autoencoder train`"
            )
        super().__init__(str(folder), spec=f"builtin:{name_or_path}")
        record = folder / TRAINING_RECORD
        self.training_record = json.loads(record.read_text()) if record.is_file() else None
