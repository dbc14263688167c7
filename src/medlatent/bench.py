"""Speed and memory of latent against image-space classifiers (`medlatent bench classifiers`),
and of the latent denoiser's training and sampling (`medlatent bench diffusion`).

Two comparisons, each as ratios:
  (a) classifier against classifier: an image-space model on images vs a latent model on latents;
  (b) scoring latents, the use case: the latent model on z vs decode(z) followed by the image model.
Throughput is timed on forward passes (inference mode, after warm-up). FLOPs come from
`torch.utils.flop_counter`. Memory: on CUDA `torch.cuda.max_memory_allocated`; on CPU the peak
resident memory delta of a fresh process (parameters plus activations: the peak-RSS mark is reset
after the libraries are imported), each measurement in its own spawned process. Every model and
input is in channels-last layout (`device.channels_last`), the fast layout for convolutions.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import asdict

import numpy as np
import torch

from .config import BenchConfig, DiffusionBenchConfig, DiffusionConfig
from .device import channels_last, resolve_device
from .errors import MedlatentRuntimeError
from .training.timing import sync, timed

PUBLISHED = BenchConfig()
# the default of `bench_diffusion`, made once (as a default argument it was made once too)
_DIFFUSION_DEFAULTS = DiffusionBenchConfig()


def _model(cfg: BenchConfig, which: str):
    from .models import Classifier

    if which == "image":
        return Classifier(cfg.image_backbone, cfg.image_channels, cfg.num_classes), (
            cfg.image_channels,
            cfg.image_size,
        )
    if which == "latent":  # noise-conditioned: called with one input it is scored at sigma_min
        model = Classifier(
            cfg.latent_backbone,
            cfg.latent_channels,
            cfg.num_classes,
            latent_stem=cfg.latent_stem == "latent",
            noise_conditioned=cfg.noise_conditioned,
        )
        return model, (cfg.latent_channels, cfg.latent_size)
    if which == "decoder":
        return _decoder(cfg), (cfg.latent_channels, cfg.latent_size)
    raise ValueError(which)


def _decoder(cfg: BenchConfig) -> torch.nn.Module:
    """The decoder of the FLUX.2 VAE (diffusers default configuration) or of the built-in recipe."""
    from diffusers import AutoencoderKLFlux2

    if cfg.decoder != "flux2":
        raise ValueError(f"unknown decoder {cfg.decoder!r}; use flux2")
    vae = AutoencoderKLFlux2(latent_channels=cfg.latent_channels)

    class Decode(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = vae

        def forward(self, z):
            return self.vae.decode(z).sample

    return Decode()


def _inputs(shape: tuple[int, int], batch: int, device) -> torch.Tensor:
    channels, size = shape
    return torch.randn(batch, channels, size, size, device=device)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (VmHWM) and return the current RSS (Linux)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return _status_kib("VmRSS")


def _measure(cfg_dict: dict, which: tuple[str, ...], mode: str, batch: int, queue) -> None:
    """Runs in a fresh process: throughput (or train step time) and peak memory of a chain of models."""
    cfg = BenchConfig(**cfg_dict)
    device = resolve_device(cfg.run.device)
    import diffusers  # noqa: F401 - imported before the baseline, so library memory is not counted
    import timm  # noqa: F401

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = _reset_peak_rss() if device.type != "cuda" else 0
    models = [_model(cfg, w) for w in which]
    x = channels_last(_inputs(models[0][1], batch, device))
    chain = [channels_last(m.to(device)).train(mode == "train") for m, _ in models]

    def forward(inputs):
        out = inputs
        for i, m in enumerate(chain):
            if i > 0 and which[i - 1] == "decoder":  # decoded images -> the image model's channels and size
                out = channels_last(
                    torch.nn.functional.interpolate(out, size=(cfg.image_size, cfg.image_size))[
                        :, : cfg.image_channels
                    ]
                )
            out = m(out)
        return out

    if mode == "infer":
        with torch.inference_mode():
            forward(x)  # warm-up
            sync(device)
            times = []
            for _ in range(cfg.repeats):
                start = time.perf_counter()
                forward(x)
                sync(device)
                times.append(time.perf_counter() - start)
        seconds = min(times)
    else:  # the training loop's own step (`training.train_step`): its precision, its objective
        from .diffusion.noise import karras_sigmas
        from .training import ClassificationObjective, make_accelerator, train_step
        from .training.losses import ClassificationLoss

        (model,) = chain
        noised = which == ("latent",) and cfg.noise_conditioned
        objective = ClassificationObjective(
            ClassificationLoss("ce", "binary", np.ones(cfg.num_classes), 1),
            sigmas=karras_sigmas(32) if noised else None,
        )
        accelerator = make_accelerator(device)
        model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-4))
        inputs = {"x": x, "y": torch.zeros(len(x), dtype=torch.long, device=device)}
        generator = torch.Generator(device=device).manual_seed(0)
        times = []
        for _ in range(cfg.repeats + 1):  # the first step is the warm-up
            start = time.perf_counter()
            train_step(accelerator, model, objective, optimizer, None, inputs, generator)
            sync(device)
            times.append(time.perf_counter() - start)
        seconds = min(times[1:])
    memory = torch.cuda.max_memory_allocated() if device.type == "cuda" else _status_kib("VmHWM") - base
    queue.put(
        {"seconds": seconds, "batch": len(x), "images_per_second": len(x) / seconds, "peak_memory_bytes": int(memory)}
    )


def _in_fresh_process(cfg: BenchConfig, which: tuple[str, ...], mode: str, batch: int) -> dict:
    return _child(_measure, (asdict(cfg), which, mode, batch), f"{'+'.join(which)} ({mode}, batch {batch})")


def _child(target, args: tuple, what: str):
    """`target(*args, queue)` in a spawned process, its result; a child that dies (out of memory,
    a crash) ends the bench with one line saying which measurement failed, instead of waiting for
    it forever."""
    import queue as queue_module

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    process = ctx.Process(target=target, args=(*args, results))
    process.start()
    while True:
        try:
            result = results.get(timeout=1.0)
            break
        except queue_module.Empty:
            if not process.is_alive():
                try:
                    result = results.get(timeout=1.0)  # it may have finished between the two checks
                    break
                except queue_module.Empty:
                    hint = (
                        "killed, perhaps out of memory: try a smaller --batch-size"
                        if (process.exitcode or 0) < 0
                        else "its error is printed above"
                    )
                    raise MedlatentRuntimeError(
                        f"bench: the measurement of {what} crashed (exit code {process.exitcode}; {hint})"
                    ) from None
    process.join()
    return result


def _bare_latent(cfg: BenchConfig) -> torch.nn.Module:
    """The latent model's timm backbone alone (same stem, no FiLM, no noise embedding)."""
    from .models import create_backbone

    return create_backbone(
        cfg.latent_backbone, cfg.latent_channels, cfg.num_classes, latent_stem=cfg.latent_stem == "latent"
    )


