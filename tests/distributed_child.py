"""Run under `torchrun --nproc_per_node 2` (or alone) by test_distributed: encode a dataset into
the cache with small shards, so that each process has shards of its own."""

from __future__ import annotations

import sys

import numpy as np
import torch


def main(cache_dir: str) -> None:
    torch.set_num_threads(1)
    from medlatent.autoencoders import load_autoencoder
    from medlatent.cache import LatentCache
    from medlatent.data import load_dataset

    dataset = load_dataset("synthetic:n_train=40,n_val=8,n_test=8", 32)
    ae = load_autoencoder("reference:blur")
    LatentCache(cache_dir, shard_size=8, progress=False).encode(dataset, "all", np.arange(len(dataset)), ae, torch.device("cpu"))


if __name__ == "__main__":
    main(sys.argv[1])
