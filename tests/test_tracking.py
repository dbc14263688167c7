"""Experiment tracking through accelerate's trackers: TensorBoard works offline, so its event files are
read back here and the scalars, hyperparameters and images found."""

from __future__ import annotations

import importlib.util

import pytest

import medlatent.api as api
from medlatent.errors import MedlatentInputError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="needs tensorboard")
DATA = {"dataset": "synthetic:n_train=40,n_val=20,n_test=20", "size": 16}


def events(folder):
    """{run folder name: EventAccumulator} of every tracked run under `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = {}
    for path in folder.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(path.parent), size_guidance={"images": 0, "scalars": 0})
        accumulator.Reload()
        found.setdefault(path.parent.relative_to(folder).parts[0], []).append(accumulator)
    return found


def test_a_tracked_classifier_logs_its_steps_and_epochs(tmp_path):
    logs = tmp_path / "logs"
    api.classifier_train(
        tmp_path / "clf",
        space="image",
        epochs=2,
        batch_size=8,
        log_with="tensorboard",
        log_dir=str(logs),
        log_every=1,
        progress=False,
        device="cpu",
        cache_dir=str(tmp_path / "cache"),
        **DATA,
    )
    runs = events(logs)
    assert list(runs) == ["train_image_classifier_-_clf"]
    tags = {tag for accumulator in runs["train_image_classifier_-_clf"] for tag in accumulator.Tags()["scalars"]}
    assert {"loss", "lr", "samples_per_second", "epoch_loss", "val_auroc", "val_balanced_accuracy"} <= tags
    logged = [a for a in runs["train_image_classifier_-_clf"] if "loss" in a.Tags()["scalars"]]
    steps = [e.step for a in logged for e in a.Scalars("loss")]
    assert steps == sorted(steps) and len(steps) == 2 * 5  # 40 images in batches of 8, two epochs


def test_a_tracked_diffusion_run_logs_its_sample_grids(tmp_path):
    logs = tmp_path / "logs"
    api.diffusion_train(
        tmp_path / "ldm",
        "builtin:kl-f4-synthetic",
        steps=2,
        batch_size=8,
        sample_every=1,
        log_with="tensorboard",
        log_dir=str(logs),
        progress=False,
        device="cpu",
        cache_dir=str(tmp_path / "cache"),
        **DATA,
    )
    (run,) = events(logs).values()
    images = {tag for accumulator in run for tag in accumulator.Tags()["images"]}
    assert any(tag.startswith("samples") for tag in images)


def test_a_tracker_whose_package_is_missing_is_one_clear_line(monkeypatch):
    import importlib.util as util

    real = util.find_spec
    monkeypatch.setattr(util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(MedlatentInputError, match="--log-with wandb: its package is not installed; pip install wandb"):
        api.load_config(None, {"log_with": "wandb"})
    with pytest.raises(MedlatentInputError, match="--log-with neptune: use one of tensorboard, wandb"):
        api.load_config(None, {"log_with": "neptune"})
