"""Data sources. `load_dataset(spec, size)` resolves a spec string to an `ImageDataset`:

- `synthetic` or `synthetic:lesion_size=0.05,lesion_contrast=0.2,n_train=2000`: the built-in benchmark;
- `medmnist:pneumoniamnist` (downloaded where a network exists) or `medmnist:path/to/file.npz`;
- `csv:path/to/manifest.csv`: image files with labels (see `load_manifest` for the columns).

A spurious marker on the synthetic benchmark (`synthetic:marker=corner,marker_rate=0.95`) or a CSV
column (`confounder_column`) gives the dataset its `confounder`, the groups of a shortcut audit; the
synthetic benchmark's nodule and marker, or CSV columns (`concept_columns`), its `concepts`.
"""

from __future__ import annotations

from ..errors import MedlatentInputError
from .base import TASKS, Concepts, Confounder, ImageDataset
from .manifest import load_manifest, read_image
from .medmnist_files import load_medmnist
from .splits import Split, make_splits
from .synthetic import SyntheticConfig, make_synthetic

__all__ = [
    "Concepts",
    "Confounder",
    "ImageDataset",
    "Split",
    "SyntheticConfig",
    "TASKS",
    "load_dataset",
    "load_manifest",
    "load_medmnist",
    "make_splits",
    "make_synthetic",
    "read_image",
]


def _parse_options(text: str, option: str) -> dict:
    fields = {f.name: f.type for f in SyntheticConfig.__dataclass_fields__.values()}
    options = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in fields:
            raise MedlatentInputError(f"{option}: unknown synthetic option {name!r}; use {', '.join(fields)}")
        if fields[name] in (str, "str"):
            options[name] = value
            continue
        try:
            options[name] = int(value) if fields[name] in (int, "int") else float(value)
        except ValueError as err:
            raise MedlatentInputError(f"{option}: {name}={value!r} is not a number") from err
    return options


def load_dataset(
    spec: str,
    size: int = 64,
    confounder_column: str | None = None,
    concept_columns: list[str] | None = None,
    **csv_options,
) -> ImageDataset:
    """The dataset of a --dataset spec at `size` px; `csv_options` are `load_manifest`'s column
    settings, `confounder_column` a CSV column of groups (a site, a scanner) kept as its confounder,
    `concept_columns` CSV columns kept as its concepts."""
    kind, _, target = spec.partition(":")
    option = f"--dataset {spec}"
    check_csv_columns(kind, confounder_column, concept_columns)
    if kind == "synthetic":
        return make_synthetic(size, **_parse_options(target, option))
    if kind == "medmnist":
        return load_medmnist(target, size)
    if kind == "csv":
        options = {k: v for k, v in csv_options.items() if v is not None}
        return load_manifest(
            target, size, confounder_column=confounder_column, concept_columns=concept_columns, **options
        )
    raise MedlatentInputError(f"{option}: unknown data source {kind!r}; use synthetic, medmnist:FLAG|PATH or csv:PATH")


def check_csv_columns(kind: str, confounder_column: str | None, concept_columns: list[str] | None) -> None:
    """--confounder-column and --concept-column name CSV columns: refused for any other source."""
    if confounder_column is not None and kind != "csv":
        raise MedlatentInputError(
            f"--confounder-column {confounder_column}: applies to csv: datasets; the synthetic benchmark's "
            "confounder is its marker (synthetic:marker=corner,marker_rate=0.95)"
        )
    if concept_columns and kind != "csv":
        raise MedlatentInputError(
            f"--concept-column {concept_columns[0]}: applies to csv: datasets; the synthetic benchmark "
            "knows its own concepts (the nodule, its size and place, the marker)"
        )
