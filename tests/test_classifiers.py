from __future__ import annotations

import numpy as np
import pytest
import torch

from medlatent.classifiers import ClassificationLoss, DeepClassifier, LinearProbe, TrainConfig, create_backbone
from medlatent.errors import MedlatentInputError
from medlatent.training.losses import class_balanced_weights


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_latent_stem_keeps_small_inputs(name):
    model = create_backbone(name, in_chans=32, num_classes=3, latent_stem=True).eval()
    features = model.forward_features(torch.randn(2, 32, 8, 8))
    assert features.shape[-1] >= 1 and model(torch.randn(2, 32, 8, 8)).shape == (2, 3)
    standard = create_backbone(name, in_chans=32, num_classes=3).eval()
    # The latent stem keeps 4x (resnet: conv stride 2 + max-pool) or 4x (convnext patchify) more resolution.
    assert (
        model.forward_features(torch.randn(1, 32, 32, 32)).shape[-1]
        == 4 * standard.forward_features(torch.randn(1, 32, 32, 32)).shape[-1]
    )


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(MedlatentInputError, match="is not a timm model"):
        create_backbone("resnet_does_not_exist", 3, 2)


def test_class_balanced_weights_follow_cui():
    counts = np.array([100, 10])
    w = class_balanced_weights(counts, 0.99).numpy()
    raw = (1 - 0.99) / (1 - 0.99**counts)
    assert w == pytest.approx(raw / raw.sum() * 2, rel=1e-5)
    assert w[1] > w[0]


def test_ldam_margins_and_deferred_reweighting():
    loss = ClassificationLoss("ldam", "binary", np.array([90, 10]), epochs=10)
    assert loss.margins[1] == pytest.approx(0.5) and loss.margins[0] == pytest.approx(
        0.5 * (10 / 90) ** 0.25, rel=1e-5
    )
    logits, target = torch.zeros(4, 2), torch.tensor([0, 1, 1, 1])
    before = loss(logits, target)
    loss.set_epoch(5)
    after = loss(logits, target)
    assert not torch.isclose(before, after)  # re-weighting switched on at epochs // 2
    with pytest.raises(MedlatentInputError, match="single-label"):
        ClassificationLoss("ldam", "multilabel", np.array([3, 4]), epochs=2)


def _toy(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 4, 8, 8, generator=g) * 0.5
    x[:, 0] += y[:, None, None] * 1.5
    return x, y.numpy()


@pytest.mark.parametrize("loss", ["ce", "cb", "ldam"])
def test_deep_classifier_learns_a_separable_problem(loss):
    x, y = _toy()
    xv, yv = _toy(48, seed=1)
    clf = DeepClassifier(
        TrainConfig("resnet10t", loss=loss, epochs=4, batch_size=16, lr=3e-3, patience=4),
        latent_space=True,
        device="cpu",
        progress=False,
    )
    clf.fit(x, y, xv, yv, "binary")
    assert clf.score(xv, yv) > 0.9
    assert clf.predict(xv).shape == (48,) and clf.predict_proba(xv).sum(1) == pytest.approx(np.ones(48), abs=1e-5)


def test_linear_probe_multilabel_and_binary():
    x, y = _toy()
    probe = LinearProbe(C=1.0).fit(x, y, "binary")
    assert probe.score(x, y) > 0.95
    ym = np.stack([y, 1 - y], 1)
    multi = LinearProbe(C=1.0).fit(x, ym, "multilabel")
    assert multi.predict_proba(x).shape == (96, 2) and multi.score(x, ym) > 0.95


def test_saved_classifier_records_its_space(tmp_path):
    from medlatent.classifiers import DeepClassifier, TrainConfig

    x, y = torch.rand(16, 3, 16, 16), np.repeat([0, 1], 8)
    clf = DeepClassifier(
        TrainConfig("resnet10t", epochs=1, batch_size=8), device="cpu", progress=False, space="reconstruction"
    )
    clf.fit(x, y, x, y, "binary", num_outputs=2)
    loaded = DeepClassifier.from_pretrained(clf.save_pretrained(tmp_path / "m"), device="cpu")
    assert loaded.space == "reconstruction" and not loaded.latent_space and loaded.num_outputs_ == 2


def test_warm_start_keeps_the_starting_weights_when_training_does_not_beat_them():
    from medlatent.classifiers import DeepClassifier, TrainConfig

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 16)
    x = torch.from_numpy(rng.normal(0, 1, (32, 3, 16, 16)).astype(np.float32))
    x[:, 0] += torch.from_numpy(y[:, None, None] * 2.0).float()  # an easy signal
    good = DeepClassifier(TrainConfig("resnet10t", epochs=4, batch_size=8, lr=3e-3), device="cpu", progress=False).fit(
        x, y, x, y, "binary"
    )
    # lr ~ 0: no epoch can beat the start, so the start is returned unchanged
    clf = DeepClassifier(TrainConfig("resnet10t", epochs=2, batch_size=8, lr=1e-12), device="cpu", progress=False)
    clf.fit(x, y, x, y, "binary", init=good.model_.state_dict())
    from medlatent.classifiers.trainer import _selection_key
    from medlatent.evaluation.metrics import score

    # Whatever training did (batch-norm statistics still move), the result ranks at least as high on
    # validation as the start, and a best epoch of -1 means the start itself.
    assert _selection_key(score("binary", y, clf.predict_proba(x))) >= _selection_key(
        score("binary", y, good.predict_proba(x))
    )
    if clf.best_epoch_ == -1:
        assert all(
            torch.equal(a, b)
            for a, b in zip(clf.model_.state_dict().values(), good.model_.state_dict().values(), strict=False)
        )
