"""Autoencoders by spec string, one family per file:

- `hf:<hub id or folder>[:<subfolder>]`  diffusers AutoencoderKL / Tiny / DC / KLFlux2, or a
                                          transformers image encoder (encoder-only)
- `taesd:<encoder.pth>[,<decoder.pth>]`  the TAESD family from original state dicts
- `builtin:<recipe or folder>`           medlatent's own small KL autoencoder
- `medvae:<model_name>[:<modality>]`     MedVAE (optional extra)
- `reference:identity|blur[:channels]`   controls with known answers
- `timm:<name>[:<layer>]`                 a timm model's feature map: an encoder-only latent space
- `encoder:<any spec above>`              that autoencoder's encoder alone (no decoder file needed)
"""

from __future__ import annotations

from ..errors import MedlatentInputError
from .base import Autoencoder
from .builtin import RECIPES, BuiltinAutoencoder, BuiltinRecipe, train_autoencoder
from .diffusers_vae import DiffusersAutoencoder
from .medvae import MedVAEAutoencoder
from .reference import ReferenceAutoencoder
from .taesd import TAESD
from .timm_encoder import TimmEncoder

__all__ = [
    "Autoencoder",
    "BuiltinAutoencoder",
    "BuiltinRecipe",
    "DiffusersAutoencoder",
    "MedVAEAutoencoder",
    "RECIPES",
    "TAESD",
    "TimmEncoder",
    "load_autoencoder",
    "train_autoencoder",
]


def load_autoencoder(
    spec: str, device: str = "auto", progress: bool = True, encoder_only: bool = False
) -> Autoencoder:
    kind, _, target = spec.partition(":")
    if not target:
        raise MedlatentInputError(
            f"--autoencoder {spec!r}: expected KIND:TARGET with KIND "
            "one of hf, taesd, builtin, medvae, reference, timm, encoder"
        )
    if kind == "encoder":  # any family's encoder alone; the spec keeps its prefix, so its cache entries are its own
        model = load_autoencoder(target, device, progress, encoder_only=True)
        model.spec, model.has_decoder = spec, False
        return model
    if kind == "timm":
        name, _, layer = target.partition(":")
        model = TimmEncoder(name, layer or None, spec=spec)
    elif kind == "hf":
        # Hub ids hold no ":", so a second one names a subfolder
        # (e.g. hf:stabilityai/stable-diffusion-3-medium-diffusers:vae).
        from ..io import read_json_object
        from .diffusers_vae import resolve_folder
        from .transformers_encoder import TransformersEncoder, is_transformers_config

        repo, _, subfolder = target.partition(":")
        folder = resolve_folder(repo, subfolder or None, spec)
        if is_transformers_config(
            read_json_object(folder / "config.json", "model config", "check the folder or download it again")
        ):  # an image encoder, not a VAE
            model = TransformersEncoder(folder, spec=spec)
        else:
            model = DiffusersAutoencoder(str(folder), None, spec=spec)
    elif kind == "taesd":
        encoder, _, decoder = target.partition(",")
        model = TAESD(encoder, decoder or None, encoder_only=encoder_only)
        model.spec = spec
    elif kind == "builtin":
        model = BuiltinAutoencoder(target, device=device, progress=progress)
    elif kind == "reference":
        name, _, channels = target.partition(":")
        if channels and not channels.isdigit():
            raise MedlatentInputError(f"--autoencoder {spec!r}: expected reference:NAME[:CHANNELS]")
        model = ReferenceAutoencoder(name, int(channels or 1))
    elif kind == "medvae":
        name, _, modality = target.partition(":")
        model = MedVAEAutoencoder(name, modality or "xray")
    else:
        raise MedlatentInputError(
            f"--autoencoder {spec!r}: unknown kind {kind!r}; use "
            "hf, taesd, builtin, medvae, reference, timm or encoder"
        )
    return model.eval().requires_grad_(False)


def display_name(spec: str) -> str:
    """A short name for reports: the file, hub repo or recipe name without its path.

    taesd:weights/taef2_encoder.pth -> taef2; hf:stabilityai/sd-vae-ft-mse -> sd-vae-ft-mse;
    builtin:kl-f4-synthetic -> kl-f4-synthetic; medvae:medvae_4_1_2d -> medvae_4_1_2d."""
    from pathlib import PurePath

    kind, _, target = spec.partition(":")
    if kind == "encoder":
        return display_name(target) + " (encoder)"
    if kind == "timm":
        return target
    if kind == "taesd":
        stem = PurePath(target.partition(",")[0]).stem
        return stem.removesuffix("_encoder") or stem
    if kind == "hf":
        repo, _, subfolder = target.partition(":")
        return PurePath(repo.rstrip("/")).name or repo
    if kind == "medvae":
        return target.partition(":")[0]
    return PurePath(target.rstrip("/")).name or spec
