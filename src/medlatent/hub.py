"""The Hugging Face Hub: saved models in and out.

`resolve_model_dir` is the one place a saved model is fetched: every option that takes a folder
saved by `medlatent classifier train` or `medlatent diffusion train` also takes
`hf-hub:OWNER/NAME[@REVISION]`, downloaded with `huggingface_hub.snapshot_download` into the local
Hub cache (which `HF_HUB_OFFLINE` and `HF_HUB_CACHE` govern) and read from there as a local folder:
only JSON and safetensors files, never code. `medlatent push` (`run_push`) uploads such a folder
with a model card (`model_card`) generated from what the folder records.
"""

from __future__ import annotations

import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .config import DataConfig, DiffusionConfig, PushConfig, TrainConfig, leaves
from .errors import MedlatentInputError, MedlatentRuntimeError
from .io import read_json_object
from .rundir import RECORDS, made_by

HUB_PREFIX = "hf-hub:"
# What a saved model is read from: its records and weights. A repository's other files (pickles,
# code, images) are never downloaded, so nothing in it can run here.
SNAPSHOT_FILES = ["*.json", "*.safetensors"]
CARD_FILE = "README.md"
CARD_TEMPLATE = "model_card.md.j2"
KINDS = {"classifier train": "classifier", "diffusion train": "latent diffusion model"}
DOWNLOAD_HELP = "`hf download {repo}{revision}` (`huggingface-cli download` with an older huggingface_hub)"
LOGIN_HELP = "log in with `hf auth login` (or set HF_TOKEN)"


def is_hub_spec(value: Any) -> bool:
    """Whether an option's value names a Hub model (`hf-hub:OWNER/NAME[@REVISION]`) rather than a folder."""
    return isinstance(value, (str, os.PathLike)) and os.fspath(value).startswith(HUB_PREFIX)


def parse_hub_spec(spec: str, where: str) -> tuple[str, str | None]:
    """(repo id, revision or None) of `hf-hub:OWNER/NAME[@REVISION]`; a malformed spec is one error naming `where`."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id, at, revision = spec[len(HUB_PREFIX) :].partition("@")
    try:
        if repo_id.count("/") != 1 or (at and not revision):
            raise HFValidationError("not OWNER/NAME[@REVISION]")
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise MedlatentInputError(
            f"{where}: not a Hub model name; use hf-hub:OWNER/NAME or hf-hub:OWNER/NAME@REVISION "
            "(a branch, tag or commit), or a local folder"
        ) from err
    return repo_id, revision or None


def resolve_model_dir(spec_or_path: str | Path, option: str | None = None) -> Path:
    """The local folder of a saved model: `spec_or_path` itself, or for `hf-hub:OWNER/NAME[@REVISION]`
    its snapshot in the local Hub cache, downloaded when missing (JSON and safetensors files only).
    A spec that cannot be resolved is one MedlatentInputError naming `option` (e.g. "--init") and
    saying what to do."""
    if not is_hub_spec(spec_or_path):
        return Path(spec_or_path)
    from huggingface_hub import snapshot_download

    spec = os.fspath(spec_or_path)
    where = f"{option} {spec}" if option else spec
    repo_id, revision = parse_hub_spec(spec, where)
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=SNAPSHOT_FILES))
    except Exception as err:  # noqa: BLE001 - every hub failure becomes one line of advice
        raise MedlatentInputError(f"{where}: {download_advice(err, repo_id, revision)}") from err


def download_advice(err: BaseException, repo_id: str, revision: str | None) -> str:
    """What a failed download means and what to do, by huggingface_hub's exception."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    fetch = DOWNLOAD_HELP.format(repo=repo_id, revision=f" --revision {revision}" if revision else "")
    if isinstance(err, GatedRepoError):
        return f"a gated repository: accept its conditions on its Hub page, then {LOGIN_HELP}"
    if isinstance(err, RepositoryNotFoundError):
        return f"no such model repository on the Hub, or a private one: check the name, or {LOGIN_HELP}"
    if isinstance(err, RevisionNotFoundError):
        return f"{repo_id} has no revision {revision}: check the branch, tag or commit after @"
    if isinstance(err, IncompleteSnapshotError):
        return (
            "its copy in the local Hub cache is incomplete and the Hub cannot be reached: "
            f"download it again with {fetch}"
        )
    if isinstance(err, LocalEntryNotFoundError):
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        return (
            f"not in the local Hub cache ({constants.HF_HUB_CACHE}) and {why}: offline, download it first "
            f"where there is network with {fetch}, or give a local folder"
        )
    if isinstance(err, HfHubHTTPError) and getattr(err.response, "status_code", None) in (401, 403):
        return f"the Hub refused access: {LOGIN_HELP}, with a token that can read it"
    first = " ".join(str(err).split())[:160]
    return (
        f"cannot download it ({type(err).__name__}: {first}); check the name and the network, "
        f"or download it first with {fetch}"
    )


