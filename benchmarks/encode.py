"""Encoding throughput of the latent-cache pipeline against the bare encoder forward pass.

The pipeline (read images, preprocess, encode, write shards atomically, channel statistics) is
timed end to end through `LatentCache.encode`; the bare pass runs only the autoencoder's encoder
network on the same batches, already preprocessed and on the device. Overhead = best pipeline time /
best bare time - 1 over interleaved repeats; the goal is at most 10%.

    python benchmarks/encode.py                                   # TAEF2 from ../shared, else the built-in
    python benchmarks/encode.py --autoencoder hf:stabilityai/sd-vae-ft-mse --size 256 --n 2048
    python benchmarks/encode.py --size 128 --profile      # where the pipeline's time goes (torch.profiler)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medlatent.autoencoders import load_autoencoder
from medlatent.cache import LatentCache
from medlatent.data import load_dataset
from medlatent.device import autocast, resolve_device

TAEF2 = Path(__file__).resolve().parents[1].parent / "shared" / "weights" / "taef2" / "taef2_encoder.pth"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--autoencoder", default=f"taesd:{TAEF2}" if TAEF2.is_file() else "builtin:kl-f4-synthetic")
    parser.add_argument("--dataset", default="synthetic:n_train=2048,n_val=0,n_test=0")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="Also print torch.profiler's table of one pipeline run (where its time goes, host and device)",
    )
    parser.add_argument(
        "--workers", default="auto", help="DataLoader workers of the pipeline (auto: none on CPU, up to 4 on CUDA)"
    )
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    ae = load_autoencoder(args.autoencoder).to(device)
    dataset = load_dataset(args.dataset, args.size)
    indices = np.arange(min(args.n, len(dataset)))
    batches = [
        ae._to_input_range(ae.prepare(dataset.load(indices[i : i + args.batch_size]))).to(device)
        for i in range(0, len(indices), args.batch_size)
    ]

    def bare() -> float:
        start = time.perf_counter()
        with torch.inference_mode(), autocast(device):
            for x in batches:
                ae.encode_raw(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timings: list[dict] = []  # each pipeline run's breakdown (LatentCache.last_timing)

    def pipeline() -> float:
        with tempfile.TemporaryDirectory() as tmp:
            cache = LatentCache(tmp, batch_size=args.batch_size, progress=False, num_workers=args.workers)
            start = time.perf_counter()
            cache.encode(dataset, "bench", indices, ae, device, reconstruct=False)
            seconds = time.perf_counter() - start
            timings.append(cache.last_timing)
            return seconds

    bare()  # warm-up (allocator, kernels)
    bare_times, pipe_times = [], []
    for r in range(args.repeats):  # interleaved, order alternating, so drifts in machine load hit both alike
        for measure in (bare, pipeline) if r % 2 == 0 else (pipeline, bare):
            (bare_times if measure is bare else pipe_times).append(measure())
    # The minimum is the run least disturbed by the rest of the machine (timeit's advice).
    t_bare, t_pipe = min(bare_times), min(pipe_times)
    n = len(indices)
    workers = LatentCache(num_workers=args.workers).workers_for(device, dataset)
    print(
        f"autoencoder {ae.spec} on {device}, {n} images at {args.size}px -> latents "
        f"{ae.latent_channels}x{args.size // ae.downsampling_factor}x{args.size // ae.downsampling_factor}, "
        f"batch {args.batch_size}, {workers} loader workers, torch threads {torch.get_num_threads()}"
    )
    print(
        f"bare encoder forward : {n / t_bare:8.1f} img/s  (best of {args.repeats}: "
        f"{t_bare:.2f} s; median {statistics.median(bare_times):.2f} s)"
    )
    print(
        f"cache pipeline       : {n / t_pipe:8.1f} img/s  (best of {args.repeats}: "
        f"{t_pipe:.2f} s; median {statistics.median(pipe_times):.2f} s)"
    )
    best = timings[pipe_times.index(t_pipe)]
    print(
        f"  of the best run    : encode loop {best['encode_loop_seconds']:.3f} s (the "
        "rest: opening the entry, meta.json); the encoder blocked on the shard writer "
        f"{best['encoder_blocked_seconds']:.3f} s; the writer waited for shards' copies from "
        f"the device {best['copy_wait_seconds']:.3f} s and saved {best['save_seconds']:.3f} s"
    )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            pipeline()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        if device.type == "cuda":
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))
    overhead = t_pipe / t_bare - 1
    print(f"pipeline overhead    : {overhead * 100:+.1f}%  (goal <= 10%)")
    sys.exit(0 if overhead <= 0.10 else 1)


if __name__ == "__main__":
    main()
