"""Provenance recorded with every result: configuration, versions, machine, time."""

from __future__ import annotations

import datetime as dt
import platform
import sys
from importlib import metadata

import torch

from ..device import reproducibility

PACKAGES = (
    "medlatent",
    "torch",
    "torchvision",
    "diffusers",
    "timm",
    "accelerate",
    "numpy",
    "scikit-learn",
    "scipy",
    "safetensors",
    "medmnist",
    "pydicom",
)


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def source_commit() -> str | None:
    """The git commit of medlatent's source when it runs from a checkout ("+dirty" with local changes)."""
    import subprocess
    from pathlib import Path

    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no", "--", "."],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def provenance(config: dict, device: torch.device) -> dict:
    return {
        "medlatent": package_versions()["medlatent"],
        "medlatent_commit": source_commit(),
        "config": config,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
        "reproducibility": reproducibility(device),
        "packages": package_versions(),
    }
