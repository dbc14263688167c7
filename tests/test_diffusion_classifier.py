"""The diffusion classifier: shared draws, decisions, early stopping."""

import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

from medlatent.diffusion.classify import (
    SIGMA_CANDIDATES,
    classify,
    decided,
    default_budget,
    draw_errors,
    error_probabilities,
    fit_temperature,
    replay_early_stop,
    vote_probabilities,
)


class _Spy(torch.nn.Module):
    """Records its inputs; denoises every class to the point A = +0.5 for class 0 and B = -0.5 for class 1."""

    num_classes, sigma_data, parameterisation, multilabel = 2, 0.5, "edm", False

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward(self, x, sigma, labels):
        self.calls.append((x.clone(), sigma.clone(), labels.clone()))
        return torch.where(labels.view(-1, 1, 1, 1) == 0, 0.5, -0.5).expand_as(x).clone()


def test_every_class_of_a_draw_sees_the_same_noise_level_and_noise():
    spy = _Spy()
    x = torch.randn(3, 2, 4, 4)
    draw_errors(spy, x, [torch.Generator().manual_seed(i) for i in range(3)])
    noised, sigma, labels = spy.calls[0]
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(noised[:3], noised[3:]) and torch.equal(sigma[:3], sigma[3:])


def test_a_drift_trained_model_is_noised_with_its_drift():
    x = torch.zeros(2, 2, 4, 4)
    generators = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    plain, drifted = _Spy(), _Spy()
    draw_errors(plain, x, generators())
    draw_errors(drifted, x, generators(), drift=0.1)
    (a, sigma, _), (b, _, _) = plain.calls[0], drifted.calls[0]
    assert torch.allclose(
        b - a, 0.1 * sigma.view(-1, 1, 1, 1).expand_as(a)
    )  # x + sigma (eps + delta): the same eps, shifted by sigma delta


def test_a_denoiser_exact_for_class_0_classifies_class_0_data_perfectly():
    x = torch.full((20, 2, 4, 4), 0.5)  # the class-0 point: class 0 denoises it exactly, class 1 does not
    result = classify(_Spy(), x, draws=7, stop="none")
    assert (result["mean_errors"].argmin(1) == 0).all() and (result["votes"].argmax(1) == 0).all()
    assert result["draw_errors"].shape == (20, 7, 2) and result["evaluations_per_image"] == 14


def test_early_stopping_returns_the_full_votes_class_and_replays_exactly():
    rng = np.random.default_rng(0)
    errors = rng.normal(size=(300, 51, 3)) + np.array([0.0, 0.3, 0.6]) * rng.uniform(0, 1, size=(300, 1, 1))
    full = np.zeros((300, 3))
    np.add.at(full, (np.arange(300)[:, None], errors.argmin(2)), 1)
    votes, used, _ = replay_early_stop(errors)
    assert (votes.argmax(1) == full.argmax(1)).all()  # once decided, the leader cannot be overtaken
    assert used.mean() < 51 and (votes.sum(1) == used).all()
    for rule in ("sequential", "paired"):
        _, capped, _ = replay_early_stop(errors, rule, max_draws=7)
        assert capped.max() == 7 and capped.min() >= 5  # a budget of 7 draws, after the minimum of 5
    assert (default_budget(51, 5), default_budget(51, 3), default_budget(20, 5), default_budget(5, 5)) == (
        10,
        10,
        5,
        5,
    )  # a fifth, at least the minimum
    assert not decided(torch.tensor([[10.0, 5.0]]), 5) and decided(torch.tensor([[10.0, 4.0]]), 5)


