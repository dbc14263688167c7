"""Run folders: checked before any work, finished atomically, never taken from their owner.

Every folder a command writes is known by what it holds: the record file of a command that builds
its folder whole (`RECORDS`), or the mark (`.medlatent-run.json`: the command) of one that writes
into it as it goes.
`check_out` runs before any work: `--out` naming an existing file, a place that cannot be written
or a folder medlatent did not write (or another command wrote) is refused with one line. Commands
that build their folder beside it and rename it when complete (`finish_folder`) replace a previous
run of the same command only when asked (`--overwrite`); commands that write into their folder as
they go (the audits) resume in a folder of their own command. A folder without a mark is never
deleted: it is the user's.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .errors import MedlatentInputError

MARK = ".medlatent-run.json"
OVERWRITE_HELP = (
    "Replace a previous run of this command in --out (a folder medlatent did not write is never replaced)."
)
# The record each command that builds its folder whole keeps in it, with keys that only it writes.
RECORDS = {
    "diffusion train": ("diffusion.json", {"class_names", "autoencoder_hash", "config"}),
    "diffusion sample": ("samples.json", {"model_class", "sampler", "n"}),
    "classifier train": ("estimator.json", {"train_config", "space", "medlatent_format"}),
    "autoencoder train": ("medlatent_training.json", {"recipe", "final_loss"}),
}
# Run folders of the audits written before the mark existed: finished ones, by their results' kind.
LEGACY_KINDS = {
    "medlatent.gap": "gap",
    "augment": "augment",
    "medlatent.audit": "audit",
    "medlatent.diffusion_classifier": "diffusion classify",
    "medlatent.counterfactual": "counterfactual",
}


def _json_keys(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def made_by(folder: Path) -> str | None:
    """The command that wrote `folder`: its mark, or its command's record (with that record's own
    keys), or the results of an audit from before the mark; else None (a folder of the user's)."""
    if (folder / MARK).is_file():
        command = _json_keys(folder / MARK).get("command")
        return str(command) if command else None
    for command, (name, keys) in RECORDS.items():
        if (folder / name).is_file() and keys <= set(_json_keys(folder / name)):
            return command
    if (folder / "results.json").is_file() and (folder / "report.html").is_file():
        return LEGACY_KINDS.get(_json_keys(folder / "results.json").get("kind"))
    return None


def writable_place(path: Path, option: str = "--out") -> Path:
    """The folder that must be writable for `path` (given as `option`) to be made or written: `path`
    itself when it is an existing folder, else the nearest existing folder above it."""
    place = path.absolute() if path.is_dir() else path.absolute().parent
    while not place.exists():
        place = place.parent
    if not place.is_dir() or not os.access(place, os.W_OK | os.X_OK):
        raise MedlatentInputError(
            f"{option} {path}: cannot write in {place} (permission denied); give a folder you can write to"
        )
    return place


def check_output_file(path: str | None, option: str, what: str) -> None:
    """An output file, checked before the work: not a folder, in a place that can be written (None: not asked)."""
    if path is None:
        return
    if Path(path).is_dir():
        raise MedlatentInputError(f"{option} {path}: an existing folder; give {what}")
    writable_place(Path(path), option)


def check_json_out(path: str | None) -> None:
    """--json, checked before the work (None: not asked)."""
    check_output_file(path, "--json", "a .json file path")


def _contents(folder: Path) -> list[Path]:
    """What a folder holds, less a mark being written (its temporary file) by another process."""
    return [p for p in folder.iterdir() if not p.name.startswith(f".{MARK}.")]


def check_out(out: str | Path, command: str, overwrite: bool = False, resumable: bool = False) -> Path:
    """`out` checked for `command` before any work. resumable: the command writes into the folder
    as it goes and resumes there (a folder of the same command is accepted, finished or not);
    otherwise the folder is built beside `out` and renamed to it (`finish_folder`)."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise MedlatentInputError(f"--out {out}: an existing file, not a folder; give a new folder path")
    if not resumable and (out.is_symlink() or Path.cwd().resolve().is_relative_to(out.resolve())):
        what = "a symbolic link" if out.is_symlink() else "the folder you are in (or above it)"
        raise MedlatentInputError(
            f"--out {out}: {what}; give the path of a new folder, which is made when the run is complete"
        )
    writable_place(out)
    if not out.is_dir() or not _contents(out):
        return out
    owner = made_by(out)
    if owner is None:
        raise MedlatentInputError(
            f"--out {out}: a folder of files medlatent did not write; give a new or empty folder (it is never deleted)"
        )
    if owner != command:
        raise MedlatentInputError(
            f"--out {out}: holds a `medlatent {owner}` run; give another folder for `medlatent {command}`"
        )
    if not (resumable or overwrite):
        raise MedlatentInputError(
            f"--out {out}: holds a finished `medlatent {command}` run; "
            "pass --overwrite to replace it, or give another folder"
        )
    return out


def mark(folder: Path, command: str) -> None:
    """Mark `folder` as written by `command`."""
    from . import __version__
    from .io import atomic_write_json

    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / MARK, {"command": command, "medlatent": __version__})


def finish_run(out: str | Path, command: str, results: dict, config=None) -> list[str]:
    """The one way a run folder is finished: marked, its settings as config.yaml (`--config
    out/config.yaml` runs it again), its report
    pages drawn from the results (each command's own, `reports.html.rebuild_report`), then
    results.json, written last: a folder holding results.json is complete. Returns the report
    files' names (also in the results)."""
    from .io import atomic_write_json
    from .reports.html import rebuild_report

    out = Path(out)
    if "provenance" not in results:
        raise ValueError(f"{command}: results without provenance")  # a programming error, not the user's
    mark(out, command)
    if config is not None:
        write_settings(out / "config.yaml", config)
    results["reports"] = rebuild_report(results, out)
    atomic_write_json(out / "results.json", results)
    return results["reports"]


def stored_or_computed(path: Path, compute, matches=None) -> tuple[dict, bool]:
    """A part of a run (arrays its command stores in an .npz under the run folder) read back where
    one is stored and `matches(stored)`, else `compute()`'s record, stored atomically: a rerun after
    a kill resumes from the parts already stored. Returns the record and whether it was stored."""
    import numpy as np

    from .io import atomic_write, savez

    if path.is_file():
        stored = dict(np.load(path))
        if matches is None or matches(stored):
            return stored, True
    record = compute()
    atomic_write(path, lambda tmp: savez(tmp, record))
    return record, False


def write_settings(path: Path, config) -> Path:
    """Every command-line setting of `config` as YAML, keyed by option name (what `--config` reads)."""
    import yaml

    from .config import leaves
    from .io import atomic_write_text

    values = {}
    for leaf in leaves(type(config)):
        if leaf.field.metadata.get("cli", True):
            value = leaf.value_in(config)
            values[leaf.option] = list(value) if isinstance(value, tuple) else value
    return atomic_write_text(path, yaml.safe_dump(values, sort_keys=False))


def partial_folder(out: Path) -> Path:
    """Where a folder is built before `finish_folder` renames it to `out`."""
    out = Path(os.path.abspath(Path(out).expanduser()))  # "out/" and "sub/../out" name the same folder
    return out.with_name(f".{out.name}.partial")


def finish_folder(tmp: Path, out: str | Path, command: str) -> Path:
    """Rename the complete folder `tmp` (holding its command's record) to `out`, replacing only a
    previous run of the same command (checked again here: a folder of the user's own files is never
    deleted)."""
    out = Path(os.path.abspath(Path(out).expanduser()))
    check_out(out, command, overwrite=True)
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out
