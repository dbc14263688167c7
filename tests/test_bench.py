from __future__ import annotations

import pytest
import torch

from medlatent.bench import BenchConfig, bench_classifiers, count_flops
from medlatent.config import RunConfig

TINY = BenchConfig(
    image_backbone="resnet10t",
    image_size=32,
    image_channels=1,
    latent_backbone="resnet10t",
    latent_channels=4,
    latent_size=8,
    latent_stem="latent",
    batch_size=4,
    decode_batch_size=1,
    repeats=1,
    run=RunConfig(device="cpu"),
)


def test_flops_follow_input_size():
    small = count_flops(TINY, "image")
    assert count_flops(BenchConfig(**{**TINY.__dict__, "image_size": 64}), "image") == pytest.approx(
        4 * small, rel=0.05
    )


@pytest.mark.slow
def test_bench_reports_both_comparisons():
    r = bench_classifiers(TINY, progress=lambda _: None)
    for key in ("a_classifier_vs_classifier", "b_scoring_latents"):
        ratios = r[key]
        assert ratios["throughput_ratio"] > 0 and ratios["memory_ratio"] > 0
        assert ratios["speedup_over_flops_ratio"] == pytest.approx(ratios["throughput_ratio"] / ratios["flops_ratio"])
    flops = r["flops_per_sample"]
    assert r["b_scoring_latents"]["flops_ratio"] == pytest.approx(
        (flops["decoder"] + flops["image"]) / flops["latent"]
    )
    assert all(run["peak_memory_bytes"] > 0 for run in r["runs"].values())
    assert "sweep" not in r  # the precision / compile / batch sweep is for CUDA


def test_latent_model_is_the_noise_conditioned_one_by_default():
    plain = BenchConfig(**{**TINY.__dict__, "noise_conditioned": False})
    assert TINY.noise_conditioned
    assert count_flops(TINY, "latent") > count_flops(plain, "latent")  # the FiLM embedding MLP and modulation


def test_a_crashed_measurement_is_one_error_not_a_hang(monkeypatch):
    """A child that dies without reporting (here: it exits at once) ends the bench with one error."""
    from medlatent import bench
    from medlatent.errors import MedlatentRuntimeError

    monkeypatch.setattr(bench, "_measure", _die)
    with pytest.raises(MedlatentRuntimeError, match="crashed \\(exit code 3; its error"):
        bench._in_fresh_process(TINY, ("image",), "infer", 2)


def _die(*args) -> None:
    import os

    os._exit(3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_cuda_sweep_reports_each_model_at_its_best_point():
    cfg = BenchConfig(
        **{**TINY.__dict__, "run": RunConfig(device="cuda"), "sweep_batch": [8, 64], "sweep_compile": ["off"]}
    )
    r = bench_classifiers(cfg, progress=lambda _: None)
    sweep = r["sweep"]
    assert set(sweep["models"]) == {"image", "latent", "latent backbone"}
    for m in sweep["models"].values():
        assert len(m["points"]) == 4 and m["best"]["images_per_second"] == max(
            p["images_per_second"] for p in m["points"]
        )
        assert m["best"]["peak_memory_bytes"] > 0 and m["best"]["tflops"] > 0
    assert sweep["best_throughput_ratio"] == pytest.approx(
        sweep["models"]["latent"]["best"]["images_per_second"] / sweep["models"]["image"]["best"]["images_per_second"]
    )


def test_the_diffusion_bench_times_training_sampling_and_the_classifier():
    from medlatent.bench import bench_diffusion
    from medlatent.config import DiffusionBenchConfig

    cfg = DiffusionBenchConfig(
        latent_channels=4,
        latent_size=8,
        preset="tiny",
        batch_size=4,
        train_steps=1,
        sample_steps=[2],
        samplers=["heun"],
        classify_draws=3,
        run=RunConfig(device="cpu"),
    )
    r = bench_diffusion(cfg, progress=lambda _: None)
    assert r["training"]["engine_latents_per_second"] > 0 and r["sampling"][0]["nfe"] == 3
    assert (
        r["classifier"]["evaluations_per_image"] == 6
        and r["classifier"]["images_per_second"] > 0
        and 0 < r["classifier"]["host_noise_share"] < 1
    )
