"""The Hugging Face Hub, offline: the model card of a saved classifier and of a latent diffusion
model, loading `hf-hub:OWNER/NAME` from a snapshot laid out as the Hub cache lays it out, `push`
against huggingface_hub's HfApi methods replaced, and the one error of a spec that cannot be
resolved."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from medlatent import api
from medlatent.errors import MedlatentInputError
from medlatent.hub import model_card

DATASET = "synthetic:n_train=40,n_val=20,n_test=20"
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # a snapshot's folder is named by its 40-hex commit


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> SimpleNamespace:
    """A tiny image classifier and a tiny latent diffusion model, trained once for the module."""
    root = tmp_path_factory.mktemp("hub-models")
    with pytest.MonkeyPatch.context() as patch:  # the autouse home fixture is per test: this one trains once
        patch.setenv("MEDLATENT_HOME", str(root / "home"))
        result = api.classifier_train(
            root / "clf",
            space="image",
            dataset=DATASET,
            size=16,
            epochs=1,
            progress=False,
            device="cpu",
            cache_dir=root / "cache",
        )
        ldm = api.diffusion_train(
            root / "ldm",
            "builtin:kl-f4-synthetic",
            dataset=DATASET,
            size=16,
            steps=2,
            batch_size=8,
            progress=False,
            device="cpu",
            cache_dir=root / "cache",
        )
    return SimpleNamespace(classifier=root / "clf", classifier_result=result, diffusion=Path(ldm))


def metadata(card: str) -> dict:
    """The card's YAML metadata block."""
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def fingerprint(folder: Path) -> dict:
    """Every file under `folder` by its bytes and modification time."""
    return {
        p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


def test_a_classifier_card_states_its_data_split_scores_health_and_limits(trained):
    record = json.loads((trained.classifier / "training.json").read_text())
    card = model_card(trained.classifier, "owner/clf")

    meta = metadata(card)
    assert meta["library_name"] == "medlatent"
    assert {"medical-imaging", "latent-space", "image-classification"} <= set(meta["tags"])
    assert "binary classification of normal, nodule" in card
    assert "None: this classifier reads images directly" in card  # an image-space model has no autoencoder
    assert "| synthetic | binary | normal, nodule |" in card
    assert "Split: **official** (seed 0): 40 training, 20 validation and 20 held-out test images" in card
    assert f"| `--dataset` | {DATASET} |" in card and "| `--epochs` | 1 |" in card and "| `--space` | image |" in card
    # the held-out scores, as `classifier train` returned them, with the intervals it recorded
    for key, name in (("auroc", "AUROC"), ("balanced_accuracy", "Balanced accuracy"), ("mcc", "MCC")):
        entry = record["test"][key]
        assert entry["value"] == pytest.approx(trained.classifier_result["test"][key])
        low, high = entry["ci95"]
        assert low <= entry["value"] <= high
        assert f"| {name} | {entry['value']:.3f} | [{low:.3f}, {high:.3f}] |" in card
    assert record["interval"] == {"method": "bootstrap", "resamples": 1000, "level": 0.95}
    flags = record["health"]["flags"]
    assert (f"**flagged**: {'; '.join(flags)}" if flags else "Training health: no flags") in card
    assert "not a medical device" in card and "validate it on your local data" in card
    assert 'DeepClassifier.from_pretrained("hf-hub:owner/clf")' in card
    assert "- `training.json`" in card and "- `README.md`: this card" in card


def test_a_classifier_saved_without_its_training_record_has_a_card_that_says_so(trained, tmp_path):
    folder = tmp_path / "older"
    shutil.copytree(trained.classifier, folder)
    (folder / "training.json").unlink()
    card = model_card(folder)
    assert "does not record the dataset or the split" in card
    assert "records no held-out metrics and no training-health flags" in card
    assert "| `--backbone` | resnet10t |" in card  # what estimator.json records is still stated
    assert "hf-hub:OWNER/older" in card


def test_a_latent_diffusion_card_states_its_autoencoder_split_config_and_citations(trained):
    record = json.loads((trained.diffusion / "diffusion.json").read_text())
    card = model_card(trained.diffusion, "owner/ldm")

    assert {"latent-diffusion", "medical-imaging", "latent-space"} <= set(metadata(card)["tags"])
    assert f"| `builtin:kl-f4-synthetic` | `{record['autoencoder_hash']}` |" in card
    assert "Split: **official**: 40 training, 20 validation and 20 held-out test images" in card
    assert "| `--steps` | 2 |" in card and "| `--parameterisation` | edm |" in card
    assert "| `--ema-sigma-rel` | 0.050 |" in card
    assert "records no held-out metrics" in card and "medlatent diffusion evaluate --model hf-hub:owner/ldm" in card
    assert "*Elucidating the Design Space of Diffusion-Based Generative Models*, NeurIPS 2022" in card
    assert "@inproceedings{karras2022edm" in card
    assert "Training Dynamics of Diffusion Models" in card  # its EMA is EDM2's power-function EMA
    assert "Latent Drifting" not in card and "Min-SNR" not in card  # trained with neither
    assert "inherits the biases and the losses of its autoencoder" in card
    assert "![A sample grid" in card


def hub_snapshot(cache: Path, repo_id: str, folder: Path) -> Path:
    """`folder` laid out in the Hub cache `cache` as a download of `repo_id` at main leaves it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hub cache of this test's own, offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads both when imported: set where it reads them at the call too
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_a_classifier_and_a_diffusion_model_load_from_a_hub_cache_snapshot(trained, hub_cache):
    from medlatent.classifiers import DeepClassifier
    from medlatent.pipelines import LatentDiffusion

    hub_snapshot(hub_cache, "owner/clf", trained.classifier)
    local = DeepClassifier.from_pretrained(trained.classifier, device="cpu")
    x = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    for spec in ("hf-hub:owner/clf", f"hf-hub:owner/clf@{COMMIT}", "hf-hub:owner/clf@main"):
        remote = DeepClassifier.from_pretrained(spec, device="cpu")
        assert remote.space == local.space and remote.task_ == local.task_
        np.testing.assert_array_equal(remote.predict_proba(x), local.predict_proba(x))
        np.testing.assert_array_equal(remote.predict(x), local.predict(x))

    hub_snapshot(hub_cache, "owner/ldm", trained.diffusion)
    remote, local = LatentDiffusion("hf-hub:owner/ldm", device="cpu"), LatentDiffusion(trained.diffusion, device="cpu")
    assert remote.class_names == local.class_names
    assert remote.folder.parent.name == "snapshots"
    for key, value in local.denoiser.state_dict().items():
        assert torch.equal(remote.denoiser.state_dict()[key], value)


def test_a_repository_missing_offline_is_one_error_naming_the_option_and_what_to_do(hub_cache, run_cli, capsys):
    from medlatent.classifiers import DeepClassifier
    from medlatent.pipelines import LatentDiffusion

    with pytest.raises(MedlatentInputError) as caught:
        DeepClassifier.from_pretrained("hf-hub:owner/missing", device="cpu", option="--init")
    message = str(caught.value)
    assert message.startswith("--init hf-hub:owner/missing: not in the local Hub cache")
    assert "HF_HUB_OFFLINE is set" in message and "hf download owner/missing" in message
    with pytest.raises(MedlatentInputError, match=r"--model hf-hub:owner/missing@v2: .*--revision v2"):
        LatentDiffusion("hf-hub:owner/missing@v2", device="cpu")
    for bad in ("hf-hub:missing", "hf-hub:owner/name@", "hf-hub:owner/a/b"):
        with pytest.raises(MedlatentInputError, match=f"--init {bad}: not a Hub model name; use hf-hub:OWNER/NAME"):
            DeepClassifier.from_pretrained(bad, option="--init")

    assert run_cli("classifier", "eval", "hf-hub:owner/missing", "--device", "cpu") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medlatent: error: MODEL hf-hub:owner/missing: not in the local Hub")


@pytest.fixture
def hub_calls(monkeypatch) -> list:
    """huggingface_hub's HfApi with its network methods replaced by recorders: the calls, in order,
    with what each uploaded folder held at the call (it is temporary)."""
    from huggingface_hub import HfApi

    calls: list = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs, self.token))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        files = {p.relative_to(folder_path).as_posix(): p.read_bytes() for p in Path(folder_path).rglob("*")}
        calls.append(("upload_folder", repo_id, kwargs, files))
        return f"https://huggingface.co/{repo_id}/commit/{COMMIT}"

    for method in (create_repo, create_branch, upload_folder):
        monkeypatch.setattr(HfApi, method.__name__, method)
    return calls


def test_push_uploads_the_folder_with_its_card_and_leaves_the_folder_as_it_was(trained, hub_calls):
    folder = trained.classifier
    before = fingerprint(folder)
    result = api.push(folder, "owner/clf", private=True, revision="v1", token="hf_test", progress=False)

    assert fingerprint(folder) == before  # the card went into the upload, not into the folder
    create, branch, upload = hub_calls
    assert create == ("create_repo", "owner/clf", {"private": True, "exist_ok": True}, "hf_test")
    assert branch == ("create_branch", "owner/clf", {"branch": "v1", "exist_ok": True})
    assert upload[:2] == ("upload_folder", "owner/clf") and upload[2]["revision"] == "v1"
    uploaded = upload[3]
    model_files = {p.name for p in folder.iterdir()} - {"README.md"}  # the folder's own README.md is replaced
    assert set(uploaded) == model_files | {"README.md"}
    assert {"estimator.json", "model.safetensors", "config.json", "input_scaler.safetensors"} <= set(uploaded)
    for name in model_files:
        assert uploaded[name] == (folder / name).read_bytes()
    assert uploaded["README.md"].decode() == model_card(folder, "owner/clf")
    assert result == {
        "repo_id": "owner/clf",
        "url": "https://huggingface.co/owner/clf",
        "revision": "v1",
        "kind": "classifier",
        "files": sorted(uploaded),
    }


def test_push_from_the_command_line_to_main(trained, hub_calls, run_cli, capsys):
    assert run_cli("push", str(trained.diffusion), "owner/ldm") == 0
    assert [call[0] for call in hub_calls] == ["create_repo", "upload_folder"]  # main exists: no branch made
    uploaded = hub_calls[-1][3]
    assert {"diffusion.json", "model.safetensors", "latent_normalisation.safetensors", "README.md"} <= set(uploaded)
    assert "latent diffusion model" in capsys.readouterr().out


def test_push_refuses_what_is_no_saved_model_or_no_repo_before_any_upload(trained, tmp_path, hub_calls):
    with pytest.raises(MedlatentInputError, match="MODEL_DIR .*: not a model saved by `medlatent classifier train`"):
        api.push(tmp_path, "owner/x")
    with pytest.raises(MedlatentInputError, match="MODEL_DIR .*: no such folder"):
        api.push(tmp_path / "nothing", "owner/x")
    with pytest.raises(MedlatentInputError, match="REPO_ID owner/a b: not a Hub repository name"):
        api.push(trained.classifier, "owner/a b")
    with pytest.raises(MedlatentInputError, match="required"):
        api.push(trained.classifier)
    assert hub_calls == []


def test_push_turns_the_hubs_refusals_into_one_line_of_advice(trained, monkeypatch):
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the real HfApi, which refuses offline
    with pytest.raises(MedlatentInputError, match="REPO_ID owner/clf: HF_HUB_OFFLINE is set; unset it to push"):
        api.push(trained.classifier, "owner/clf", progress=False)

    def unauthorised(self, repo_id, **kwargs):
        raise HfHubHTTPError("401 Unauthorized", response=SimpleNamespace(status_code=401, headers={}, request=None))

    monkeypatch.setattr(HfApi, "create_repo", unauthorised)
    with pytest.raises(MedlatentInputError, match=r"refused the push \(HTTP 401\); log in with `hf auth login`"):
        api.push(trained.classifier, "owner/clf", progress=False)
