from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Keep caches and built-in autoencoders of each test in its own temporary folder."""
    monkeypatch.setenv("MEDLATENT_HOME", str(tmp_path / "home"))


def tiny_dc():
    """A tiny diffusers AutoencoderDC (2x downsampling, 8 latent channels, scaling factor 0.4)."""
    from diffusers import AutoencoderDC

    return AutoencoderDC(
        in_channels=3,
        latent_channels=8,
        encoder_block_types=("ResBlock", "ResBlock"),
        decoder_block_types=("ResBlock", "ResBlock"),
        encoder_block_out_channels=(8, 16),
        decoder_block_out_channels=(8, 16),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), ()),
        decoder_qkv_multiscales=((), ()),
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.4,
    )


# The block layout the tiny diffusers KL-family autoencoders share: two blocks, 2x downsampling, 4 latent channels.
TINY_KL_LAYOUT = dict(
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(8, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    mid_block_add_attention=False,
)


def tiny_flux2():
    """A tiny diffusers AutoencoderKLFlux2 (2x downsampling, 4 latent channels) whose batch-norm
    latent statistics are not the identity, so that its normalisation is exercised."""
    from diffusers import AutoencoderKLFlux2

    flux2 = AutoencoderKLFlux2(**TINY_KL_LAYOUT)
    flux2.bn.running_mean.uniform_(-1, 1)
    flux2.bn.running_var.uniform_(0.5, 2)
    return flux2


def tiny_kl(**overrides):
    from diffusers import AutoencoderKL

    config = dict(in_channels=3, out_channels=3, **TINY_KL_LAYOUT, scaling_factor=0.5, shift_factor=0.1)
    config.update(overrides)
    torch.manual_seed(0)
    return AutoencoderKL(**config)


@pytest.fixture(scope="session")
def tiny_kl_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-kl")
    tiny_kl().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_builtin_folder(tmp_path_factory) -> Path:
    """A built-in autoencoder trained for a few steps on a small synthetic set (grayscale, f4)."""
    from medlatent.autoencoders.builtin import BuiltinRecipe, train_autoencoder

    folder = tmp_path_factory.mktemp("builtin") / "tiny"
    recipe = BuiltinRecipe(
        block_out_channels=(8, 8, 16),
        dataset="synthetic:n_train=32,n_val=8,n_test=8",
        size=32,
        crop=16,
        steps=3,
        batch_size=4,
    )
    return train_autoencoder(recipe, folder, device="cpu", progress=False)


def shared_or_skip(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"optional asset {path} not present (../shared is not checked out beside the project)")
    return path


@pytest.fixture
def run_cli(monkeypatch):
    """`run_cli("gap", "--epochs", "1")` runs the command line in this process; returns its exit code."""
    import sys

    from medlatent.cli import main

    def run(*args) -> int:
        monkeypatch.setattr(sys, "argv", ["medlatent", *args])
        try:
            main()
        except SystemExit as exit_:
            return exit_.code
        return 0

    return run
