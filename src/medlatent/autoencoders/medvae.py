"""MedVAE (Varma et al., MIDL 2025) through its own package, an optional extra:
`pip install "medlatent[medvae]"`. Spec: `medvae:<model_name>[:<modality>]`, e.g.
`medvae:medvae_4_1_2d:xray`. Untested here (its weights download at first use)."""

from __future__ import annotations

import hashlib

import torch

from ..errors import MedlatentInputError
from .base import Autoencoder
from .registry import register_family


class MedVAEAutoencoder(Autoencoder):
    input_range = (0.0, 1.0)  # MedVAE's own transform normalises images; we pass [0, 1] tensors

    def __init__(self, model_name: str, modality: str = "xray"):
        super().__init__()
        self.spec = f"medvae:{model_name}:{modality}"
        try:
            from medvae import MVAE
        except ImportError as err:
            raise MedlatentInputError(
                f"{self.spec}: the medvae package is not installed; pip install 'medlatent[medvae]'"
            ) from err
        try:
            self.model = MVAE(model_name=model_name, modality=modality).eval().requires_grad_(False)
        except Exception as err:  # noqa: BLE001 - download or unknown-name errors
            raise MedlatentInputError(
                f"{self.spec}: could not load ({type(err).__name__}: {err}); check the model name and network access"
            ) from err
        # Names follow medvae_<factor>_<channels>_2d.
        parts = model_name.split("_")
        self.downsampling_factor = int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else 4
        self.latent_channels = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else 1
        self.image_channels = 1
        state = self.model.state_dict()
        digest = hashlib.sha256()
        for key in sorted(state):
            digest.update(key.encode())
            digest.update(state[key].detach().cpu().float().numpy().tobytes())
        self._hash = "sha256:" + digest.hexdigest()[:32]

    @property
    def content_hash(self) -> str:
        return self._hash

    def encode_raw(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        decode = getattr(self.model, "decode", None)
        if decode is None:
            raise MedlatentInputError(f"{self.spec}: this medvae version has no decode(); reconstructions need it")
        return decode(z)


@register_family(
    "medvae", "medvae:NAME[:MODALITY], MedVAE (optional extra)", name=lambda target: target.partition(":")[0]
)
def load_medvae(target: str, spec: str, *, device: str, progress: bool, encoder_only: bool) -> MedVAEAutoencoder:
    name, _, modality = target.partition(":")
    return MedVAEAutoencoder(name, modality or "xray")