def test_vote_ties_are_broken_by_the_paired_evidence_without_reordering_distinct_shares():
    errors = np.ones((4, 3, 2))
    errors[0, :, 1] = [0.5, 2.0, 2.0]  # 1 vote of 3 for class 1, by a wide margin; 2 for class 0, narrowly
    errors[0, :, 0] = [1.0, 1.9, 1.9]
    errors[1, :, 1] = [0.99, 2.0, 2.0]  # the same votes, class 1's one win narrow
    errors[1, :, 0] = [1.0, 1.0, 1.0]
    errors[2, :, 1] = [0.5, 0.5, 3.0]  # 2 of 3 for class 1
    errors[3, :2, 1] = [0.5, 0.6]  # 2 of 2 draws used, both for class 1
    votes, used = np.array([[2, 1], [2, 1], [1, 2], [0, 2]]), np.array([3, 3, 3, 2])
    p = vote_probabilities(votes, used, errors)
    assert np.allclose(p.sum(1), 1) and p[0, 1] > p[1, 1]  # the same shares, ordered by the evidence
    assert p[1, 1] < p[2, 1] < p[3, 1] and np.abs(p - votes / used[:, None]).max() < 1 / (
        2 * 3**2
    )  # distinct shares keep their order
    tie = vote_probabilities(np.array([[1, 1]]), np.array([2]), np.array([[[1.0, 0.5], [1.0, 1.2]]]))
    assert tie.argmax(1)[0] == 1  # one win each; class 1 won by more


def test_early_stopped_classification_uses_the_first_draws_of_the_full_run():
    torch.manual_seed(0)
    x = torch.randn(16, 2, 4, 4) * 0.5
    spy = _Spy()
    full = classify(spy, x, draws=11, stop="none", batch_size=5)
    for rule in ("decided", "sequential", "paired"):
        early = classify(
            _Spy(), x, draws=11, stop=rule, batch_size=7, min_draws=3
        )  # other batches: the same draws per image
        votes, used, mean_used = replay_early_stop(full["draw_errors"], rule, min_draws=3)
        assert np.array_equal(early["draws_used"], used) and np.array_equal(early["votes"], votes)
        assert np.allclose(early["mean_errors"], mean_used)
        assert early["evaluations_per_image"] <= full["evaluations_per_image"]


def test_the_sequential_test_stops_clear_cases_after_the_minimum_and_waits_on_close_ones():
    from medlatent.diffusion.classify import should_stop

    votes = torch.tensor([[7.0, 0.0], [4.0, 3.0], [5.0, 0.0]])
    stop = should_stop(votes, draws_left=40, rule="sequential", alpha=0.01, min_draws=5)
    assert stop.tolist() == [True, False, False]  # 7-0: p = 0.0078; 4-3: far from decided; 5-0: p = 0.031


def test_temperature_fit_and_probabilities():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    errors = rng.normal(1.0, 0.1, size=(400, 2))
    errors[np.arange(400), labels] -= 0.2  # the true class denoises better
    t, nll = fit_temperature(errors, labels)
    p = error_probabilities(errors, t)
    assert np.allclose(p.sum(1), 1) and (p.argmax(1) == errors.argmin(1)).all() and 0 < t < np.inf


