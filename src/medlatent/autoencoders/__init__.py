"""Autoencoders by spec string, one family per file:

- `hf:<hub id or folder>[:<subfolder>]`  diffusers AutoencoderKL / Tiny / DC / KLFlux2, or a
                                          transformers image encoder (encoder-only)
- `taesd:<encoder.pth>[,<decoder.pth>]`  the TAESD family from original state dicts
- `builtin:<recipe or folder>`           medlatent's own small KL autoencoder
- `medvae:<model_name>[:<modality>]`     MedVAE (optional extra)
- `reference:identity|blur[:channels]`   controls with known answers
- `timm:<name>[:<layer>]`                 a timm model's feature map: an encoder-only latent space
- `encoder:<any spec above>`              that autoencoder's encoder alone (no decoder file needed)

Each family registers its kind (`registry.register_family`); importing this package registers them all.
"""

from __future__ import annotations

from .base import Autoencoder
from .builtin import RECIPES, BuiltinAutoencoder, BuiltinRecipe, train_autoencoder
from .diffusers_vae import DiffusersAutoencoder
from .medvae import MedVAEAutoencoder
from .reference import ReferenceAutoencoder
from .registry import FAMILIES, display_name, load_autoencoder, register_family
from .taesd import TAESD
from .timm_encoder import TimmEncoder

__all__ = [
    "FAMILIES",
    "Autoencoder",
    "BuiltinAutoencoder",
    "BuiltinRecipe",
    "DiffusersAutoencoder",
    "MedVAEAutoencoder",
    "RECIPES",
    "ReferenceAutoencoder",
    "TAESD",
    "TimmEncoder",
    "display_name",
    "load_autoencoder",
    "register_family",
    "train_autoencoder",
]
