"""Image encoders of Hugging Face transformers as encoder-only latent spaces: `hf:ID` where the
id (or folder) is a transformers model (its config has a `model_type`), not a diffusers VAE.

The latent is `last_hidden_state`: a token grid (ViT, DINOv2, ...) reshaped to a map after its
prefix tokens (class, registers) are dropped, or a feature map as it is (ConvNeXt, ResNet).
Preprocessing comes from the model's `preprocessor_config.json` (input size, mean, std), with
the ViT image processor's defaults (mean and std 0.5) where it has none. Weights load from
safetensors or `.bin` by transformers, never with remote code; a weight the checkpoint lacks
(other than a pooler the latent does not use) is refused rather than initialised at random.
Install with `pip install "medlatent[transformers]"`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import MedlatentInputError
from .base import PretrainedEncoder
from .diffusers_vae import folder_hash


def is_transformers_config(config: dict) -> bool:
    return "model_type" in config and "_class_name" not in config


class TransformersEncoder(PretrainedEncoder):
    def __init__(self, folder: str | Path, spec: str):
        super().__init__()
        self.spec, self.folder = spec, Path(folder)
        try:
            from transformers import AutoModel
        except ImportError:
            raise MedlatentInputError(
                f"--autoencoder {spec}: a transformers image encoder; "
                'install the extra with pip install "medlatent[transformers]"'
            ) from None
        try:
            self.model, info = AutoModel.from_pretrained(
                self.folder, trust_remote_code=False, output_loading_info=True
            )
        except Exception as err:  # noqa: BLE001 - unknown architectures, remote-code models, broken files
            first = str(err).strip().splitlines()[0][:300]
            raise MedlatentInputError(
                f"--autoencoder {spec}: transformers cannot load {self.folder} "
                f"as an image model ({type(err).__name__}: {first})"
            ) from err
        missing = [k for k in info.get("missing_keys", []) if not k.startswith("pooler.")]
        if missing:
            raise MedlatentInputError(
                f"--autoencoder {spec}: {len(missing)} weights are missing "
                f"from the checkpoint (e.g. {missing[0]}); they would be random"
            )
        self.model.eval()
        config = self.model.config
        processor = self.folder / "preprocessor_config.json"
        pre = json.loads(processor.read_text()) if processor.is_file() else {}
        channels = int(getattr(config, "num_channels", 3))
        self.patch_size = getattr(config, "patch_size", None)
        self._hash = None
        self.set_preprocessing(
            channels,
            _input_size(pre, config),
            pre.get("image_mean", [0.5] * channels),
            pre.get("image_std", [0.5] * channels),
        )

    @property
    def content_hash(self) -> str:
        if self._hash is None:
            self._hash = folder_hash(self.folder)
        return self._hash

    def features(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.model(pixel_values=x).last_hidden_state
        if hidden.ndim == 4:
            return hidden
        side = self.input_size // int(self.patch_size or 1)
        if hidden.shape[1] < side * side:
            raise MedlatentInputError(
                f"--autoencoder {self.spec}: {hidden.shape[1]} tokens, fewer than "
                f"the {side}x{side} patch grid of a {self.input_size} px input"
            )
        tokens = hidden[:, hidden.shape[1] - side * side :]  # the prefix tokens (class, registers) come first
        return tokens.transpose(1, 2).reshape(len(tokens), -1, side, side)

    def describe(self) -> dict:
        return {
            **super().describe(),
            "weights": f"pretrained ({self.folder})",
            "model_type": self.model.config.model_type,
        }


def _input_size(pre: dict, config) -> int:
    for key in ("crop_size", "size"):
        value = pre.get(key)
        if isinstance(value, int):
            return value
        if isinstance(value, dict):
            for name in ("height", "shortest_edge", "width"):
                if name in value:
                    return int(value[name])
    size = getattr(config, "image_size", 224)
    return int(size[0] if isinstance(size, (list, tuple)) else size)