def test_the_command_on_a_tiny_model(tmp_path):
    import medlatent.api as api
    from medlatent.errors import MedlatentInputError

    data = dict(dataset="synthetic:n_train=24,n_val=8,n_test=12", size=16, cache_dir=str(tmp_path / "cache"))
    model = api.diffusion_train(
        tmp_path / "ldm", "builtin:kl-f4-synthetic", progress=False, steps=3, batch_size=8, **data
    )
    api.classifier_train(
        tmp_path / "latent-clf",
        space="latent",
        autoencoder="builtin:kl-f4-synthetic",
        progress=False,
        epochs=1,
        backbone="resnet10t",
        device="cpu",
        **data,
    )
    r = api.diffusion_classify(
        model=model,
        out=tmp_path / "dc",
        draws=5,
        device="cpu",
        progress=False,
        prune="2:1",
        classifiers=[tmp_path / "latent-clf"],
        explain=2,
        explain_draws=2,
    )
    expected = {
        "mean error",
        "vote (5 draws)",
        "vote, stopped when decided",
        "vote, sequential test (alpha 0.01)",
        "mean error, paired sequential test (alpha 0.01)",
        "mean error, pruned (2:1)",
        "latent classifier latent-clf",
    }
    assert set(r["classifiers"]) == expected and r["test_images"] == 12
    assert (
        r["classifiers"]["mean error, pruned (2:1)"]["evaluations_per_image"] == 4
        and r["classifiers"]["latent classifier latent-clf"]["kind"] == "discriminative"
    )
    assert (
        "mean error - latent classifier latent-clf" in r["difference_to_discriminative"]
        and "latent classifier latent-clf: max softmax" in r["uncertainty"]
    )
    assert r["early_stopping"]["vote, stopped when decided"]["same_class_as_full_vote"] == 1.0
    e = r["explanations"]
    assert e["images"] == 4 and all((tmp_path / "dc" / f).is_file() for f in e["files"])
    assert (
        set(e["peak_on_lesion"]) == {"class_difference", "counterfactual_difference"}
        and e["peak_on_lesion"]["class_difference"]["of"] == 2
    )  # the two nodule images
    assert (tmp_path / "dc" / "results.json").is_file() and "Explanations" in (
        tmp_path / "dc" / "report.html"
    ).read_text()
    plain = api.diffusion_classify(
        model=model,
        out=tmp_path / "plain",
        draws=3,
        min_draws=2,
        max_draws=2,
        explain=0,
        device="cpu",
        progress=False,
        tolerance=0.05,
    )  # no maps, no classifiers; an early stop chosen for a tolerance
    assert "explanations" not in plain and (tmp_path / "plain" / "report.html").is_file()
    t = plain["tolerance"]
    assert t["name"] in plain["classifiers"] and t["name"] in plain["early_stopping"]
    assert (
        len(t["folds"]) == 2
        and all(f["loss_upper"] <= 0.05 or f["stop"] == "full vote" for f in t["folds"])
        and 0 < t["evaluation_share"] <= 1
    )
    assert t["held"] == (t["test_loss"]["value"] <= 0.05)
    limit = t["in_sample_limit"]  # its figures are tested in test_stopping; here, that the command reports it
    assert limit["share"] == 0.1 and limit["cheapest_within_tolerance"]["loss"] <= 0.05
    assert {"run", "-3,0.6", "2.4,0.6"} <= set(t["folds"][0]["probe"])  # the stop's noise-level candidates drawn
    auto = api.diffusion_classify(
        model=model, out=tmp_path / "auto", draws=3, min_draws=2, sigma="auto", explain=0, device="cpu", progress=False
    )
    assert (
        auto["max_draws"] == 2
        and "stop an image after 2 of the 3 draws at most (the budget"
        in (tmp_path / "auto" / "report.html").read_text()
        and sum("at most 2 draws" in name for name in auto["early_stopping"]) == 2
        and all(e["evaluation_share"] <= 2 / 3 for name, e in auto["early_stopping"].items() if "at most" in name)
    )  # the default budget: a fifth of the draws, at least --min-draws
    assert (
        auto["sigma"]["given"] == "auto"
        and sum(u["images"] for u in auto["sigma"]["used"]) == 12
        and "chosen for each fold" in (tmp_path / "auto" / "report.html").read_text()
    )
    with pytest.raises(MedlatentInputError, match="--sigma"):
        api.diffusion_classify(
            model=model, out=tmp_path / "bad", draws=3, min_draws=2, sigma="wide", device="cpu", progress=False
        )
    with pytest.raises(MedlatentInputError, match="--draws 0"):
        api.diffusion_classify(model=model, out=tmp_path / "bad", draws=0, device="cpu", progress=False)
    with pytest.raises(MedlatentInputError, match="--prune"):
        api.diffusion_classify(model=model, out=tmp_path / "bad", draws=5, device="cpu", progress=False, prune="2:2")
    with pytest.raises(MedlatentInputError, match="--classifier"):
        api.diffusion_classify(
            model=model,
            out=tmp_path / "bad",
            draws=5,
            device="cpu",
            progress=False,
            classifiers=[tmp_path / "nothing"],
        )
    bench = runpy.run_path(
        str(Path(__file__).resolve().parents[1] / "benchmarks" / "early_stop.py")
    )  # the seeds benchmark, on the same model
    bench["main"](
        ["--model", str(model), "--draws", "10", "--seed", "0", "--seed", "1", "--json", str(tmp_path / "seeds.json")]
        + ["--candidates=0.5,0.6", "--candidate-draws", "6", "--keep-draws", str(tmp_path / "draws")]
    )
    seeds = json.loads((tmp_path / "seeds.json").read_text())
    assert [r["seed"] for r in seeds["seeds"]] == [0, 1] and seeds["tolerance"] == 0.01
    for r in seeds["seeds"]:
        assert r["rules"]["paired, at most 5 draws"]["evaluation_share"] <= 0.5
        assert {"chosen for 0.01, own distribution", "chosen for 0.01, noise levels that rank best"} <= set(r["rules"])
        assert all(0 < rule["evaluation_share"] <= 1 for rule in r["rules"].values())
    assert sorted(p.name for p in (tmp_path / "draws").iterdir()) == ["draws-seed0.npz", "draws-seed1.npz"]
    assert all(r["in_sample_limit"]["cheapest_within_tolerance"]["loss"] <= 0.01 for r in seeds["seeds"])
    # against the full vote of --sigma auto: its distributions drawn in full and added to the kept draws
    bench["main"](
        ["--model", str(model), "--draws", "10", "--seed", "0", "--sigma", "auto"]
        + ["--json", str(tmp_path / "auto.json"), "--candidates=0.5,0.6", "--candidate-draws", "6"]
        + ["--keep-draws", str(tmp_path / "draws")]
    )
    kept = np.load(tmp_path / "draws" / "draws-seed0.npz")
    assert sum(k.startswith("run/") for k in kept.files) == 1 + len(SIGMA_CANDIDATES)
    assert all(kept[k].shape[1] == 10 for k in kept.files if k.startswith("run/"))
    assert json.loads((tmp_path / "auto.json").read_text())["sigma"] == "auto"
    again = tmp_path / "again.json"  # replayed from the kept draws
    bench["main"](
        ["--model", str(model), "--draws", "10", "--seed", "0", "--seed", "1", "--json", str(again)]
        + ["--candidates=0.5,0.6", "--candidate-draws", "6", "--keep-draws", str(tmp_path / "draws")]
    )
    assert json.loads(again.read_text())["seeds"] == seeds["seeds"]
    stored = dict(np.load(tmp_path / "draws" / "draws-seed0.npz"))
    bench["main"](  # one more candidate: only it is drawn, the stored draws are kept
        ["--model", str(model), "--draws", "10", "--seed", "0", "--candidates=0.5,0.6", "--candidates=-1,0.6"]
        + ["--candidate-draws", "6", "--keep-draws", str(tmp_path / "draws")]
    )
    grown = dict(np.load(tmp_path / "draws" / "draws-seed0.npz"))
    assert set(grown) == set(stored) | {"candidate/-1,0.6"} and grown["candidate/-1,0.6"].shape[1] == 6
    assert all(np.array_equal(grown[k], v) for k, v in stored.items())


