"""Provenance recorded with every result: configuration, versions, machine, time."""

from __future__ import annotations

import datetime as dt
import platform
import sys
from importlib import metadata

import torch

PACKAGES = ("medlatent", "torch", "torchvision", "diffusers", "timm", "numpy", "scikit-learn", "scipy", "safetensors", "medmnist")


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def provenance(config: dict, device: torch.device) -> dict:
    return {
        "config": config,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
        "packages": package_versions(),
    }
