"""Training health: a classifier that did not learn must not pass as a result.

A deep classifier is flagged when its validation balanced accuracy never leaves chance, when its
best epoch is the first (of several), or when its test predictions are nearly constant; a linear
probe by the last check alone. A gap that rests on a flagged classifier is marked unreliable.
"""

from __future__ import annotations

import numpy as np

CHANCE_MARGIN = 0.02  # validation balanced accuracy at most chance + this counts as "never left chance"
CONSTANT_RANGE = 0.1  # every class probability within this range over the test set counts as constant
ADVICE = "train longer (--epochs, --patience), try another --lr, or a class-balanced --loss (cb, ldam)"


def chance_balanced_accuracy(task: str, num_outputs: int) -> float:
    return 0.5 if task == "multilabel" else 1.0 / num_outputs


def health_flags(
    task: str,
    probs: np.ndarray,
    history: dict[str, np.ndarray] | None = None,
    best_epoch: int | None = None,
    warm_start: bool = False,
) -> list[str]:
    """Reasons to distrust one trained classifier (empty when none).

    history: per-epoch arrays with "val_balanced_accuracy" (deep models); probs: test predictions;
    warm_start: training started from a trained classifier, where a best first epoch is no alarm."""
    flags = []
    if history is not None and len(history.get("val_balanced_accuracy", ())):
        val = np.nan_to_num(np.asarray(history["val_balanced_accuracy"], float), nan=0.0)
        chance = chance_balanced_accuracy(task, probs.shape[1])
        if val.max() <= chance + CHANCE_MARGIN:
            flags.append(f"validation balanced accuracy never left chance (best {val.max():.3f}, chance {chance:.3f})")
        if best_epoch == 0 and len(val) > 1 and not warm_start:
            flags.append(f"best epoch is the first of {len(val)}")
        if best_epoch == -1:
            flags.append(
                f"no epoch of {len(val)} beat its starting weights on "
                "validation: the result is the classifier it started from"
            )
    spread = float(np.ptp(probs, axis=0).max()) if len(probs) else 0.0
    if spread < CONSTANT_RANGE:
        flags.append(f"nearly constant test predictions (probabilities within {spread:.3f})")
    elif task != "multilabel" and len(np.unique(probs.argmax(1))) == 1:
        flags.append("predicts one class for every test sample")
    return flags