def test_risk_coverage_is_monotone_for_a_confidence_that_ranks_mistakes_last():
    from medlatent.evaluation.uncertainty import error_gap, risk_coverage, vote_uncertainty

    rng = np.random.default_rng(0)
    correct = rng.random(200) < 0.8
    perfect = risk_coverage(correct, correct + 0.01 * rng.random(200))  # every mistake ranked last
    assert np.all(np.diff(perfect["risk"]) >= -1e-12) and perfect["risk"][-1] == pytest.approx(1 - correct.mean())
    shuffled = risk_coverage(correct, rng.random(200))
    assert (
        perfect["aurc"] < shuffled["aurc"] and shuffled["risk"][-1] == perfect["risk"][-1]
    )  # same error rate at full coverage
    u = vote_uncertainty(np.array([[51, 0], [26, 25]]))
    assert (
        u["vote_margin"].tolist() == pytest.approx([1.0, 1 / 51])
        and u["vote_entropy"][0] == 0
        and u["vote_entropy"][1] > 0.69
    )
    assert error_gap(np.array([[1.0, 3.0], [2.0, 2.2]])).tolist() == pytest.approx([2.0, 0.1])


class _Points(torch.nn.Module):
    """K classes; class c denoises everything to the constant c / K (a toy with K well-separated classes)."""

    sigma_data, parameterisation, multilabel = 0.5, "edm", False

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, sigma, labels):
        return (labels.float() / self.num_classes).view(-1, 1, 1, 1).expand_as(x).clone()