# -- the model card ---------------------------------------------------------------------------------

METRIC_NAMES = {"auroc": "AUROC", "balanced_accuracy": "Balanced accuracy", "mcc": "MCC"}
# The methods a model's card cites: those the README names for what the model was trained with.
CITATIONS = {
    "learnability_gap": (
        "Dombrowski, Nützel and Kainz, *The Learnability Gap in Medical Latent Diffusion*, arXiv:2605.17087, 2026",
        "@article{dombrowski2026learnability,\n  title   = {The Learnability Gap in Medical Latent Diffusion},\n"
        '  author  = {Dombrowski, Mischa and N{\\"u}tzel, Felix and Kainz, Bernhard},\n'
        "  journal = {arXiv preprint arXiv:2605.17087},\n  year    = {2026}\n}",
    ),
    "edm": (
        "Karras, Aittala, Aila and Laine, *Elucidating the Design Space of Diffusion-Based Generative Models*, "
        "NeurIPS 2022",
        "@inproceedings{karras2022edm,\n  title     = {Elucidating the Design Space of Diffusion-Based Generative "
        "Models},\n  author    = {Karras, Tero and Aittala, Miika and Aila, Timo and Laine, Samuli},\n"
        "  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},\n  year      = {2022}\n}",
    ),
    "edm2": (
        "Karras et al., *Analyzing and Improving the Training Dynamics of Diffusion Models*, CVPR 2024",
        "@inproceedings{karras2024edm2,\n  title     = {Analyzing and Improving the Training Dynamics of "
        "Diffusion Models},\n  author    = {Karras, Tero and Aittala, Miika and Lehtinen, Jaakko and Hellsten, "
        "Janne and Aila, Timo and Laine, Samuli},\n  booktitle = {Proceedings of the IEEE/CVF Conference on "
        "Computer Vision and Pattern Recognition (CVPR)},\n  year      = {2024}\n}",
    ),
    "min_snr": (
        "Hang et al., *Efficient Diffusion Training via Min-SNR Weighting Strategy*, ICCV 2023",
        "@inproceedings{hang2023minsnr,\n  title     = {Efficient Diffusion Training via Min-SNR Weighting "
        "Strategy},\n  author    = {Hang, Tiankai and others},\n  booktitle = {Proceedings of the IEEE/CVF "
        "International Conference on Computer Vision (ICCV)},\n  year      = {2023}\n}",
    ),
    "latent_drift": (
        "Yeganeh et al., *Latent Drifting in Diffusion Models for Counterfactual Medical Image Synthesis*, "
        "CVPR 2025 (Latent Drift, Eq. 4)",
        "@inproceedings{yeganeh2025latentdrift,\n  title     = {Latent Drifting in Diffusion Models for "
        "Counterfactual Medical Image Synthesis},\n  author    = {Yeganeh, Yousef and others},\n  booktitle = "
        "{Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},\n"
        "  year      = {2025}\n}",
    ),
}


def protocol_rows(values: dict | None, cls: type) -> list[tuple[str, Any]]:
    """(option, value) of each setting of `cls` that decides what is trained, read from a record's
    nested dict of it (e.g. estimator.json's train_config); output, display and resource settings
    (`protocol=False`) are left out, as is a setting the record does not hold."""
    rows = []
    for leaf in leaves(cls):
        if not leaf.field.metadata.get("protocol", True):
            continue
        node: Any = values or {}
        for part in leaf.path:
            node = node.get(part, KeyError) if isinstance(node, dict) else KeyError
        if node is not KeyError:
            rows.append((leaf.option, node))
    return rows


