"""Throughput of the latent scorer (`LatentScorer`, `medlatent score`): latents/s from host memory
to probabilities on the host, copies included, per batch size and with CUDA graphs off and on.

Without `--classifier` a small noise-conditioned latent classifier is trained first (synthetic
data, the built-in autoencoder, one epoch: the network's cost, not its accuracy, is timed).

    python benchmarks/score.py                                   # 4x16x16 latents, as the audit's default
    python benchmarks/score.py --classifier models/student --n 131072 --batch-size 1024 --batch-size 8192
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from medlatent import api
from medlatent.classifiers.scorer import LatentScorer
from medlatent.device import resolve_device


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifier", help="a saved latent-space classifier (default: train a small one)")
    parser.add_argument(
        "--n", type=int, default=None, help="latents scored per timing (default: 131072 on CUDA, 4096 on CPU)"
    )
    parser.add_argument(
        "--batch-size", type=int, action="append", help="repeat (default: 1024 and 8192 on CUDA, 256 on CPU)"
    )
    parser.add_argument(
        "--latent-size",
        type=int,
        default=16,
        help="latent side (the default classifier reads 4 channels; 64-px images at f4: 16)",
    )
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    n = args.n or (131072 if cuda else 4096)
    batches = args.batch_size or ([1024, 8192] if cuda else [256])
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.classifier
        if folder is None:
            folder = Path(tmp) / "clf"
            api.classifier_train(
                folder,
                space="latent",
                autoencoder="builtin:kl-f4-synthetic",
                device=str(device),
                progress=False,
                dataset="synthetic:n_train=64,n_val=16,n_test=16",
                size=64,
                cache_dir=str(Path(tmp) / "cache"),
                noise_conditioned=True,
                epochs=1,
                batch_size=32,
            )
        probe = LatentScorer(folder, device=str(device), batch_size=1, progress=False)
        z = torch.randn(n, probe.channels, args.latent_size, args.latent_size)
        print(
            f"scorer on {device}: {n} latents of {tuple(z.shape[1:])}, {probe.classifier.config.backbone}, "
            f"noise-conditioned {probe.classifier.config.noise_conditioned}"
        )
        for compiled in (False, True) if cuda else (False,):  # CUDA graphs exist only on CUDA
            for batch in batches:
                scorer = LatentScorer(folder, device=str(device), batch_size=batch, compile=compiled, progress=False)
                scorer.predict_proba(z[: min(n, 3 * batch)])  # warm-up (and compilation)
                if cuda:
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                scorer.predict_proba(z)  # returns host probabilities: every copy is inside the time
                seconds = time.perf_counter() - start
                print(f"  compile {'on ' if compiled else 'off'} batch {batch:5d}: {n / seconds:12,.0f} latents/s")


if __name__ == "__main__":
    main()
