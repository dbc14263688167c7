"""Hugging Face diffusers autoencoders: AutoencoderKL (SD, SDXL, SD3, FLUX.1), AutoencoderTiny,
AutoencoderDC and AutoencoderKLFlux2, from a hub id or a local folder.

The latent normalisation is read from the model config (scaling and shift factors), except for
FLUX.2, whose pipeline normalises 2x2-patchified latents with the VAE's batch-norm statistics;
we apply the same statistics and keep the 32-channel layout, matching TAEF2. Caching uses the
deterministic posterior mode. AutoencoderTiny tiling is never enabled (it assumes 4 channels).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path, PurePath

import torch

from ..errors import MedlatentInputError
from ..io import read_json_object
from .base import Autoencoder, upsampling_steps
from .registry import register_family

SUPPORTED = ("AutoencoderKL", "AutoencoderTiny", "AutoencoderDC", "AutoencoderKLFlux2")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def resolve_folder(repo_or_path: str, subfolder: str | None, option: str) -> Path:
    """A local folder with config.json, downloading from the hub only when it is not local."""
    local = Path(repo_or_path).expanduser()
    if local.is_dir():
        folder = local / subfolder if subfolder else local
        if not (folder / "config.json").is_file():
            raise MedlatentInputError(
                f"{option}: {folder} has no config.json; point at a "
                "diffusers or transformers model folder (save_pretrained)"
            )
        return folder
    try:
        from huggingface_hub import snapshot_download

        patterns = [f"{subfolder}/*"] if subfolder else ["config.json", "preprocessor_config.json", "*.safetensors"]
        root = Path(snapshot_download(repo_or_path, allow_patterns=patterns))
    except Exception as err:  # noqa: BLE001 - offline, gated, unknown id: same advice
        raise MedlatentInputError(
            f"{option}: cannot resolve {repo_or_path!r} ({type(err).__name__}); it is not "
            "a local folder and the hub is unreachable, gated or has no such id. Download "
            "it once with network access (huggingface-cli download) or give a local folder"
        ) from err
    folder = root / subfolder if subfolder else root
    if not (folder / "config.json").is_file():
        raise MedlatentInputError(
            f"{option}: {repo_or_path} has no autoencoder config at "
            f"{subfolder or 'the top level'}; add :vae for pipelines"
        )
    return folder


def folder_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.name == "config.json" or path.suffix in WEIGHT_SUFFIXES:
            digest.update(path.name.encode())
            with open(path, "rb") as handle:
                while block := handle.read(1 << 20):
                    digest.update(block)
    return "sha256:" + digest.hexdigest()[:32]


class DiffusersAutoencoder(Autoencoder):
    input_range = (-1.0, 1.0)

    def __init__(self, repo_or_path: str, subfolder: str | None = None, spec: str | None = None):
        super().__init__()
        import diffusers

        self.spec = spec or f"hf:{repo_or_path}" + (f":{subfolder}" if subfolder else "")
        folder = resolve_folder(repo_or_path, subfolder, self.spec)
        config = read_json_object(
            folder / "config.json", "autoencoder config", "check the folder or download it again"
        )
        class_name = config.get("_class_name")
        if class_name not in SUPPORTED:
            raise MedlatentInputError(
                f"{self.spec}: {class_name or 'an unknown class'} is not a "
                f"supported autoencoder; use one of {', '.join(SUPPORTED)}"
            )
        if not any(folder.glob("*.safetensors")):  # checked here, before diffusers prints its own notices
            raise MedlatentInputError(
                f"{self.spec}: {folder} has no .safetensors weights (pickled .bin "
                "weights are never loaded); save the model with safe_serialization=True"
            )
        try:
            self.vae, info = getattr(diffusers, class_name).from_pretrained(
                folder, output_loading_info=True, use_safetensors=True
            )
        except Exception as err:  # noqa: BLE001 - key or shape mismatches
            first = str(err).strip().splitlines()[0][:300]
            raise MedlatentInputError(
                f"{self.spec}: weights in {folder} do not load into {class_name} ({first}); check the folder"
            ) from err
        # diffusers silently initialises missing weights at random: refuse that.
        bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if bad:
            detail = "; ".join(f"{len(v)} {k.replace('_', ' ')} (e.g. {list(v)[0]})" for k, v in bad.items())
            raise MedlatentInputError(
                f"{self.spec}: weights in {folder} do not load into {class_name} ({detail}); check the folder"
            )
        self.vae.eval().requires_grad_(False)
        self.kind = class_name
        self.folder = folder
        cfg = self.vae.config
        self.latent_channels = cfg.latent_channels
        self.image_channels = cfg.in_channels
        if class_name == "AutoencoderDC":
            self.downsampling_factor = 2 ** (len(cfg.encoder_block_out_channels) - 1)
        elif class_name == "AutoencoderTiny":
            self.downsampling_factor = cfg.upsampling_scaling_factor ** (len(cfg.encoder_block_out_channels) - 1)
        else:
            self.downsampling_factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.scaling_factor = float(getattr(cfg, "scaling_factor", None) or 1.0)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)
        if class_name == "AutoencoderKLFlux2":
            self.scaling_factor, self.shift_factor = 1.0, 0.0  # batch-norm statistics instead
            self.size_multiple = 2 * self.downsampling_factor  # latents are 2x2-patchified
        self._hash = None

    @property
    def content_hash(self) -> str:
        if self._hash is None:
            self._hash = folder_hash(self.folder)
        return self._hash

    def encode_raw(self, x: torch.Tensor) -> torch.Tensor:
        out = self.vae.encode(x)
        if self.kind == "AutoencoderTiny":
            return out.latents
        if self.kind == "AutoencoderDC":
            return out.latent
        z = out.latent_dist.mode()
        return self._flux2_normalise(z) if self.kind == "AutoencoderKLFlux2" else z

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        if self.kind == "AutoencoderKLFlux2":
            z = self._flux2_normalise(z, inverse=True)
        return self.vae.decode(z).sample

    def decoder_steps(self) -> list[tuple[str, Callable]]:
        """AutoencoderKL and FLUX.2's KL: "mid", "up0", "up1", ..., "reconstruction" (diffusers'
        `Decoder` stage by stage); AutoencoderTiny: "blocks", "up1", ... as TAESD; other classes, or
        a tiled decoder, one step."""
        from diffusers.models.autoencoders.vae import Decoder, DecoderTiny

        decoder = self.vae.decoder
        if getattr(self.vae, "use_tiling", False):
            return super().decoder_steps()
        if self.kind in ("AutoencoderKL", "AutoencoderKLFlux2") and isinstance(decoder, Decoder):
            return self._kl_steps(decoder)
        if self.kind == "AutoencoderTiny" and isinstance(decoder, DecoderTiny):
            return self._tiny_steps(decoder)
        return super().decoder_steps()

    def _kl_steps(self, decoder) -> list[tuple[str, Callable]]:
        """As `AutoencoderKL._decode` and `Decoder.forward` run them, without latent embeddings."""

        def mid(z: torch.Tensor) -> torch.Tensor:
            if self.kind == "AutoencoderKLFlux2":
                z = self._flux2_normalise(z, inverse=True)
            if getattr(self.vae, "post_quant_conv", None) is not None:
                z = self.vae.post_quant_conv(z)
            x = decoder.conv_in(z)
            if decoder.mid_block is not None:
                x = decoder.mid_block(x, None)
            # Older diffusers cast to the up blocks' dtype here; a no-op when all weights share one.
            return x.to(next(iter(decoder.up_blocks.parameters())).dtype)

        def out(x: torch.Tensor) -> torch.Tensor:
            return decoder.conv_out(decoder.conv_act(decoder.conv_norm_out(x)))

        ups = [(f"up{i}", lambda x, block=block: block(x, None)) for i, block in enumerate(decoder.up_blocks)]
        return [("mid", mid), *ups, ("reconstruction", out)]

    def _tiny_steps(self, decoder) -> list[tuple[str, Callable]]:
        """`DecoderTiny.forward`: its clamp before the first step, its map to [-1, 1] after the last."""
        (first_name, first), *middle, (last_name, last) = upsampling_steps(decoder.layers)
        return [
            (first_name, lambda z: first(torch.tanh(z / 3) * 3)),
            *middle,
            (last_name, lambda x: last(x).mul(2).sub(1)),
        ]

    def _flux2_normalise(self, z: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        n, c, h, w = z.shape
        mean = self.vae.bn.running_mean.view(1, c, 2, 2, 1, 1).to(z)
        std = torch.sqrt(self.vae.bn.running_var + self.vae.config.batch_norm_eps).view(1, c, 2, 2, 1, 1).to(z)
        patches = z.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)  # as the pipeline's _patchify_latents
        patches = patches * std + mean if inverse else (patches - mean) / std
        return patches.permute(0, 1, 4, 2, 5, 3).reshape(n, c, h, w)


def hf_name(target: str) -> str:
    repo = target.partition(":")[0]
    return PurePath(repo.rstrip("/")).name or repo


@register_family("hf", "hf:ID[:SUBFOLDER], a diffusers autoencoder or a transformers image encoder", name=hf_name)
def load_hf(target: str, spec: str, *, device: str, progress: bool, encoder_only: bool) -> Autoencoder:
    """Hub ids hold no ":", so a second one names a subfolder (hf:stabilityai/stable-diffusion-3-medium-diffusers:vae);
    a folder whose config has a transformers `model_type` is an image encoder, not a VAE."""
    from .transformers_encoder import TransformersEncoder, is_transformers_config

    repo, _, subfolder = target.partition(":")
    folder = resolve_folder(repo, subfolder or None, spec)
    if is_transformers_config(
        read_json_object(folder / "config.json", "model config", "check the folder or download it again")
    ):
        return TransformersEncoder(folder, spec=spec)
    return DiffusersAutoencoder(str(folder), None, spec=spec)
