"""Atomic file writes: a reader never sees a half-written file under its final name."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import MedlatentInputError


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` then rename it onto `path` (same folder, so the rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def savez(path: Path, arrays: dict, compressed: bool = False) -> None:
    """`arrays` into an .npz at `path` exactly (numpy would append ".npz" to a temporary name)."""
    import numpy as np

    with open(path, "wb") as handle:
        (np.savez_compressed if compressed else np.savez)(handle, **arrays)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# -- the boundary for everything read from a user's disk -------------------------------------------
# Each reader turns a missing, truncated, hostile or mistaken file into one MedlatentInputError that
# names the file and says what to do; nothing here runs code from a file (no pickle).


def _unreadable(path: Path, kind: str, err: BaseException, advice: str) -> MedlatentInputError:
    detail = " ".join(str(err).split())[:160]
    return MedlatentInputError(f"{path}: cannot read it as {kind} ({type(err).__name__}: {detail}); {advice}")


def _existing(path: str | Path, kind: str, advice: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise MedlatentInputError(f"{path}: {kind} not found; {advice}")
    return path


def read_json(path: str | Path, kind: str = "JSON", advice: str = "check the file or write it again") -> Any:
    """A JSON file's value."""
    path = _existing(path, kind, advice)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise _unreadable(path, kind, err, advice) from err


def read_json_object(path: str | Path, kind: str = "JSON", advice: str = "check the file or write it again") -> dict:
    """A JSON file that must hold an object (a mapping)."""
    value = read_json(path, kind, advice)
    if not isinstance(value, dict):
        raise MedlatentInputError(
            f"{path}: expected a JSON object in this {kind}, found {type(value).__name__}; {advice}"
        )
    return value


def read_safetensors(
    path: str | Path,
    kind: str = "weights",
    advice: str = "the file is damaged or not a safetensors file: save or download it again",
) -> dict:
    """The tensors of a .safetensors file (no code can run from it)."""
    from safetensors.torch import load_file

    path = _existing(path, kind, advice)
    try:
        return load_file(path)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own SafetensorError and OSError alike
        raise _unreadable(path, f"{kind} (safetensors)", err, advice) from err


def read_torch(
    path: str | Path,
    kind: str = "weights",
    advice: str = "the file is damaged or holds more than plain tensors: save or download it again",
) -> Any:
    """A torch file of plain tensors and containers, read with `weights_only=True`: a pickle that
    would run code is refused, as one error, and so is any file torch cannot read."""
    import pickle
    import warnings

    import torch

    path = _existing(path, kind, advice)
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols: the error below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only load failed" not in str(err).lower():
            raise _unreadable(path, f"{kind} (torch, plain tensors only)", err, advice) from err
        raise MedlatentInputError(
            f"{path}: cannot read it as {kind}: it holds Python objects beyond plain tensors, "
            f"which could run code when loaded; {advice}"
        ) from err
    except Exception as err:  # noqa: BLE001 - a damaged file fails anywhere in torch's reader
        raise _unreadable(path, f"{kind} (torch, plain tensors only)", err, advice) from err


def read_npz(
    path: str | Path,
    kind: str = "arrays",
    advice: str = "the file is damaged or holds objects: save it again with numeric arrays",
) -> dict:
    """The arrays of an .npz file, all read now (object arrays, which would need pickle, refused)."""
    import numpy as np

    path = _existing(path, kind, advice)
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):  # a bare .npy under an .npz name
            raise ValueError(f"a single {type(archive).__name__}, not an .npz archive of named arrays")
        with archive:
            return {key: archive[key] for key in archive.files}
    except Exception as err:  # noqa: BLE001 - zip, zlib and numpy errors alike
        raise _unreadable(path, f"{kind} (npz)", err, advice) from err
