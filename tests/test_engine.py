"""The training engine: one loop for every objective; a killed run resumes to the same result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from medlatent.training import Batches, ClassificationObjective, EarlyStopping, LoopConfig, Trainer
from medlatent.training.losses import ClassificationLoss

ROOT = Path(__file__).resolve().parents[1]


def _child(kind: str, out: Path, checkpoints: Path | None = None) -> subprocess.Popen:
    args = [sys.executable, "-m", "tests.resume_child", kind, str(out)] + ([str(checkpoints)] if checkpoints else [])
    return subprocess.Popen(
        args,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["classifier", "autoencoder"])
def test_sigkill_then_rerun_ends_with_the_uninterrupted_weights(kind, tmp_path):
    reference = _child(kind, tmp_path / "reference")
    assert reference.wait(timeout=300) == 0, reference.stderr.read()

    checkpoints = tmp_path / "checkpoints"
    victim = _child(kind, tmp_path / "killed", checkpoints)
    deadline = time.monotonic() + 120
    while not (checkpoints / "checkpoint.pt").is_file():  # the first checkpoint, at step 1
        assert victim.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.005)
    time.sleep(0.3)  # a few steps more: killed between checkpoints, mid-epoch
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL, "the run finished before it was killed; make it longer"
    assert not (tmp_path / "killed" / "weights.safetensors").exists()

    rerun = _child(kind, tmp_path / "killed", checkpoints)
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
    record = json.loads((tmp_path / "killed" / "record.json").read_text())
    assert record["resumed_from_step"] > 0  # it resumed, not restarted
    expected, resumed = (
        load_file(tmp_path / "reference" / "weights.safetensors"),
        load_file(tmp_path / "killed" / "weights.safetensors"),
    )
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected), [
        k for k in expected if not torch.equal(expected[k], resumed[k])
    ][:5]
    reference_record = json.loads((tmp_path / "reference" / "record.json").read_text())
    if kind == "classifier":
        assert record["probs"] == reference_record["probs"] and record["history"] == reference_record["history"]
    else:
        assert record["final_loss"] == reference_record["final_loss"]


def _toy(n: int = 64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, 4, 4, generator=g)
    return {"x": x, "y": (x[:, 0].mean((1, 2)) > 0).long()}


def test_batches_are_a_resumable_permutation_shared_out_by_rank():
    data = {"i": torch.arange(20)}
    one = Batches(data, 4, seed=3)
    seen = torch.cat([b["i"] for b in one.epoch(0)])
    assert sorted(seen.tolist()) == list(range(20))  # every sample once per epoch
    assert not torch.equal(seen, torch.cat([b["i"] for b in one.epoch(1)]))  # a new order each epoch
    assert torch.equal(torch.cat([b["i"] for b in one.epoch(0, skip=2)]), seen[8:])  # resume mid-epoch
    ranks = [torch.cat([b["i"] for b in Batches(data, 4, seed=3, rank=r, world=2).epoch(0)]) for r in (0, 1)]
    assert set(ranks[0].tolist()).isdisjoint(ranks[1].tolist()) and len(ranks[0]) == len(ranks[1]) == 8


def test_gradient_accumulation_matches_the_large_batch():
    """Two accumulated batches of 8 make the same step as one batch of 16 (mean losses, no BN)."""

    def fit(batch_size: int, accum: int) -> torch.Tensor:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32, 2))
        objective = ClassificationObjective(ClassificationLoss("ce", "binary", torch.ones(2).numpy(), 1))
        data = _toy(16)
        Trainer(LoopConfig(grad_accum_steps=accum), "cpu", progress=False).fit(
            model, objective, data, batch_size=batch_size, lr=0.1, steps=1, warmup=0.5
        )
        return model[1].weight.detach().clone()

    assert torch.allclose(fit(16, 1), fit(8, 2), atol=1e-6)


def test_ema_follows_its_warmed_up_recursion_and_is_the_result():
    from medlatent.training.engine import make_ema

    model = torch.nn.Linear(3, 1)
    ema = make_ema(model, 0.99)
    expected = None
    for n in range(
        30
    ):  # the first update copies the weights; the next ones average, with n = 1, 2, ... updates so far
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update_parameters(model)
        decay = min(0.99, (1 + n) / (10 + n)) if n else 0.0
        expected = model.weight.detach().clone() if n == 0 else decay * expected + (1 - decay) * model.weight.detach()
    assert torch.allclose(ema.module.weight, expected, atol=1e-5)

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32, 2))
    objective = ClassificationObjective(ClassificationLoss("ce", "binary", torch.ones(2).numpy(), 1))
    result = Trainer(LoopConfig(ema_decay=0.99), "cpu", progress=False).fit(
        net, objective, _toy(), batch_size=8, lr=0.1, steps=20
    )
    assert result.model is not net and not torch.equal(
        result.model[1].weight, net[1].weight
    )  # the average, not the last weights


def test_power_function_ema_weights_past_steps_by_a_power_of_their_time():
    """EDM2's profile: after t updates the average weighs update tau by ~tau^gamma, so its relative
    width is sigma_rel whatever the run length."""
    import math

    from medlatent.training.engine import ema_gamma, make_ema

    gamma = ema_gamma(0.1)
    assert (
        abs(math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) - 0.1) < 1e-9 and abs(gamma - 6.94) < 0.01
    )  # EDM2's gamma for sigma_rel 0.10
    model = torch.nn.Linear(1, 1, bias=False)
    ema = make_ema(model, 0.0, sigma_rel=0.1)
    steps = 400
    for tau in range(1, steps + 1):  # weights theta_tau = tau
        with torch.no_grad():
            model.weight.fill_(float(tau))
        ema.update_parameters(model)
    tau = torch.arange(1, steps + 1, dtype=torch.float64)
    expected = float((tau**gamma * tau).sum() / (tau**gamma).sum())  # ~ steps (gamma + 1) / (gamma + 2)
    assert abs(ema.module.weight.item() - expected) / expected < 0.01
    assert abs(ema.module.weight.item() - steps * 0.5) > 100  # far from a plain running mean


def test_early_stopping_keeps_the_best_epoch_and_a_warm_start_that_no_epoch_beats():
    stopping = EarlyStopping(lambda m: (m["score"],), patience=2, keep_start=True)
    model = torch.nn.Linear(1, 1)
    stopping.on_start(model, {"score": 0.8})
    assert not stopping.on_epoch_end(0, model, {"score": 0.5})
    assert not stopping.on_epoch_end(1, model, {"score": 0.7})  # the run's own best: patience restarts
    assert not stopping.on_epoch_end(2, model, {"score": 0.6})
    assert stopping.on_epoch_end(3, model, {"score": 0.6}) and "2 epochs" in stopping.stop_reason
    assert stopping.best_epoch == -1  # nothing beat the starting weights


def test_best_epoch_weights_are_a_copy_where_the_model_is_and_checkpoints_hold_them_on_the_host():
    stopping = EarlyStopping(lambda m: (m["score"],), patience=2)
    model = torch.nn.Linear(2, 1)
    assert not stopping.on_epoch_end(0, model, {"score": 0.5})
    kept = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)  # later training steps do not reach the kept weights
    assert not stopping.on_epoch_end(1, model, {"score": 0.4})
    assert (
        torch.equal(stopping.best_state["weight"], kept)
        and stopping.best_state["weight"].device == model.weight.device
    )
    saved = stopping.state_dict()
    assert saved["best_state"]["weight"].device.type == "cpu" and torch.equal(saved["best_state"]["weight"], kept)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ema_update_and_best_epoch_copy_never_wait_for_the_gpu():
    """torch's AveragedModel copied its host-side count to the GPU with a blocking copy at every
    update (a drained queue per optimiser step); the kept best weights went to the host."""
    from medlatent.training.engine import make_ema

    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3)).cuda()
    ema, stopping = make_ema(model, 0.0, 0.1), EarlyStopping(lambda m: (m["score"],), patience=2)
    ema.update_parameters(model)  # the first update copies
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        for _ in range(3):
            ema.update_parameters(model)
        stopping.on_epoch_end(0, model, {"score": 0.5})
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(ema.n_averaged) == 4 and stopping.best_state["0.weight"].is_cuda


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_noise_conditioned_distillation_trains_on_cuda_in_mixed_precision():
    """The CUDA path: bf16/fp16 autocast, noise and masks drawn on the GPU, EMA, accumulation, clipping."""
    from medlatent.classifiers import DeepClassifier, TrainConfig

    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 4, 8, 8, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long().numpy()
    teacher = torch.stack([-x[:, 0].mean((1, 2)), x[:, 0].mean((1, 2))], 1) * 4
    loop = LoopConfig(ema_decay=0.9, grad_accum_steps=2, max_grad_norm=1.0)
    cfg = TrainConfig("resnet10t", epochs=2, batch_size=16, noise_conditioned=True, clean_fraction=0.25, loop=loop)
    clf = DeepClassifier(cfg, latent_space=True, device="cuda", progress=False).fit(
        x[:64], y[:64], x[64:], y[64:], "binary", teacher_logits=teacher[:64]
    )
    assert next(clf.model_.parameters()).is_cuda and len(clf.history_) == 2
    assert np.isfinite(clf.predict_proba(x[64:])).all()