def _sweep(cfg_dict: dict, which: str, queue) -> None:
    """Runs in a fresh process on CUDA: inference throughput and peak memory of one model at every
    (precision, compile, batch) point; an out-of-memory point is recorded as such."""
    cfg = BenchConfig(**cfg_dict)
    device = resolve_device(cfg.run.device)
    model, shape = (
        (_bare_latent(cfg), (cfg.latent_channels, cfg.latent_size))
        if which == "latent backbone"
        else _model(cfg, which)
    )
    model = channels_last(model.to(device).eval())
    points = []
    for compiled in cfg.sweep_compile:
        forward = torch.compile(model, mode="reduce-overhead") if compiled == "on" else model
        for precision in cfg.sweep_precision:
            for batch in cfg.sweep_batch:
                point = {"precision": precision, "compile": compiled, "batch": batch}
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                try:
                    seconds = _time_inference(
                        forward, channels_last(_inputs(shape, batch, device)), precision, device, max(cfg.repeats, 5)
                    )
                    point.update(
                        images_per_second=batch / seconds, peak_memory_bytes=int(torch.cuda.max_memory_allocated())
                    )
                except torch.cuda.OutOfMemoryError:
                    point["error"] = "out of memory"
                points.append(point)
        torch._dynamo.reset()  # a fresh compile for the next setting
    queue.put(points)


