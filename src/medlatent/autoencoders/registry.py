"""Autoencoder families by name, as timm registers models: each family's module registers its
kind with `register_family`, owning its spec parsing (`KIND:TARGET`), its loading and its display
name; `load_autoencoder(spec)` and `display_name(spec)` look the kind up. `encoder:SPEC` (any
family's encoder alone) is the one kind registered here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePath

from ..errors import MedlatentInputError
from .base import Autoencoder


def default_name(target: str) -> str:
    """A file, folder or recipe name without its path."""
    return PurePath(target.rstrip("/")).name or target


@dataclass(frozen=True)
class Family:
    kind: str
    load: Callable[..., Autoencoder]  # load(target, spec, device=, progress=, encoder_only=)
    name: Callable[[str], str]  # the display name of a target
    help: str  # the spec's form, for the error that lists the kinds


FAMILIES: dict[str, Family] = {}


def register_family(kind: str, help: str, name: Callable[[str], str] = default_name):  # noqa: A002
    """Register the decorated `load(target, spec, *, device, progress, encoder_only)` as `kind`."""

    def register(load: Callable[..., Autoencoder]) -> Callable[..., Autoencoder]:
        FAMILIES[kind] = Family(kind, load, name, help)
        return load

    return register


def kinds() -> str:
    return ", ".join(FAMILIES)


def load_autoencoder(
    spec: str, device: str = "auto", progress: bool = True, encoder_only: bool = False
) -> Autoencoder:
    """The autoencoder of a spec `KIND:TARGET` (see `FAMILIES`), frozen and in eval mode."""
    kind, _, target = spec.partition(":")
    if not target:
        raise MedlatentInputError(f"--autoencoder {spec!r}: expected KIND:TARGET with KIND one of {kinds()}")
    if kind not in FAMILIES:
        raise MedlatentInputError(f"--autoencoder {spec!r}: unknown kind {kind!r}; use one of {kinds()}")
    model = FAMILIES[kind].load(target, spec, device=device, progress=progress, encoder_only=encoder_only)
    return model.eval().requires_grad_(False)


def display_name(spec: str) -> str:
    """A short name for reports: taesd:weights/taef2_encoder.pth -> taef2; hf:stabilityai/sd-vae-ft-mse
    -> sd-vae-ft-mse; builtin:kl-f4-synthetic -> kl-f4-synthetic; encoder:SPEC -> NAME (encoder)."""
    kind, _, target = spec.partition(":")
    family = FAMILIES.get(kind)
    return family.name(target) if family is not None else default_name(target) or spec


@register_family(
    "encoder", "encoder:SPEC, any other spec's encoder alone", name=lambda target: display_name(target) + " (encoder)"
)
def load_encoder(target: str, spec: str, *, device: str, progress: bool, encoder_only: bool) -> Autoencoder:
    """Any family's encoder alone; the spec keeps its prefix, so its cache entries are its own."""
    model = load_autoencoder(target, device, progress, encoder_only=True)
    model.spec, model.has_decoder = spec, False
    return model
