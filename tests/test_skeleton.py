"""The skeleton every command shares: its run settings (one nested `RunConfig`, each command taking
the settings it names), the settings a workflow sets itself (field roles), one way to fit a
classifier of a space (its scaler owned by the estimator) and one way to resume a stored part."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medlatent.api import load_config
from medlatent.audits.config import AugmentConfig, CounterfactualConfig, EncoderAuditConfig, GapConfig
from medlatent.config import RunConfig, ScoreConfig, TrainConfig, leaves
from medlatent.errors import MedlatentInputError


def options(cls) -> set[str]:
    return {leaf.option for leaf in leaves(cls)}


def test_each_command_takes_the_run_settings_it_names_with_its_own_defaults():
    run = {leaf.option for leaf in leaves(RunConfig)}
    assert run == {"out", "overwrite", "device", "progress", "seed", "bootstrap", "interval", "latent-std", "json"}
    assert run - options(GapConfig) == {"overwrite", "json"}
    assert run - options(EncoderAuditConfig) == {"overwrite", "interval", "json"}
    assert run - options(CounterfactualConfig) == {"overwrite", "bootstrap", "interval", "latent-std", "json"}
    assert GapConfig().run.out == "runs/gap" and AugmentConfig().run.seeds == [0, 1, 2]
    assert EncoderAuditConfig().run.bootstrap == 200 and GapConfig().run.bootstrap == 1000
    with pytest.raises(MedlatentInputError, match="unknown key interval"):
        load_config(None, {"interval": "t"}, EncoderAuditConfig)


def test_a_command_of_one_seed_refuses_several_and_a_required_output_is_named():
    with pytest.raises(MedlatentInputError, match="takes one seed"):
        load_config(None, {"seed": [0, 1]}, EncoderAuditConfig)
    with pytest.raises(MedlatentInputError, match="--out: required"):
        load_config(None, {"classifier": "c", "latents": "z"}, ScoreConfig)
    assert load_config(None, {"seed": [0, 1]}).run.seeds == [0, 1]


def test_the_settings_an_audit_sets_itself_are_no_options_of_it():
    train = {leaf.option for leaf in leaves(TrainConfig)}
    per_run = {"seed", "noise-conditioned", "freeze-backbone", "sigma-data"}
    variants = {"sigma-steps", "clean-fraction", "distill-alpha", "distill-loss", "temperature"}
    of_train = lambda cls: {leaf.option for leaf in leaves(cls) if leaf.path[0] == "train"}  # noqa: E731
    assert train - of_train(GapConfig) == per_run
    assert train - of_train(AugmentConfig) == per_run | variants
    assert train - of_train(EncoderAuditConfig) == per_run | variants


@pytest.mark.parametrize("model", ["linear", "deep"])
def test_a_space_classifier_owns_its_scaler(model):
    from medlatent.classifiers.space import fit_space_classifier, predict_raw

    g = torch.Generator().manual_seed(0)
    y = np.arange(40) % 2
    x = torch.randn(40, 4, 4, 4, generator=g) * 3 + 5 + torch.from_numpy(y).float().view(-1, 1, 1, 1)
    config = TrainConfig(backbone="mlp", epochs=1, batch_size=8)
    clf = fit_space_classifier(
        "latent", (x[:30], y[:30]), (x[30:], y[30:]), "binary", config, latent_std=0.5, num_outputs=2, model=model
    )
    scaled = clf.input_scaler.transform(x[30:])
    assert clf.input_scaler.target_std == 0.5 and abs(float(clf.input_scaler.transform(x[:30]).std()) - 0.5) < 0.05
    assert np.array_equal(predict_raw(clf, x[30:]), clf.predict_proba(scaled))


def test_a_stored_part_is_read_back_and_a_stale_one_computed_again(tmp_path):
    from medlatent.rundir import stored_or_computed

    calls = []

    def compute():
        calls.append(1)
        return {"probs": np.arange(3.0), "test_indices": np.array([1, 2])}

    path = tmp_path / "part.npz"
    first, stored = stored_or_computed(path, compute)
    again, stored_again = stored_or_computed(path, compute, lambda s: np.array_equal(s["test_indices"], [1, 2]))
    assert not stored and stored_again and len(calls) == 1 and np.array_equal(again["probs"], first["probs"])
    _, stale = stored_or_computed(path, compute, lambda s: np.array_equal(s["test_indices"], [3]))
    assert not stale and len(calls) == 2
