"""Folders of PNG, JPEG, TIFF (8/16-bit) or DICOM files listed in a CSV manifest with labels.

Labels come from one column (class names or ids) or from several 0/1 columns (one-hot for a
single-label task, or multi-label when rows may have several ones). An optional patient column
groups images so that folds never split a patient; an optional split column gives an official
train/val/test split; an optional confounder column (a site, a scanner) gives the groups of a
shortcut audit (`ImageDataset.confounder`); optional concept columns give the concepts of a
concept bottleneck (`ImageDataset.concepts`). Paths are relative to the CSV's folder.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import MedlatentInputError
from .base import Concepts, Confounder, ImageDataset, check_finite, fingerprint, resize

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom", ""}


def read_image(path: Path) -> np.ndarray:
    """Read one file as float32 (H, W) or (H, W, 3) in [0, 1]."""
    suffix = path.suffix.lower()
    if suffix in (".dcm", ".dicom", ""):
        pixels = _read_dicom(path)
    elif suffix in (".tif", ".tiff"):
        import tifffile

        pixels = tifffile.imread(path)
    else:
        from PIL import Image

        with Image.open(path) as image:
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                pixels = np.asarray(image)
                if image.format == "PNG":
                    pixels = pixels.astype(np.uint16)  # a 16-bit PNG (Pillow may open it as mode "I"): scaled by 65535
            elif image.mode in ("L", "RGB"):
                pixels = np.asarray(image)
            else:
                pixels = np.asarray(image.convert("RGB"))
    return _to_unit_range(np.asarray(pixels), path)


def _read_dicom(path: Path) -> np.ndarray:
    """Stored values -> modality LUT (rescale slope/intercept or LUT) -> VOI LUT (window centre/width
    or LUT) where present -> [0, 1] by the range those LUTs map the stored bit range to (not by the
    image's own min and max, so the same pixels as a PNG of the same bit depth give the same values)."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(path)
    pixels = apply_modality_lut(ds.pixel_array, ds)
    lo, hi = _dicom_output_range(ds)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        pixels = apply_voi_lut(pixels, ds)
        if "VOILUTSequence" in ds:  # apply_voi_lut prefers the LUT; its output is 0 .. 2^bits - 1
            lo, hi = 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
        # windowing maps onto the same range the modality LUT gives (pydicom's apply_windowing)
    pixels = np.clip((pixels.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        pixels = 1.0 - pixels  # MONOCHROME1 shows low values as white
    return pixels


def _dicom_output_range(ds) -> tuple[float, float]:
    """The stored bit range after the modality LUT (as pydicom's windowing computes it)."""
    bits = int(ds.get("BitsStored", 8 * ds.pixel_array.dtype.itemsize))
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    lo, hi = (
        (0.0, float(2**bits - 1))
        if int(ds.get("PixelRepresentation", 0)) == 0
        else (-float(2 ** (bits - 1)), float(2 ** (bits - 1) - 1))
    )
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        lo, hi = sorted((lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)))
    return lo, hi


def _to_unit_range(pixels: np.ndarray, path: Path) -> np.ndarray:
    if pixels.ndim == 3 and pixels.shape[-1] == 4:
        pixels = pixels[..., :3]
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[-1] != 3):
        raise MedlatentInputError(f"{path}: expected a 2D grayscale or RGB image, got shape {pixels.shape}")
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float32) / 255.0
    if pixels.dtype == np.uint16:
        return pixels.astype(np.float32) / 65535.0
    pixels = pixels.astype(np.float32)
    if not np.isfinite(pixels).all():
        raise MedlatentInputError(f"{path}: image contains NaN or Inf; fix or remove it")
    lo, hi = float(pixels.min()), float(pixels.max())
    if lo >= 0.0 and hi <= 1.0:
        return pixels
    return (pixels - lo) / (hi - lo) if hi > lo else np.zeros_like(pixels)