def _time_inference(forward, x: torch.Tensor, precision: str, device, repeats: int) -> float:
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
        return timed(lambda: forward(x), device, repeats=repeats, warmup=3)


def sweep_classifiers(cfg: BenchConfig, flops: dict[str, int], progress=print) -> dict:
    """Each model (image, noise-conditioned latent, the latent model's bare timm backbone) at every
    sweep point; compared at their best points: throughput ratio, achieved TFLOP/s and FLOPs ratio."""
    flops = {**flops, "latent backbone": flops["latent"]}  # FiLM adds a few linear layers: the same FLOPs to 0.1%
    models = {}
    for which in ("image", "latent", "latent backbone"):
        progress(
            f"sweeping {which}: batch {cfg.sweep_batch}, precision "
            f"{cfg.sweep_precision}, compile {cfg.sweep_compile} ..."
        )
        points = _child(_sweep, (asdict(cfg), which), f"the {which} sweep")
        done = [p for p in points if "images_per_second" in p]
        best = max(done, key=lambda p: p["images_per_second"])
        models[which] = {"best": {**best, "tflops": flops[which] * best["images_per_second"] / 1e12}, "points": points}
    image, latent, bare = (models[w]["best"] for w in ("image", "latent", "latent backbone"))
    ratio, flops_ratio = latent["images_per_second"] / image["images_per_second"], flops["image"] / flops["latent"]
    return {
        "models": models,
        "best_throughput_ratio": ratio,
        "flops_ratio": flops_ratio,
        "tflops_ratio": image["tflops"]
        / latent["tflops"],  # where the FLOPs ratio is lost: the image model uses the GPU this much better
        "latent_vs_bare_backbone": latent["images_per_second"] / bare["images_per_second"],
        "memory_ratio": image["peak_memory_bytes"] / max(latent["peak_memory_bytes"], 1),
    }


def count_flops(cfg: BenchConfig, which: str) -> int:
    """FLOPs of one forward pass of one sample."""
    from torch.utils.flop_counter import FlopCounterMode

    model, shape = _model(cfg, which)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(_inputs(shape, 1, torch.device("cpu")))
    return int(counter.get_total_flops())


def bench_classifiers(cfg: BenchConfig = PUBLISHED, progress=print) -> dict:
    results = {
        "config": asdict(cfg),
        "device": str(resolve_device(cfg.run.device)),
        "torch_threads": torch.get_num_threads(),
    }
    flops = {w: count_flops(cfg, w) for w in ("image", "latent", "decoder")}
    results["flops_per_sample"] = flops
    plan = {
        "image infer": (("image",), "infer", cfg.batch_size),
        "latent infer": (("latent",), "infer", cfg.batch_size),
        "image train": (("image",), "train", cfg.batch_size),
        "latent train": (("latent",), "train", cfg.batch_size),
        "decode+image infer": (("decoder", "image"), "infer", cfg.decode_batch_size),
        "latent infer at decode batch": (("latent",), "infer", cfg.decode_batch_size),
    }
    runs = {}
    for name, (which, mode, batch) in plan.items():
        progress(f"measuring {name} (batch {batch}) ...")
        runs[name] = _in_fresh_process(cfg, which, mode, batch)
    results["runs"] = runs
    image, latent, chain = runs["image infer"], runs["latent infer"], runs["decode+image infer"]
    flops_a = flops["image"] / flops["latent"]
    flops_b = (flops["decoder"] + flops["image"]) / flops["latent"]
    results["a_classifier_vs_classifier"] = {
        "throughput_ratio": latent["images_per_second"] / image["images_per_second"],
        "memory_ratio": image["peak_memory_bytes"] / max(latent["peak_memory_bytes"], 1),
        "flops_ratio": flops_a,
        "speedup_over_flops_ratio": (latent["images_per_second"] / image["images_per_second"]) / flops_a,
        "train_step_time_ratio": runs["image train"]["seconds"]
        / runs["image train"]["batch"]
        / (runs["latent train"]["seconds"] / runs["latent train"]["batch"]),
        "train_memory_ratio": runs["image train"]["peak_memory_bytes"]
        / max(runs["latent train"]["peak_memory_bytes"], 1),
    }
    results["b_scoring_latents"] = {
        "throughput_ratio": latent["images_per_second"] / chain["images_per_second"],
        "memory_ratio": chain["peak_memory_bytes"] / max(runs["latent infer at decode batch"]["peak_memory_bytes"], 1),
        "flops_ratio": flops_b,
        "speedup_over_flops_ratio": (latent["images_per_second"] / chain["images_per_second"]) / flops_b,
    }
    if resolve_device(cfg.run.device).type == "cuda":
        results["sweep"] = sweep_classifiers(cfg, flops, progress)
    return results


