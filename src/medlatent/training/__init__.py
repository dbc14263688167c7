"""The training engine: one loop (`Trainer`) on accelerate for everything medlatent trains, the
objectives that plug into it, its callbacks and its batches."""

from ..config import MIXED_PRECISIONS, LoopConfig
from .batches import Batches
from .callbacks import EarlyStopping, nan_last
from .engine import EMA, FitResult, Trainer, make_accelerator, make_ema, run_key, train_step
from .objectives import (
    AutoencoderObjective,
    ClassificationObjective,
    DenoisingObjective,
    VPDenoisingObjective,
    random_crop,
)

__all__ = [
    "MIXED_PRECISIONS",
    "AutoencoderObjective",
    "Batches",
    "ClassificationObjective",
    "DenoisingObjective",
    "VPDenoisingObjective",
    "EMA",
    "EarlyStopping",
    "FitResult",
    "LoopConfig",
    "Trainer",
    "make_accelerator",
    "make_ema",
    "nan_last",
    "random_crop",
    "run_key",
    "train_step",
]