def read_row_image(path: Path, csv_path: Path | None, row: int | None) -> np.ndarray:
    """`read_image` with errors that name the manifest row (or the file alone, for a folder of images)."""
    where = f"{csv_path} row {row}: " if csv_path is not None else ""
    try:
        return read_image(path)
    except MedlatentInputError as err:
        raise MedlatentInputError(f"{where}{err}" if where else str(err)) from err
    except Exception as err:  # noqa: BLE001 - decoder errors vary by format
        raise MedlatentInputError(
            f"{where}cannot read image {path} ({type(err).__name__}: "
            f"{err}); fix or remove {'the row' if where else 'the file'}"
        ) from err


@dataclass
class FileImageStore:
    """Reads files on demand and resizes them to the working size."""

    paths: list[Path]
    rows: list[int] | None  # manifest line of each path (None: a folder of images)
    csv_path: Path | None
    size: int
    channels: int
    native_min_side: int | None = None  # the shorter side of the smallest image loaded so far

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, indices: np.ndarray) -> torch.Tensor:
        out = torch.empty(len(indices), self.channels, self.size, self.size)
        for slot, i in enumerate(np.asarray(indices)):
            image = torch.from_numpy(read_row_image(self.paths[i], self.csv_path, self.rows[i] if self.rows else None))
            side = min(image.shape[:2])
            self.native_min_side = side if self.native_min_side is None else min(self.native_min_side, side)
            image = image[None] if image.ndim == 2 else image.permute(2, 0, 1)
            if image.shape[0] != self.channels:  # grayscale <-> RGB to match the dataset
                image = (
                    image.expand(3, -1, -1)
                    if self.channels == 3
                    else (image * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0, keepdim=True)
                )
            out[slot] = resize(image[None], self.size)[0]
        return check_finite(out, str(self.csv_path or self.paths[0].parent))


def load_manifest(
    csv_path: str | Path,
    size: int,
    image_column: str = "path",
    label_columns: list[str] | None = None,
    patient_column: str | None = None,
    split_column: str | None = None,
    task: str | None = None,
    confounder_column: str | None = None,
    concept_columns: list[str] | None = None,
) -> ImageDataset:
    """The images and labels a CSV manifest lists (see the module's description for the columns)."""
    csv_path = Path(csv_path).expanduser()
    if not csv_path.is_file():
        raise MedlatentInputError(f"--dataset csv:{csv_path}: file not found; give the path of a CSV manifest")
    header, rows = _read_rows(csv_path)
    label_columns = label_columns or ["label"]
    for column in [image_column, *label_columns, patient_column, split_column]:
        if column is not None and column not in header:
            raise MedlatentInputError(
                f"{csv_path}: column {column!r} not found (columns: "
                f"{', '.join(header)}); set --image-column/--label-column"
            )

    paths, line_numbers = [], []
    for line, row in enumerate(rows, start=2):  # row 1 is the header
        value = (row[image_column] or "").strip()
        path = Path(value) if Path(value).is_absolute() else csv_path.parent / value
        if not value or not path.is_file():
            raise MedlatentInputError(
                f"{csv_path} row {line}: image {value!r} not found (looked at {path}); fix the path or remove the row"
            )
        paths.append(path)
        line_numbers.append(line)

    labels, class_names, task = _parse_labels(rows, label_columns, csv_path, task)
    present = (
        [j for j in range(labels.shape[1]) if 0 < labels[:, j].sum() < len(labels)]
        if task == "multilabel"
        else np.unique(labels)
    )
    if len(present) < (1 if task == "multilabel" else 2):
        what = (
            "every label column is constant"
            if task == "multilabel"
            else f"every row has class {class_names[int(labels[0])]!r}"
        )
        raise MedlatentInputError(f"{csv_path}: {what}; a classifier needs at least two classes present")
    probe = read_row_image(paths[0], csv_path, line_numbers[0])
    channels = 3 if probe.ndim == 3 else 1

    partitions = None
    if split_column:
        values = np.array([row[split_column].strip().lower() for row in rows])
        unknown = sorted(set(values) - {"train", "val", "test"})
        if unknown:
            raise MedlatentInputError(
                f"{csv_path}: split column {split_column!r} has values {unknown}; use train, val or test"
            )
        partitions = {p: np.flatnonzero(values == p) for p in ("train", "val", "test") if (values == p).any()}
        if "train" not in partitions or "test" not in partitions:
            raise MedlatentInputError(f"{csv_path}: split column {split_column!r} needs at least train and test rows")
    patients = np.array([row[patient_column] for row in rows]) if patient_column else None
    stat = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
    return ImageDataset(
        name=csv_path.resolve().parent.name
        or csv_path.stem,  # the folder names the dataset; the CSV is often "labels"
        task=task,
        class_names=class_names,
        labels=labels,
        images=FileImageStore(paths, line_numbers, csv_path, size, channels),
        size=size,
        channels=channels,
        fingerprint=fingerprint("manifest", csv_path.read_bytes(), stat, size, channels),
        partitions=partitions,
        patient_ids=patients,
        source={"kind": "csv", "file": str(csv_path), "image_column": image_column, "label_columns": label_columns},
        confounder=read_confounder(header, rows, confounder_column, csv_path) if confounder_column else None,
        concepts=read_concepts(header, rows, concept_columns, csv_path) if concept_columns else None,
    )


