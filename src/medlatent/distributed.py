"""Several processes (launched by `accelerate launch` or `torchrun`), through accelerate's
`PartialState`; one process needs no process group and pays nothing for this module.

The audit splits its work by rank (each process encodes its own cache shards and trains its own
runs; results go through the shared run folder); a single model trains with DDP (`training.Trainer`).
"""

from __future__ import annotations

import os


def launched() -> bool:
    """True when a launcher started several processes (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _state():
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())  # without cpu=True accelerate forms no CPU (gloo) group


def rank() -> int:
    return _state().process_index if launched() else 0


def world_size() -> int:
    return _state().num_processes if launched() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait until every process gets here (nothing to wait for in a single process)."""
    if launched():
        _state().wait_for_everyone()


def mine(items: list) -> list:
    """This process's share of `items`: every world_size-th, starting at its rank."""
    r, w = rank(), world_size()
    return [item for j, item in enumerate(items) if j % w == r]