def bench_diffusion(cfg: DiffusionBenchConfig = _DIFFUSION_DEFAULTS, progress=print) -> dict:
    """Training: latents/s of the engine's step (`training.train_step`: its precision, objective,
    label dropout, optimiser; then the EMA update that `diffusion train` makes by default) against
    the bare UNet step (forward, MSE, backward, AdamW step, under the same autocast). Sampling:
    seconds per latent and per network evaluation (NFE) for each sampler and number of steps, at the
    given classifier-free guidance (2 branches per evaluation when it is not 1)."""
    from .models import Denoiser
    from .training import DenoisingObjective, VPDenoisingObjective, make_accelerator

    device = resolve_device(cfg.run.device)
    torch.manual_seed(0)
    shape = (cfg.batch_size, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    x, y = torch.randn(shape, device=device) * 0.5, torch.randint(0, cfg.num_classes, (cfg.batch_size,), device=device)
    result: dict = {"config": asdict(cfg), "device": str(device), "torch_threads": torch.get_num_threads()}

    model = Denoiser(
        cfg.latent_channels, cfg.latent_size, cfg.num_classes, cfg.preset, parameterisation=cfg.parameterisation
    ).to(device)
    result["parameters"] = sum(p.numel() for p in model.parameters())
    objective = DenoisingObjective() if cfg.parameterisation == "edm" else VPDenoisingObjective(cfg.parameterisation)
    accelerator = make_accelerator(device)
    engine_model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    progress(
        f"bench diffusion: {cfg.preset} denoiser ({result['parameters'] / 1e6:.1f} M parameters) "
        f"on {cfg.latent_channels}x{cfg.latent_size}x{cfg.latent_size} latents, {device}"
    )
    result["training"] = _bench_diffusion_training(
        cfg, accelerator, engine_model, objective, optimizer, x, y, device, progress
    )
    model = accelerator.unwrap_model(engine_model).eval()
    result["sampling"] = _bench_diffusion_sampling(cfg, accelerator, model, y, device, progress)
    if cfg.classify_draws:
        result["classifier"] = _bench_diffusion_classifier(cfg, model, x, device, progress)
    return result


def _bench_diffusion_training(
    cfg: DiffusionBenchConfig, accelerator, engine_model, objective, optimizer, x, y, device, progress
) -> dict:
    """Latents/s of the engine's training step (EMA update included) and of the bare UNet step."""
    from .models import Denoiser
    from .training import make_ema, train_step

    generator = torch.Generator(device=device).manual_seed(0)
    batch = {"x": x, "y": y}
    loop = DiffusionConfig().loop
    ema = make_ema(accelerator.unwrap_model(engine_model), loop.ema_decay, loop.ema_sigma_rel)

    def engine_step() -> None:
        train_step(accelerator, engine_model, objective, optimizer, None, batch, generator)
        if ema is not None:
            ema.update_parameters(accelerator.unwrap_model(engine_model))

    engine = timed(engine_step, device, cfg.train_steps)

    bare_unet = Denoiser(cfg.latent_channels, cfg.latent_size, cfg.num_classes, cfg.preset).unet.to(device).train()
    bare_optimizer = torch.optim.AdamW(bare_unet.parameters(), lr=1e-4)
    timesteps = torch.rand(cfg.batch_size, device=device) * 1000

    def bare_step() -> None:
        with accelerator.autocast():
            loss = torch.nn.functional.mse_loss(bare_unet(x, timesteps, class_labels=y).sample.float(), x)
        loss.backward()
        bare_optimizer.step()
        bare_optimizer.zero_grad(set_to_none=True)

    bare = timed(bare_step, device, cfg.train_steps)
    progress(
        f"  training: engine {cfg.batch_size / engine:.0f} "
        f"latents/s{' (EMA update included)' if ema is not None else ''}, bare UNet "
        f"step {cfg.batch_size / bare:.0f} latents/s ({accelerator.mixed_precision})"
    )
    return {
        "mixed_precision": accelerator.mixed_precision,
        "engine_ema": {"ema_decay": loop.ema_decay, "ema_sigma_rel": loop.ema_sigma_rel} if ema is not None else None,
        "engine_latents_per_second": cfg.batch_size / engine,
        "bare_unet_latents_per_second": cfg.batch_size / bare,
        "engine_over_bare_time": engine / bare,
    }


def _bench_diffusion_sampling(cfg: DiffusionBenchConfig, accelerator, model, y, device, progress) -> list[dict]:
    """Seconds per latent and per network evaluation of each sampler at each number of steps."""
    from .diffusion.sampling import sample

    labels = y.cpu()
    runs = []
    for sampler in cfg.samplers:
        for steps in cfg.sample_steps:
            nfe = 2 * steps - 1 if sampler == "heun" else steps
            with accelerator.autocast():
                seconds = timed(
                    lambda steps=steps, sampler=sampler: sample(
                        model,
                        labels,
                        steps=steps,
                        cfg=cfg.cfg,
                        generator=torch.Generator().manual_seed(0),
                        sampler=sampler,
                    ),
                    device,
                    repeats=2,
                    warmup=1,
                )
            runs.append(
                {
                    "sampler": sampler,
                    "steps": steps,
                    "nfe": nfe,
                    "seconds_per_latent": seconds / cfg.batch_size,
                    "seconds_per_nfe": seconds / nfe,
                    "latents_per_second": cfg.batch_size / seconds,
                }
            )
            progress(
                f"  sampling {sampler:5s} {steps:3d} steps ({nfe:3d} NFE): {1e3 * seconds / cfg.batch_size:8.3f} "
                f"ms/latent, {1e3 * seconds / nfe:7.2f} ms/NFE for a batch of {cfg.batch_size}"
            )
    return runs


def _bench_diffusion_classifier(cfg: DiffusionBenchConfig, model, x, device, progress) -> dict:
    """Images/s of the diffusion classifier at `cfg.classify_draws` draws, and the share of its time
    spent drawing the noise on the host."""
    from .diffusion.classify import classify, draw_noise

    seconds = timed(
        lambda: classify(model, x, cfg.classify_draws, stop="none", batch_size=cfg.batch_size),
        device,
        repeats=1,
        warmup=0,
    )
    generators = [torch.Generator().manual_seed(i) for i in range(len(x))]
    started = time.perf_counter()
    for _ in range(cfg.classify_draws):  # the same draws' noise alone: the host's share of the time
        draw_noise(generators, x.shape[1:])
    noise = time.perf_counter() - started
    evaluations = cfg.classify_draws * cfg.num_classes
    progress(
        f"  diffusion classifier: {cfg.batch_size / seconds:.1f} images/s at {evaluations} "
        f"network evaluations per image ({cfg.classify_draws} draws x {cfg.num_classes} "
        f"classes; {cfg.batch_size * evaluations / seconds:.0f} evaluations/s; "
        f"drawing the noise on the host {100 * noise / seconds:.0f}% of the time)"
    )
    return {
        "draws": cfg.classify_draws,
        "evaluations_per_image": evaluations,
        "images_per_second": cfg.batch_size / seconds,
        "evaluations_per_second": cfg.batch_size * evaluations / seconds,
        "host_noise_share": noise / seconds,
    }