def read_groups(header: list[str], rows: list[dict], option: str, column: str, csv_path: Path) -> tuple[list, list]:
    """A column of groups, each row's value and the distinct values sorted: refused in one line
    when it is missing, has an empty value, is constant (no groups to compare) or has one value per
    image (an id, not a group)."""
    if column not in header:
        raise MedlatentInputError(f"{option}: no such column in {csv_path} (columns: {', '.join(header)})")
    values = [(row[column] or "").strip() for row in rows]
    if "" in values:
        line = values.index("") + 2
        raise MedlatentInputError(f"{option}: {csv_path} row {line} has no value; fill it in or remove the row")
    levels = sorted(set(values))
    if len(levels) < 2:
        raise MedlatentInputError(f"{option}: every row has the value {levels[0]!r}; it needs at least two values")
    if len(levels) == len(values):
        raise MedlatentInputError(
            f"{option}: every row has its own value (an id or a measurement, not a group); "
            "give a column of a few values, e.g. binned"
        )
    return values, levels


def read_concepts(header: list[str], rows: list[dict], columns: list[str], csv_path: Path) -> Concepts:
    """Concept columns as binary concepts, named "COLUMN=VALUE" for the value that is 1: a column of
    two values gives one, for its second value sorted ("0"/"1": "COLUMN=1"), a column of more gives
    one per value."""
    if len(set(columns)) < len(columns):
        raise MedlatentInputError(f"--concept-column: {columns} names a column twice; give each once")
    names, values = [], []
    for column in columns:
        given, levels = read_groups(header, rows, f"--concept-column {column}", column, csv_path)
        given = np.array(given)
        for level in levels[1:] if len(levels) == 2 else levels:
            names.append(f"{column}={level}")
            values.append((given == level).astype(np.float32))
    return Concepts(names=names, values=np.stack(values, axis=1), source=f"csv:{csv_path}")


def read_confounder(header: list[str], rows: list[dict], column: str, csv_path: Path) -> Confounder:
    """The confounder column as groups (its distinct values, sorted): refused in one line when it is
    missing, has an empty value, is constant (no groups to compare) or has one value per image (an
    id, not a group)."""
    values, levels = read_groups(header, rows, f"--confounder-column {column}", column, csv_path)
    index = {level: i for i, level in enumerate(levels)}
    return Confounder(name=column, codes=np.array([index[v] for v in values], dtype=np.int64), levels=levels)


