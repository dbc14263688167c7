"""The Python API, with the CLI's names: `gap`, `report`, `train_autoencoder`."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import yaml

from .audits.config import GapConfig
from .errors import MedlatentInputError


def load_config(path: str | Path | None, overrides: dict) -> GapConfig:
    """YAML file values, then explicitly given options on top."""
    values: dict = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise MedlatentInputError(f"--config {path}: file not found")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise MedlatentInputError(f"--config {path}: not valid YAML ({str(err).splitlines()[0]})") from err
        if not isinstance(values, dict):
            raise MedlatentInputError(f"--config {path}: expected a mapping of option names to values")
        known = {f.name for f in fields(GapConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MedlatentInputError(f"--config {path}: unknown keys {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return GapConfig(**values)
    except TypeError as err:
        raise MedlatentInputError(f"configuration: {err}") from err


def gap(config: str | Path | None = None, **options) -> dict:
    """Measure the learnability gap; same options as `medlatent gap`. Returns the results dict."""
    from .audits.gap import run_gap

    return run_gap(load_config(config, options))


def report(run: str | Path) -> Path:
    """Rebuild report.html of a run folder from its results.json."""
    from .reports import read_results, write_report

    run = Path(run)
    results = read_results(run)
    folder = run if run.is_dir() else run.parent
    return write_report(folder / "report.html", results)


def autoencoder_train(out: str | Path, recipe: str = "kl-f4-synthetic", device: str = "auto", progress: bool = True, **overrides) -> Path:
    """Train a built-in autoencoder from a recipe (fields of `BuiltinRecipe` override it)."""
    from .autoencoders import RECIPES, BuiltinRecipe, train_autoencoder

    if recipe not in RECIPES:
        raise MedlatentInputError(f"--recipe {recipe!r}: use one of {', '.join(RECIPES)}")
    known = set(BuiltinRecipe.__dataclass_fields__)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise MedlatentInputError(f"unknown recipe options {', '.join(unknown)}")
    from dataclasses import replace

    chosen = replace(RECIPES[recipe], **{k: v for k, v in overrides.items() if v is not None})
    return train_autoencoder(chosen, out, device=device, progress=progress)