def model_kind(folder: str | Path, where: str = "MODEL_DIR") -> str:
    """The command that saved `folder` ("classifier train" or "diffusion train"); anything else is one error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MedlatentInputError(f"{where} {folder}: no such folder; give a saved model's folder")
    command = made_by(folder)
    if command not in KINDS:
        raise MedlatentInputError(
            f"{where} {folder}: not a model saved by `medlatent classifier train` (estimator.json) "
            "or `medlatent diffusion train` (diffusion.json)"
        )
    return command


def model_card(folder: str | Path, repo_id: str | None = None) -> str:
    """The model card (README.md: YAML metadata, then Markdown) of a saved classifier or latent
    diffusion model, from what its folder records; `repo_id` appears in the usage examples."""
    folder = Path(folder)
    command = model_kind(folder)
    name = repo_id or f"OWNER/{folder.resolve().name}"
    context = classifier_context(folder) if command == "classifier train" else diffusion_context(folder)
    return card_template().render(repo=name, kind=KINDS[command], metadata=card_metadata(context), **context)


def card_template():
    """The card's jinja2 template (Markdown: nothing is HTML-escaped; an undefined name is an error)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("medlatent.reports", "templates"),
        autoescape=False,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["shown"] = shown
    return env.get_template(CARD_TEMPLATE)


def card_metadata(context: dict) -> str:
    """The card's YAML metadata block (the Hub reads library_name and tags from it)."""
    import yaml

    tags = ["medlatent", "medical-imaging", "latent-space", *context["tags"]]
    return yaml.safe_dump({"library_name": "medlatent", "tags": tags}, sort_keys=False)


def classifier_context(folder: Path) -> dict:
    """What a classifier's card shows: estimator.json, and training.json where `classifier train` wrote one."""
    from .audits.classifier import TRAINING_RECORD

    advice = "the classifier folder is damaged: train it again (`medlatent classifier train`)"
    meta = read_json_object(folder / RECORDS["classifier train"][0], "classifier record", advice)
    record = (
        read_json_object(folder / TRAINING_RECORD, "training record", advice)
        if (folder / TRAINING_RECORD).is_file()
        else None
    )
    train = meta.get("train_config") or {}
    space = meta.get("space") or ("latent" if meta.get("latent_space") else "image")
    methods = (["learnability_gap"] if space == "latent" else []) + (
        ["edm", "edm2"] if train.get("noise_conditioned") else []
    )
    noise = ["noise-conditioned"] if train.get("noise_conditioned") else []
    tags = ["image-classification", f"{space}-space-classifier", *noise]
    return {
        "space": space,
        "task": meta.get("task"),
        "num_outputs": meta.get("num_outputs"),
        "autoencoder": meta.get("autoencoder"),
        "backbone": train.get("backbone"),
        "noise_conditioned": bool(train.get("noise_conditioned")),
        "record": record,
        "dataset": (record or {}).get("dataset"),
        "data_rows": protocol_rows((record or {}).get("data"), DataConfig),
        "train_rows": classifier_rows(meta, record) + protocol_rows(train, TrainConfig),
        "best_epoch": best_epoch_text((record or {}).get("health") or {}),
        "scores": [(METRIC_NAMES.get(m, m), s) for m, s in (record or {}).get("test", {}).items()],
        "citations": [CITATIONS[m] for m in methods],
        "tags": tags,
        "files": sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != CARD_FILE),
    }


def classifier_rows(meta: dict, record: dict | None) -> list[tuple[str, Any]]:
    """The settings of `classifier train` beside the training protocol's: the space, the autoencoder,
    the start and the teacher, and the latent scale (the last three where the folder records them)."""
    rows = [("space", meta.get("space")), ("autoencoder", (meta.get("autoencoder") or {}).get("spec"))]
    if record:
        rows += [(key.replace("_", "-"), record.get(key)) for key in ("init", "distill_from", "latent_std")]
    return rows


def best_epoch_text(health: dict) -> str:
    """Which epoch's weights were kept, as the card states it (the record counts epochs from 0; -1: none)."""
    best, runs, reason = health.get("best_epoch"), health.get("epochs_run"), health.get("stop_reason")
    if not isinstance(best, int):
        return ""
    kept = f"Kept epoch {best + 1} of {runs}" if best >= 0 else f"No epoch of {runs} beat the starting weights"
    return f"{kept}{f' ({reason})' if reason else ''}."


def diffusion_context(folder: Path) -> dict:
    """What a latent diffusion model's card shows: its diffusion.json."""
    advice = "the model folder is damaged: train it again with `medlatent diffusion train`"
    record = read_json_object(folder / RECORDS["diffusion train"][0], "diffusion model record", advice)
    config = record.get("config") or {}
    methods = ["edm"]
    if (config.get("loop") or {}).get("ema_sigma_rel"):
        methods.append("edm2")
    if config.get("parameterisation") in ("eps", "v"):
        methods.append("min_snr")
    if config.get("drift"):
        methods.append("latent_drift")
    loss = record.get("final_loss")
    finite = isinstance(loss, (int, float)) and math.isfinite(loss)
    return {
        "record": record,
        "loss_flag": None if finite else "the final training loss is not a finite number; train it again",
        "autoencoder": {"spec": record.get("autoencoder"), "content_hash": record.get("autoencoder_hash")},
        "class_names": record.get("class_names", []),
        "dataset": record.get("dataset"),
        "config": config,
        "data_rows": protocol_rows(record.get("data"), DataConfig),
        "train_rows": protocol_rows(config, DiffusionConfig),
        "citations": [CITATIONS[m] for m in methods],
        "tags": ["latent-diffusion", "diffusion", "class-conditional-image-generation"],
        "has_samples": (folder / "samples.png").is_file(),
        "files": sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != CARD_FILE),
    }