def _read_rows(csv_path: Path) -> tuple[list[str], list[dict]]:
    """The header and rows of a CSV manifest, each row with exactly the header's columns."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as err:
        raise MedlatentInputError(
            f"{csv_path}: not a readable UTF-8 CSV file ({type(err).__name__}: {err}); save it as CSV (UTF-8)"
        ) from err
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise MedlatentInputError(
            f"{csv_path}: column {repeated[0]!r} appears more than once in the header; give each column its own name"
        )
    if not rows:
        raise MedlatentInputError(f"{csv_path}: the manifest has no rows")
    for line, row in enumerate(
        rows, start=2
    ):  # DictReader marks missing fields None and extra ones under the key None
        if None in row or any(value is None for value in row.values()):
            count = len(row) - (None in row) + len(row.get(None) or []) - sum(value is None for value in row.values())
            raise MedlatentInputError(
                f"{csv_path} row {line}: {count} fields, the header has {len(header)}; fix the row"
            )
    return header, rows


def load_image_folder(
    folder: str | Path, size: int, channels: int, class_names: list[str], option: str = "--images"
) -> ImageDataset:
    """The image files directly in `folder` (PNG, JPEG, TIFF, DICOM by suffix; sorted by name), without
    labels, at `size` and converted to `channels`: images to edit or score with a model trained on
    another dataset. Their labels are unknown and stored as class 0 (`source["labels"]` says so)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise MedlatentInputError(f"{option} {folder}: not a folder; give a folder of PNG, JPEG, TIFF or DICOM files")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES - {""})
    if not paths:
        raise MedlatentInputError(f"{option} {folder}: no image files (.png, .jpg, .tif, .dcm) in it")
    stat = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
    return ImageDataset(
        name=folder.resolve().name,
        task="binary" if len(class_names) == 2 else "multiclass",
        class_names=list(class_names),
        labels=np.zeros(len(paths), dtype=np.int64),
        images=FileImageStore(paths, None, None, size, channels),
        size=size,
        channels=channels,
        fingerprint=fingerprint("folder", str(folder.resolve()), stat, size, channels),
        source={"kind": "folder", "folder": str(folder), "files": [p.name for p in paths], "labels": "unknown"},
    )


def _parse_labels(rows: list[dict], columns: list[str], csv_path: Path, task: str | None):
    if len(columns) == 1:
        raw = [row[columns[0]].strip() for row in rows]
        for line, value in enumerate(raw, start=2):
            if value == "" or value.lower() in ("nan", "inf", "-inf"):
                raise MedlatentInputError(
                    f"{csv_path} row {line}: label {value!r} in column {columns[0]!r} is missing or not finite"
                )
        numeric = all(v.lstrip("-").isdigit() for v in raw)
        if numeric:
            ids = np.array([int(v) for v in raw])
            if ids.min() < 0:
                raise MedlatentInputError(
                    f"{csv_path}: column {columns[0]!r} has negative class ids; use 0..K-1 or class names"
                )
            class_names = [str(i) for i in range(int(ids.max()) + 1)]
        else:
            class_names = sorted(set(raw))
            ids = np.array([class_names.index(v) for v in raw])
        inferred = "binary" if len(class_names) == 2 else "multiclass"
        task = task or inferred
        if task == "multilabel":
            raise MedlatentInputError(
                f"{csv_path}: a multilabel task needs one 0/1 column per label (--label-column repeated)"
            )
        if len(class_names) < 2:
            raise MedlatentInputError(
                f"{csv_path}: column {columns[0]!r} holds a single class; a classifier needs at least two"
            )
        return ids.astype(np.int64), class_names, task

    matrix = np.zeros((len(rows), len(columns)), dtype=np.int64)
    for line, row in enumerate(rows, start=2):
        for j, column in enumerate(columns):
            value = row[column].strip()
            if value not in ("0", "1", "0.0", "1.0"):
                raise MedlatentInputError(f"{csv_path} row {line}: column {column!r} must be 0 or 1, got {value!r}")
            matrix[line - 2, j] = int(float(value))
    one_hot = bool((matrix.sum(1) == 1).all())
    # The same rule as for one label column: two mutually exclusive classes are a binary task.
    task = task or (("binary" if len(columns) == 2 else "multiclass") if one_hot else "multilabel")
    if task == "multilabel":
        return matrix, list(columns), task
    if not one_hot:
        bad = int(np.flatnonzero(matrix.sum(1) != 1)[0]) + 2
        raise MedlatentInputError(
            f"{csv_path} row {bad}: one-hot label columns need exactly one 1 per row for a {task} task"
        )
    if task == "binary" and len(columns) != 2:
        raise MedlatentInputError(f"{csv_path}: a binary task needs 2 one-hot columns, got {len(columns)}")
    return matrix.argmax(1), list(columns), task