def test_pruning_keeps_the_true_class_and_counts_its_evaluations():
    from medlatent.diffusion.classify import classify_pruned, parse_stages, pruned_probabilities
    from medlatent.errors import MedlatentInputError

    k = 6
    truth = torch.arange(30) % k
    x = (truth.float() / k).view(-1, 1, 1, 1).expand(-1, 2, 4, 4) + 0.02 * torch.randn(30, 2, 4, 4)
    stages = parse_stages("3:2,5:1", k)
    pruned = classify_pruned(_Points(k), x, stages, batch_size=7)
    assert (pruned["prediction"] == truth.numpy()).all()
    assert pruned["evaluations_per_image"] == 3 * k + 5 * 2
    full = classify(_Points(k), x, draws=8, stop="none", batch_size=11)
    first3 = full["draw_errors"][:, :3].mean(1)
    dropped = np.ones((30, k), bool)
    dropped[np.arange(30)[:, None], np.argsort(first3, 1, kind="stable")[:, :2]] = False
    assert np.allclose(
        pruned["mean_errors"][dropped], first3[dropped]
    )  # the pruned classes saw exactly the first 3 draws
    p = pruned_probabilities(pruned["mean_errors"], pruned["prediction"], 1.0)
    assert (p.argmax(1) == pruned["prediction"]).all() and np.allclose(p.sum(1), 1)
    for bad in ("3:2,5:2", "3:2,5:3,4:1", "0:1", "3"):
        with pytest.raises(MedlatentInputError, match="--prune"):
            parse_stages(bad, k)


def test_the_paired_test_stops_when_one_class_denoises_better_in_every_draw_and_not_on_a_coin_flip():
    from medlatent.diffusion.classify import pair_terms, paired_test

    rng = np.random.default_rng(0)
    clear = torch.from_numpy(
        np.stack([rng.uniform(1, 2, 8), rng.uniform(3, 4, 8)], 1)
    )  # class 0 better in all 8 draws
    coin = torch.from_numpy(rng.uniform(1, 2, (8, 2)))  # no class better
    for draws, expected in ((clear, True), (coin, False)):
        r = pair_terms(draws)
        assert (
            paired_test(r.sum(0, keepdim=True), (r * r).sum(0, keepdim=True), torch.tensor([8]), 0.01).item()
            is expected
        )
    assert torch.allclose(pair_terms(clear), -pair_terms(clear).transpose(1, 2))


def test_the_temperature_of_an_image_is_fitted_on_the_other_folds_only():
    from medlatent.diffusion.classify import cross_fit

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    errors = rng.normal(1.0, 0.1, size=(200, 2))
    errors[np.arange(200), labels] -= 0.1
    choice, t = cross_fit([errors], labels, seed=3)
    assert (choice == 0).all() and len(set(t.tolist())) == 5  # one temperature per fold
    first = t == t[0]
    flipped = labels.copy()
    flipped[first] = 1 - flipped[first]  # the first fold's own labels change: its temperature must not
    assert np.allclose(cross_fit([errors], flipped, seed=3)[1][first], t[first])