def shown(value: Any) -> str:
    """A recorded value as the card shows it: numbers to 3 decimals (n/a when undefined), lists joined."""
    if value is None or value == "":
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(shown, value)) if value else "none"
    return str(value).replace("|", "\\|")  # a table cell's text: a bare | would end the cell


# -- push --------------------------------------------------------------------------------------------


@contextmanager
def staged_upload(folder: Path, card: str):
    """A temporary folder holding links to the model's files and the generated card as README.md:
    what is uploaded. The user's folder is never written (its own README.md, if any, is not uploaded)."""
    with tempfile.TemporaryDirectory(prefix="medlatent-push-") as tmp:
        stage = Path(tmp)
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder)
            if not path.is_file() or relative.as_posix() == CARD_FILE or relative.parts[0].startswith("."):
                continue  # hidden files are marks and partial writes, not the model
            (stage / relative).parent.mkdir(parents=True, exist_ok=True)
            (stage / relative).symlink_to(path.resolve())  # linked, not copied: weights can be large
        (stage / CARD_FILE).write_text(card, encoding="utf-8")
        yield stage


def run_push(config: PushConfig) -> dict:
    """`medlatent push`: the saved model in `config.model` uploaded to the Hub repository
    `config.repo_id` (made when missing; private with `config.private`), on branch
    `config.revision` (made from main when missing), with its generated model card as README.md.
    Returns the repository, its URL, the branch and the files uploaded."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    folder = Path(config.model).expanduser()
    command = model_kind(folder)
    try:
        validate_repo_id(config.repo_id)
    except HFValidationError as err:
        raise MedlatentInputError(f"REPO_ID {config.repo_id}: not a Hub repository name; use OWNER/NAME") from err
    card = model_card(folder, config.repo_id)
    api = HfApi(token=config.token)
    message = config.commit_message or f"Upload medlatent {KINDS[command]}"
    with staged_upload(folder, card) as stage, hub_errors(config.repo_id), progress_bars(config.run.progress):
        url = api.create_repo(config.repo_id, private=config.private, exist_ok=True)
        if config.revision and config.revision != "main":
            api.create_branch(config.repo_id, branch=config.revision, exist_ok=True)
        files = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file())
        api.upload_folder(repo_id=config.repo_id, folder_path=stage, revision=config.revision, commit_message=message)
    return {
        "repo_id": config.repo_id,
        "url": str(url),
        "revision": config.revision or "main",
        "kind": KINDS[command],
        "files": files,
    }


@contextmanager
def hub_errors(repo_id: str):
    """Failures of the Hub while pushing, each as one MedlatentInputError naming REPO_ID with what to do."""
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    where = f"REPO_ID {repo_id}"
    try:
        yield
    except OfflineModeIsEnabled as err:
        raise MedlatentInputError(f"{where}: HF_HUB_OFFLINE is set; unset it to push") from err
    except LocalTokenNotFoundError as err:
        raise MedlatentInputError(f"{where}: not logged in to the Hub; {LOGIN_HELP}, or pass --token") from err
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        if status in (401, 403):
            raise MedlatentInputError(
                f"{where}: the Hub refused the push (HTTP {status}); {LOGIN_HELP} with a token that can "
                "write to this repository, or pass --token"
            ) from err
        first = " ".join(str(err).split())[:200]
        raise MedlatentInputError(f"{where}: the Hub refused the push ({first})") from err
    except MedlatentInputError:
        raise
    except Exception as err:  # noqa: BLE001 - the network or the Hub itself (httpx's errors differ by version)
        first = " ".join(str(err).split())[:200]
        raise MedlatentRuntimeError(
            f"{where}: the push failed ({type(err).__name__}: {first}); check the network and run it again"
        ) from err


@contextmanager
def progress_bars(shown_: bool):
    """huggingface_hub's upload progress bars on or off for the duration, then as they were."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not shown_:
        disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()
