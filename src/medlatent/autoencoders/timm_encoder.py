"""Any timm model as an encoder-only latent space: `timm:NAME[:LAYER]`.

The latent is the model's feature map before pooling (`forward_features`), or the output of one
named stage (`LAYER`: a module name from the model's `feature_info`, e.g. `layer3`, or its index).
Token grids of vision transformers are reshaped to maps (prefix tokens dropped); a pooled vector
is a 1x1 map. The model's own preprocessing comes from its pretrained config: images are resized
to its input size and normalised with its mean and std.

Weights: the pretrained ones where they can be had (the local Hugging Face cache, or the Hub when
it is reachable), else a random initialisation from seed 0, with a warning; `describe()["weights"]`
records which, and the content hash is of the weights actually used. There is no decoder.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys

import torch

from ..errors import MedlatentInputError
from .base import PretrainedEncoder
from .registry import register_family


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers, checked once up front: offline, timm's own download
    retries for about a minute before it fails."""
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _cached_weights(name: str) -> str | None:
    """The pretrained weights file of `name` in the local Hugging Face cache, if there is one."""
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return None
    repo, _, revision = repo.partition("@")
    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(path, str):
            return path
    return None


class TimmEncoder(PretrainedEncoder):
    def __init__(self, name: str, layer: str | None = None, spec: str | None = None, pretrained: bool | None = None):
        import timm

        super().__init__()
        self.spec = spec or f"timm:{name}" + (f":{layer}" if layer else "")
        if not timm.is_model(name):
            import difflib

            close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=5, cutoff=0.75)
            raise MedlatentInputError(
                f"--autoencoder {self.spec}: {name!r} is not a timm model"
                + (f"; close names: {', '.join(close)}" if close else "; see timm.list_models()")
            )
        self.name, self.layer = name, layer
        self.weights = "random (seed 0)"
        kwargs: dict = {}
        if pretrained is not False and timm.models.get_pretrained_cfg(name) is not None:
            cached = _cached_weights(name)
            if cached is not None:
                kwargs, self.weights = (
                    {"pretrained": True, "pretrained_cfg_overlay": {"file": cached}},
                    f"pretrained ({cached})",
                )
            elif pretrained or hub_reachable():
                kwargs, self.weights = {"pretrained": True}, "pretrained (downloaded)"
        torch.manual_seed(0)
        model = timm.create_model(name, **kwargs)
        self.stage = self._stage_index(model, layer) if layer else None
        if self.stage is not None:  # the same network cut after that stage
            torch.manual_seed(0)
            model = timm.create_model(name, features_only=True, out_indices=(self.stage,), **kwargs)
        self.model = model.eval()
        config = timm.data.resolve_data_config({}, model=model)
        self._hash = None
        self.set_preprocessing(config["input_size"][0], config["input_size"][-1], config["mean"], config["std"])
        if self.weights.startswith("random"):  # after every check, so a bad spec prints one line only
            print(
                f"medlatent: {self.spec}: no pretrained weights here (no "
                "local copy, Hub not reachable): random weights from seed 0",
                file=sys.stderr,
            )

    def _stage_index(self, model: torch.nn.Module, layer: str) -> int:
        names = [info["module"] for info in getattr(model, "feature_info", [])]
        if layer.isdigit() and int(layer) < len(names):
            return int(layer)
        if layer in names:
            return names.index(layer)
        raise MedlatentInputError(
            f"--autoencoder {self.spec}: {self.name} has no layer {layer!r}; "
            f"its layers: {', '.join(names) or 'none listed'} (or their index)"
        )

    @property
    def content_hash(self) -> str:
        if self._hash is None:
            digest = hashlib.sha256(f"{self.name}:{self.layer}".encode())
            for key, value in sorted(self.model.state_dict().items()):
                digest.update(key.encode())
                digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            self._hash = "sha256:" + digest.hexdigest()[:32]
        return self._hash

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.stage is not None:
            return self.model(x)[0]
        return to_map(self.model.forward_features(x), self.model)

    def describe(self) -> dict:
        return {**super().describe(), "weights": self.weights, "layer": self.layer}


def to_map(features: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """timm features -> (B, C, h, w): token grids (B, N, D) lose their prefix tokens and become maps;
    channels-last maps (B, H, W, C) are permuted; pooled vectors (B, D) become 1x1 maps."""
    if features.ndim == 2:
        return features[:, :, None, None]
    if features.ndim == 3:
        tokens = features[:, getattr(model, "num_prefix_tokens", 0) :]
        side = int(round(tokens.shape[1] ** 0.5))
        if side * side != tokens.shape[1]:
            raise MedlatentInputError(
                f"timm model {type(model).__name__}: {tokens.shape[1]} tokens do not form a square grid"
            )
        return tokens.transpose(1, 2).reshape(len(tokens), -1, side, side)
    if features.shape[-1] == getattr(model, "num_features", -1) and features.shape[1] != features.shape[-1]:
        return features.permute(0, 3, 1, 2)
    return features


@register_family("timm", "timm:NAME[:LAYER], a timm model's feature map (encoder only)", name=lambda target: target)
def load_timm(target: str, spec: str, *, device: str, progress: bool, encoder_only: bool) -> TimmEncoder:
    name, _, layer = target.partition(":")
    return TimmEncoder(name, layer or None, spec=spec)