class _LargeSigmaOnly(_Spy):
    """Knows the classes only at large noise (sigma > 2): below, both classes denoise alike."""

    def forward(self, x, sigma, labels):
        point = torch.where(labels.view(-1, 1, 1, 1) == 0, 0.5, -0.5).expand_as(x)
        return torch.where(sigma.view(-1, 1, 1, 1) > 2, point, torch.zeros_like(x)).clone()


def test_sigma_auto_chooses_the_noise_levels_that_carry_the_class_on_the_other_folds():
    from medlatent.diffusion.classify import classify_held_out

    labels = np.arange(40) % 2
    x = torch.where(torch.from_numpy(labels).view(-1, 1, 1, 1) == 0, 0.5, -0.5).expand(40, 2, 4, 4).clone()
    trained = classify_held_out(_LargeSigmaOnly(), x, labels, draws=6, sigma="train")
    auto = classify_held_out(_LargeSigmaOnly(), x, labels, draws=6, sigma="auto")
    assert (auto["sigma"][:, 0] >= 1.2).all() and auto["calibration_evaluations_per_image"] == 6 * 2 * 6
    assert (auto["votes"].argmax(1) == labels).mean() == 1.0 > (trained["votes"].argmax(1) == labels).mean()


def test_the_draws_noise_levels_can_be_chosen():
    from medlatent.diffusion.classify import parse_sigma
    from medlatent.errors import MedlatentInputError

    assert parse_sigma("train", (-1.2, 1.2)) == (-1.2, 1.2) and parse_sigma("1.5,0.5", (-1.2, 1.2)) == (1.5, 0.5)
    assert parse_sigma("auto", (-1.2, 1.2)) == "auto"
    for bad in ("1.5", "1,0", "a,b"):
        with pytest.raises(MedlatentInputError, match="--sigma"):
            parse_sigma(bad, (-1.2, 1.2))
    spy = _Spy()
    draw_errors(
        spy, torch.zeros(64, 2, 4, 4), [torch.Generator().manual_seed(i) for i in range(64)], p_mean=1.5, p_std=0.01
    )
    assert torch.allclose(spy.calls[0][1].log(), torch.tensor(1.5), atol=0.05)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: CUDA graphs through torch.compile")
def test_compiled_draws_equal_eager_draws_on_cuda():
    from medlatent.models import Denoiser

    torch.manual_seed(0)
    net = Denoiser(latent_channels=4, latent_size=8, num_classes=3, preset="tiny").cuda().eval()
    x = torch.randn(20, 4, 8, 8)
    eager = classify(net, x, draws=4, stop="none", batch_size=8)
    compiled = classify(
        torch.compile(net, mode="reduce-overhead", dynamic=False), x, draws=4, stop="none", batch_size=8
    )
    assert np.allclose(compiled["mean_errors"], eager["mean_errors"], rtol=2e-2, atol=1e-3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_full_vote_never_waits_for_the_gpu_between_draws():
    """With stop="none" nothing is decided per draw: the draws' noise and class labels go to the GPU
    without waiting and the errors stay there until the batch's last draw, so the synchronising calls
    (warned by CUDA's sync debug mode) may not grow with the draws."""
    import warnings

    from medlatent.models import Denoiser

    net = Denoiser(latent_channels=4, latent_size=8, num_classes=3, preset="tiny").cuda().eval()
    x = torch.randn(8, 4, 8, 8)

    def synchronising_calls(draws: int) -> int:
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                classify(net, x, draws=draws, stop="none", batch_size=8)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    synchronising_calls(2)  # warm-up
    assert synchronising_calls(12) == synchronising_calls(4)
