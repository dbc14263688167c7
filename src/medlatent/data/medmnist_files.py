"""MedMNIST (v2 and MedMNIST+ sizes) from the official `.npz` files.

The arrays are read with numpy and the metadata taken from `medmnist.INFO`: the dataset classes
of the `medmnist` package assert the official sample counts, which would reject subsets.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import MedlatentInputError
from ..io import sha256_file
from .base import ArrayImageStore, ImageDataset, fingerprint

MEDMNIST_SIZES = (28, 64, 128, 224)
_TASKS = {
    "binary-class": "binary",
    "multi-class": "multiclass",
    "multi-label, binary-class": "multilabel",
    "ordinal-regression": "ordinal",
}


def medmnist_root() -> Path:
    return Path(os.environ.get("MEDMNIST_ROOT", Path.home() / ".medmnist")).expanduser()


def load_medmnist(target: str, size: int, root: str | Path | None = None, download: bool = True) -> ImageDataset:
    """`target` is a flag such as `pneumoniamnist` or a path to an official `.npz` file."""
    from medmnist import INFO

    path = Path(target).expanduser()
    if target.endswith(".npz") or path.exists():
        if not path.is_file():
            raise MedlatentInputError(
                f"--dataset medmnist:{target}: file not found; give an "
                "existing .npz path or a flag such as pneumoniamnist"
            )
        flag = path.name.removesuffix(".npz").split("_")[0]
    else:
        flag = target.lower()
        if flag not in INFO:
            known = ", ".join(sorted(k for k in INFO if not k.endswith("3d")))
            raise MedlatentInputError(f"--dataset medmnist:{target}: unknown MedMNIST flag; use one of {known}")
        if flag.endswith("3d"):
            raise MedlatentInputError(f"--dataset medmnist:{target}: 3D datasets are not supported; use a 2D flag")
        path = _official_file(flag, size, Path(root) if root else medmnist_root(), download)

    try:
        archive = np.load(path)
        arrays = {key: archive[key] for key in archive.files}
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise MedlatentInputError(f"{path}: cannot read as a MedMNIST .npz ({err}); re-download the file") from err
    needed = [f"{part}_{kind}" for part in ("train", "val", "test") for kind in ("images", "labels")]
    missing = [key for key in needed if key not in arrays]
    if missing:
        raise MedlatentInputError(f"{path}: not a MedMNIST file, missing arrays {', '.join(missing)}")

    info = INFO.get(flag)
    images = np.concatenate([arrays[f"{p}_images"] for p in ("train", "val", "test")])
    labels = np.concatenate([arrays[f"{p}_labels"] for p in ("train", "val", "test")])
    if info is not None:
        task = _TASKS[info["task"]]
        class_names = [info["label"][str(i)] for i in range(len(info["label"]))]
    else:  # an .npz in MedMNIST layout with an unknown name: read the task off the labels
        task = "multilabel" if labels.shape[1] > 1 else ("binary" if labels.max() <= 1 else "multiclass")
        count = labels.shape[1] if task == "multilabel" else int(labels.max()) + 1
        class_names = [str(i) for i in range(count)]
    labels = labels.astype(np.int64) if task == "multilabel" else labels[:, 0].astype(np.int64)

    bounds = np.cumsum([0] + [len(arrays[f"{p}_labels"]) for p in ("train", "val", "test")])
    partitions = {p: np.arange(bounds[i], bounds[i + 1]) for i, p in enumerate(("train", "val", "test"))}
    channels = 1 if images.ndim == 3 else images.shape[-1]
    return ImageDataset(
        name=flag,
        task=task,
        class_names=class_names,
        labels=labels,
        images=ArrayImageStore(images, size),
        size=size,
        channels=channels,
        fingerprint=fingerprint("medmnist", sha256_file(path), size),
        partitions=partitions,
        source={"kind": "medmnist", "flag": flag, "file": str(path), "native_size": int(images.shape[1])},
    )


def _official_file(flag: str, size: int, root: Path, download: bool) -> Path:
    """The MedMNIST+ file of the working size where one exists, else the nearest larger one."""
    native = next((s for s in MEDMNIST_SIZES if s >= size), MEDMNIST_SIZES[-1])
    name = f"{flag}.npz" if native == 28 else f"{flag}_{native}.npz"
    path = root / name
    if path.is_file():
        return path
    if not download:
        raise MedlatentInputError(f"{path} not found; download it or pass the .npz path as medmnist:PATH")
    from medmnist import INFO

    root.mkdir(parents=True, exist_ok=True)
    url = INFO[flag]["url" if native == 28 else f"url_{native}"]
    try:
        from torchvision.datasets.utils import download_url

        download_url(url, root=str(root), filename=name, md5=INFO[flag]["MD5" if native == 28 else f"MD5_{native}"])
    except Exception as err:  # noqa: BLE001 - offline, proxy or checksum errors all mean the same to the user
        if path.exists():
            path.unlink()
        raise MedlatentInputError(
            f"could not download {name} ({type(err).__name__}); place the file at {path} or pass medmnist:PATH"
        ) from err
    return path
