"""Timing on any device: a call's median seconds, and the bare training step of a classifier (the
reference the audits' training throughput is held to)."""

from __future__ import annotations

import time

import numpy as np
import torch

from ..device import channels_last


def sync(device) -> None:
    """Wait for the device's queued work (CUDA); nothing elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, device, repeats: int, warmup: int = 3) -> float:
    """Seconds per call of `step()`, the median of `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bare_train_throughput(
    cfg, in_chans: int, size: int, num_outputs: int, latent_space: bool, device, steps: int = 20
) -> float:
    """Samples/s of the bare training step of the model a `TrainConfig` trains: forward, cross
    entropy, backward and AdamW on random inputs held on the device, under the loop's precision,
    channels-last, timed after warm-up. The reference the audit's training throughput is held to."""
    from ..models import Classifier
    from .engine import make_accelerator

    accelerator = make_accelerator(device, cfg.loop.mixed_precision)
    model = channels_last(Classifier(cfg.backbone, in_chans, num_outputs, latent_stem=latent_space).to(device).train())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = channels_last(torch.randn(cfg.batch_size, in_chans, size, size, device=device))
    y = torch.randint(0, num_outputs, (cfg.batch_size,), device=device)

    def step() -> None:
        with accelerator.autocast():
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return cfg.batch_size / timed(step, device, steps)
