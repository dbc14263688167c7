"""Run under `torchrun --nproc_per_node 2` (or alone) by test_distributed: `CACHE_DIR` encodes a
dataset into the cache with small shards, so that each process has shards of its own; `ddp OUT`
trains one model with DDP."""

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
    LatentCache(cache_dir, shard_size=8, progress=False).encode(
        dataset, "all", np.arange(len(dataset)), ae, torch.device("cpu")
    )


if __name__ == "__main__" and len(sys.argv) == 2:
    main(sys.argv[1])


def ddp(out: str) -> None:
    """One model trained with DDP across the processes; each writes the weights it ends with."""
    torch.set_num_threads(1)
    from safetensors.torch import save_file

    from medlatent import distributed
    from medlatent.training import ClassificationObjective, LoopConfig, Trainer
    from medlatent.training.losses import ClassificationLoss

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, 4, 4, generator=g)
    data = {"x": x, "y": (x[:, 0].mean((1, 2)) > 0).long()}
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(16, 2))
    objective = ClassificationObjective(ClassificationLoss("ce", "binary", np.ones(2), 1))
    result = Trainer(LoopConfig(), "cpu", progress=False).fit(
        model, objective, data, batch_size=8, lr=0.05, epochs=2, checkpoint_dir=f"{out}/checkpoint"
    )
    save_file(
        {k: v.contiguous() for k, v in result.model.state_dict().items()},
        f"{out}/rank{distributed.rank()}.safetensors",
    )
    print(f"rank {distributed.rank()} of {distributed.world_size()}: {result.steps} steps")


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "ddp":
    ddp(sys.argv[2])
