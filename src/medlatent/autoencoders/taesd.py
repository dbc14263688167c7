"""The TAESD family (taesd, taesdxl, taesd3, taef1, taef2, taesana) from the original state dicts.

Tiny distilled autoencoders by Ollin Boer Bohan (github.com/madebyollin/taesd). Images in [0, 1];
latents are already in the parent VAE's normalised space (scale 1, shift 0).

Each published file is the state dict of a plain `nn.Sequential`, and the members differ in
layout: latent channels (4, 16, 32), a pooled group-norm branch in some blocks (FLUX.2, TAEF2),
and the number of 2x stages (8x for most; 32x for SANA's DC-AE, TAESANA, whose stem has two
stride-2 convs and whose decoder starts 256 channels wide). So the layout is read off the keys
(`infer_encoder_layout`, `infer_decoder_layout`), built (`build`), and loaded with `strict=True`.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path, PurePath

import torch
from torch import nn

from ..errors import MedlatentInputError
from ..io import read_safetensors, read_torch, sha256_file
from .base import Autoencoder, upsampling_steps
from .registry import register_family

# ---------------------------------------------------------------------------------------------
# Modules (names and nesting as in madebyollin's taesd.py, so the published keys load as they are)


def conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """Three 3x3 convs with a skip (a 1x1 conv where the width changes); optionally a pooled
    group-norm branch added to the input first (TAEF2's lowest-resolution blocks)."""

    def __init__(self, n_in: int, n_out: int | None = None, *, pooled: bool = False):
        super().__init__()
        n_out = n_in if n_out is None else n_out
        self.conv = nn.Sequential(conv(n_in, n_out), nn.ReLU(), conv(n_out, n_out), nn.ReLU(), conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()
        self.pool = None
        if pooled:
            wide = 4 * n_in
            self.pool = nn.Sequential(
                nn.Conv2d(n_in, wide, 1, bias=False),
                nn.GroupNorm(4, wide),
                nn.ReLU(),
                nn.Conv2d(wide, n_in, 1, bias=False),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


# ---------------------------------------------------------------------------------------------
# Layouts: one `Layer` per index of the nn.Sequential


@dataclass(frozen=True)
class Layer:
    kind: str  # "conv", "block", or a module without weights: "relu", "clamp", "upsample"
    n_in: int = 0
    n_out: int = 0
    stride: int = 1
    bias: bool = True
    pooled: bool = False


RELU, CLAMP, UPSAMPLE = Layer("relu"), Layer("clamp"), Layer("upsample")


def _module(layer: Layer) -> nn.Module:
    if layer.kind == "conv":
        return conv(layer.n_in, layer.n_out, stride=layer.stride, bias=layer.bias)
    if layer.kind == "block":
        return Block(layer.n_in, layer.n_out, pooled=layer.pooled)
    return {"relu": nn.ReLU, "clamp": Clamp, "upsample": lambda: nn.Upsample(scale_factor=2)}[layer.kind]()


def build(layout: list[Layer]) -> nn.Sequential:
    return nn.Sequential(*(_module(layer) for layer in layout))


def scale(layout: list[Layer]) -> int:
    """The spatial factor of a layout: 2 per stride-2 conv (encoder) or per upsampling (decoder)."""
    return 2 ** sum(layer.stride == 2 or layer.kind == "upsample" for layer in layout)


def encoder_layout(
    latent_channels: int = 4, pooled: bool = False, *, stem_downsamples: int = 0, stages: int = 3, blocks: int = 3
) -> list[Layer]:
    """A published encoder layout. Defaults: taesd/taesdxl/taesd3/taef1 (pooled: taef2, whose last
    stage's blocks pool); `stem_downsamples=2`: taesana's stem (3 -> 32 -> 64, stride 2, ReLU each)."""
    if stem_downsamples:
        widths = [3] + [64 >> (stem_downsamples - 1 - i) for i in range(stem_downsamples)]
        stem = [layer for a, b in pairwise(widths) for layer in (Layer("conv", a, b, stride=2), RELU)]
    else:
        stem = [Layer("conv", 3, 64)]
    layout = [*stem, Layer("block", 64, 64)]
    for stage in range(stages):
        block = Layer("block", 64, 64, pooled=pooled and stage == stages - 1)
        layout += [Layer("conv", 64, 64, stride=2, bias=False)] + [block] * blocks
    return [*layout, Layer("conv", 64, latent_channels)]


def decoder_layout(
    latent_channels: int = 4, pooled: bool = False, *, widths: tuple = (64, 64, 64, 64), blocks: tuple = (3, 3, 3, 1)
) -> list[Layer]:
    """A published decoder layout: one stage per width, an upsampling (2x, then a bias-free conv) between
    stages. Defaults: taesd..taef1 (pooled: taef2, whose first stage's blocks pool); taesana's:
    `widths=(256, 128, 64, 64, 64, 64), blocks=(3, 3, 3, 3, 3, 1)`."""
    layout = [CLAMP, Layer("conv", latent_channels, widths[0]), RELU]
    for stage, (width, count) in enumerate(zip(widths, blocks, strict=False)):
        if stage:
            layout += [UPSAMPLE, Layer("conv", widths[stage - 1], width, bias=False)]
        layout += [Layer("block", width, width, pooled=pooled and not stage)] * count
    return [*layout, Layer("conv", widths[-1], 3)]


def make_encoder(latent_channels: int = 4, pooled: bool = False, **layout) -> nn.Sequential:
    return build(encoder_layout(latent_channels, pooled, **layout))


def make_decoder(latent_channels: int = 4, pooled: bool = False, **layout) -> nn.Sequential:
    return build(decoder_layout(latent_channels, pooled, **layout))


# ---------------------------------------------------------------------------------------------
# Reading a layout off a state dict


class LayoutError(ValueError):
    """A state dict that is no TAESD-family layout; the message says where it departs."""


_BLOCK_KEYS = {f"conv.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
_POOL_KEYS = {"pool.0.weight", "pool.1.weight", "pool.1.bias", "pool.3.weight"}


def _read_module(index: int, params: dict[str, torch.Tensor]) -> Layer:
    """One index's weights -> a 3x3 conv (its bias says whether it has one) or a Block."""
    keys = set(params)
    if keys in ({"weight"}, {"weight", "bias"}) and params["weight"].ndim == 4:
        weight = params["weight"]
        if tuple(weight.shape[-2:]) == (3, 3):
            return Layer("conv", weight.shape[1], weight.shape[0], bias="bias" in keys)
    extra = keys - _BLOCK_KEYS
    if _BLOCK_KEYS <= keys and extra - {"skip.weight"} in (set(), _POOL_KEYS) and params["conv.0.weight"].ndim == 4:
        weight = params["conv.0.weight"]
        return Layer("block", weight.shape[1], weight.shape[0], pooled=bool(extra & _POOL_KEYS))
    shown = ", ".join(sorted(keys)[:4]) + (", ..." if len(keys) > 4 else "")
    raise LayoutError(f"module {index} ({shown}) is neither a 3x3 conv nor a block")


def _read_modules(state) -> list[Layer | None]:
    """The state dict -> one Layer per index of the Sequential; None where an index has no weights."""
    if not isinstance(state, dict) or not state:
        raise LayoutError("not a non-empty state dict")
    grouped: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        index, _, name = str(key).partition(".")
        if not (index.isdecimal() and name and isinstance(value, torch.Tensor)):
            raise LayoutError(f"key {str(key)[:60]!r} is not INDEX.NAME of a tensor, as in an nn.Sequential")
        grouped.setdefault(int(index), {})[name] = value
    return [_read_module(i, grouped[i]) if i in grouped else None for i in range(max(grouped) + 1)]


def _check_widths(layout: list[Layer]) -> None:
    widths = [layer for layer in layout if layer.kind in ("conv", "block")]
    for before, after in pairwise(widths):
        if before.n_out != after.n_in:
            raise LayoutError(
                f"a {before.kind} gives {before.n_out} channels to a {after.kind} that takes {after.n_in}"
            )


def infer_encoder_layout(state: dict) -> list[Layer]:
    """Stem conv(s) from 3 channels, then blocks and bias-free stride-2 convs, then a final conv
    with bias to the latent channels. In the stem, an index without weights is a ReLU, and the
    conv before it strides 2 (taesana: conv, ReLU, conv, ReLU); the stem conv right before the
    first block strides 1 (taesd..taef2)."""
    modules = _read_modules(state)
    if modules[0] is None or modules[0].kind != "conv" or modules[0].n_in != 3:
        raise LayoutError("the encoder does not start with a conv from 3 image channels")
    if modules[-1].kind != "conv" or not modules[-1].bias:
        raise LayoutError("the encoder does not end with a conv with bias to the latent channels")
    layout: list[Layer] = []
    for i, layer in enumerate(modules):
        in_stem = all(previous.kind != "block" for previous in layout)
        if layer is None:
            if not (in_stem and layout and layout[-1].kind == "conv" and layout[-1].stride == 1):
                raise LayoutError(f"module {i} has no weights, but is not a ReLU after a stem conv")
            layout[-1] = Layer("conv", layout[-1].n_in, layout[-1].n_out, stride=2)
            layout.append(RELU)
        elif layer.kind == "conv" and not layer.bias:
            if in_stem:
                raise LayoutError(f"module {i}, a bias-free (stride-2) conv, comes before the first block")
            layout.append(Layer("conv", layer.n_in, layer.n_out, stride=2, bias=False))
        elif layer.kind == "conv" and not (in_stem or i == len(modules) - 1):
            raise LayoutError(f"module {i}, a conv with bias, is neither in the stem nor the final conv")
        elif layer.kind == "conv" and in_stem and layout and layout[-1].kind == "conv":
            raise LayoutError(f"module {i} follows a stem conv without a ReLU between them")
        else:
            layout.append(layer)
    if not any(layer.kind == "block" for layer in layout):
        raise LayoutError("the encoder has no blocks")
    _check_widths(layout)
    return layout


def infer_decoder_layout(state: dict) -> list[Layer]:
    """Clamp, conv with bias from the latent channels, ReLU (indices 0-2), then blocks, with an
    upsampling (an index without weights) before each bias-free conv, then a final conv to 3
    channels."""
    modules = _read_modules(state)
    if len(modules) < 4 or modules[0] is not None or modules[2] is not None or modules[1] is None:
        raise LayoutError("the decoder does not start Clamp, conv, ReLU (weights at index 1 alone)")
    first, last = modules[1], modules[-1]
    if first.kind != "conv" or not first.bias:
        raise LayoutError("the decoder's module 1 is not a conv with bias from the latent channels")
    if last.kind != "conv" or not last.bias or last.n_out != 3:
        raise LayoutError("the decoder does not end with a conv with bias to 3 image channels")
    layout = [CLAMP, first, RELU]
    for i, layer in enumerate(modules[3:-1], start=3):
        after_upsample = layout[-1] == UPSAMPLE
        if layer is None:
            following = modules[i + 1]
            if following is None or following.kind != "conv" or following.bias:
                raise LayoutError(
                    f"module {i} has no weights, but no bias-free conv follows it (as after an upsampling)"
                )
            layout.append(UPSAMPLE)
        elif layer.kind == "conv" and (layer.bias or not after_upsample):
            raise LayoutError(f"module {i} is a conv, but not a bias-free one after an upsampling")
        else:
            layout.append(layer)
    layout.append(last)
    if not any(layer.kind == "block" for layer in layout):
        raise LayoutError("the decoder has no blocks")
    _check_widths(layout)
    return layout


# ---------------------------------------------------------------------------------------------
# Loading


def _load_state(path: Path, option: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise MedlatentInputError(
            f"{option}: {path} not found; give the path of a TAESD-family .pth or .safetensors file"
        )
    reader = read_safetensors if path.suffix == ".safetensors" else read_torch
    try:
        state = reader(path, "weights", "re-download it")
    except MedlatentInputError as err:
        raise MedlatentInputError(f"{option}: {err}") from err
    if not isinstance(state, dict):
        raise MedlatentInputError(
            f"{option}: weights in {path} do not match a TAESD-family model "
            f"(a {type(state).__name__}, not a state dict); check the file"
        )
    return state


def _infer(infer, state: dict, path: Path, option: str) -> list[Layer]:
    try:
        return infer(state)
    except LayoutError as err:
        raise MedlatentInputError(
            f"{option}: weight keys in {path} do not match a TAESD-family model ({err}); check the file"
        ) from None


def _load_strict(module: nn.Module, state: dict, path: Path, option: str) -> None:
    try:
        module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise MedlatentInputError(
            f"{option}: weight keys in {path} do not match a TAESD-family model ({first}); check the file"
        ) from err


def _check_pair(encoder: list[Layer], decoder: list[Layer], paths: tuple[Path, Path], option: str) -> None:
    given, taken = (encoder[-1].n_out, scale(encoder)), (decoder[1].n_in, scale(decoder))
    if given != taken:
        raise MedlatentInputError(
            f"{option}: the encoder {paths[0]} gives {given[0]} latent channels at 1/{given[1]} of the image size, "
            f"but the decoder {paths[1]} takes {taken[0]} and upsamples {taken[1]}x; "
            "give the matching pair as taesd:ENCODER,DECODER"
        )


def decoder_path_for(encoder_path: Path) -> Path:
    name = encoder_path.name
    if "encoder" not in name:
        raise MedlatentInputError(
            f"taesd:{encoder_path}: cannot find the decoder from this name; give taesd:ENCODER,DECODER"
        )
    return encoder_path.with_name(name.replace("encoder", "decoder"))


class TAESD(Autoencoder):
    """`latent_channels` and `downsampling_factor` (per instance) come from the encoder's layout."""

    input_range = (0.0, 1.0)
    image_channels = 3

    def __init__(self, encoder_path: str | Path, decoder_path: str | Path | None = None, encoder_only: bool = False):
        super().__init__()
        encoder_path = Path(encoder_path).expanduser()
        self.spec = f"taesd:{encoder_path}"
        self.has_decoder = not encoder_only
        if encoder_only:  # a published encoder whose decoder is not needed (or not at hand)
            decoder_path = None
        else:
            decoder_path = Path(decoder_path).expanduser() if decoder_path else decoder_path_for(encoder_path)
        enc_state = _load_state(encoder_path, self.spec)
        dec_state = _load_state(decoder_path, self.spec) if decoder_path else None
        enc_layout = _infer(infer_encoder_layout, enc_state, encoder_path, self.spec)
        self.latent_channels, self.downsampling_factor = enc_layout[-1].n_out, scale(enc_layout)
        self.encoder = build(enc_layout)
        _load_strict(self.encoder, enc_state, encoder_path, self.spec)
        if dec_state is not None:
            dec_layout = _infer(infer_decoder_layout, dec_state, decoder_path, self.spec)
            _check_pair(enc_layout, dec_layout, (encoder_path, decoder_path), self.spec)
            self.decoder = build(dec_layout)
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

    def decoder_steps(self) -> list[tuple[str, nn.Module]]:
        """The stages "blocks" (clamp, conv, ReLU and the first blocks, before any upsampling), "up1",
        "up2", ... (one per 2x upsampling stage) and "reconstruction" (the final conv to 3 channels)."""
        return upsampling_steps(self.decoder)


def taesd_name(target: str) -> str:
    stem = PurePath(target.partition(",")[0]).stem
    return stem.removesuffix("_encoder") or stem


@register_family("taesd", "taesd:ENCODER.pth[,DECODER.pth], the TAESD family", name=taesd_name)
def load_taesd(target: str, spec: str, *, device: str, progress: bool, encoder_only: bool) -> TAESD:
    encoder, _, decoder = target.partition(",")
    model = TAESD(encoder, decoder or None, encoder_only=encoder_only)
    model.spec = spec
    return model
