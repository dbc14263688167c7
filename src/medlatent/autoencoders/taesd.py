"""The TAESD family (taesd, taesdxl, taesd3, taef1, taef2) from the original state dicts.

Tiny distilled autoencoders by Ollin Boer Bohan. Images in [0, 1]; latents are already in the
parent VAE's normalised space (scale 1, shift 0). The FLUX.2 variant (TAEF2) adds a pooled
group-norm branch to the blocks of the lowest resolution. Keys load with `strict=True`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import MedlatentInputError
from ..io import sha256_file
from .base import Autoencoder


def conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    def __init__(self, n: int, pooled: bool = False):
        super().__init__()
        self.conv = nn.Sequential(conv(n, n), nn.ReLU(), conv(n, n), nn.ReLU(), conv(n, n))
        self.pool = (
            nn.Sequential(nn.Conv2d(n, 4 * n, 1, bias=False), nn.GroupNorm(4, 4 * n), nn.ReLU(), nn.Conv2d(4 * n, n, 1, bias=False))
            if pooled
            else None
        )
        self.skip = nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


def make_encoder(latent_channels: int, pooled: bool) -> nn.Sequential:
    return nn.Sequential(
        conv(3, 64), Block(64),
        conv(64, 64, stride=2, bias=False), Block(64), Block(64), Block(64),
        conv(64, 64, stride=2, bias=False), Block(64), Block(64), Block(64),
        conv(64, 64, stride=2, bias=False), Block(64, pooled), Block(64, pooled), Block(64, pooled),
        conv(64, latent_channels),
    )  # fmt: skip


def make_decoder(latent_channels: int, pooled: bool) -> nn.Sequential:
    return nn.Sequential(
        Clamp(), conv(latent_channels, 64), nn.ReLU(),
        Block(64, pooled), Block(64, pooled), Block(64, pooled),
        nn.Upsample(scale_factor=2), conv(64, 64, bias=False), Block(64), Block(64), Block(64),
        nn.Upsample(scale_factor=2), conv(64, 64, bias=False), Block(64), Block(64), Block(64),
        nn.Upsample(scale_factor=2), conv(64, 64, bias=False), Block(64),
        conv(64, 3),
    )  # fmt: skip


def _load_state(path: Path, option: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise MedlatentInputError(f"{option}: {path} not found; give the path of a TAESD-family .pth or .safetensors file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise MedlatentInputError(f"{option}: cannot read {path} as weights ({type(err).__name__}); re-download it") from err


def _load_strict(module: nn.Module, state: dict, path: Path, option: str) -> None:
    try:
        module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise MedlatentInputError(f"{option}: weight keys in {path} do not match a TAESD-family model ({first}); check the file") from err


def decoder_path_for(encoder_path: Path) -> Path:
    name = encoder_path.name
    if "encoder" not in name:
        raise MedlatentInputError(f"taesd:{encoder_path}: cannot find the decoder from this name; give taesd:ENCODER,DECODER")
    return encoder_path.with_name(name.replace("encoder", "decoder"))


class TAESD(Autoencoder):
    input_range = (0.0, 1.0)
    downsampling_factor = 8
    image_channels = 3

    def __init__(self, encoder_path: str | Path, decoder_path: str | Path | None = None, encoder_only: bool = False):
        super().__init__()
        encoder_path = Path(encoder_path).expanduser()
        self.spec = f"taesd:{encoder_path}"
        self.has_decoder = not encoder_only
        if encoder_only:  # a published encoder whose decoder is not needed (or does not exist)
            decoder_path = None
        else:
            decoder_path = Path(decoder_path).expanduser() if decoder_path else decoder_path_for(encoder_path)
        enc_state = _load_state(encoder_path, self.spec)
        dec_state = _load_state(decoder_path, self.spec) if decoder_path else None
        if "14.weight" not in enc_state:
            raise MedlatentInputError(f"{self.spec}: {encoder_path} has no final conv '14.weight'; not a TAESD-family encoder")
        self.latent_channels = enc_state["14.weight"].shape[0]
        pooled = any(".pool." in key for key in enc_state)
        self.encoder = make_encoder(self.latent_channels, pooled)
        _load_strict(self.encoder, enc_state, encoder_path, self.spec)
        if dec_state is not None:
            self.decoder = make_decoder(self.latent_channels, pooled)
            _load_strict(self.decoder, dec_state, decoder_path, self.spec)
        self.paths = (encoder_path, decoder_path) if decoder_path else (encoder_path,)
        self._hash = None

    @property
    def content_hash(self) -> str:
        if self._hash is None:
            self._hash = "sha256:" + "+".join(sha256_file(path)[:16] for path in self.paths)
        return self._hash

    def encode_raw(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)
