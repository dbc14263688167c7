"""A training run for test_engine's kill-and-resume test: `python -m tests.resume_child KIND OUT [CHECKPOINTS]`.

KIND classifier: a noise-conditioned, distilled latent classifier (masking, noise, LDAM-DRW and early
stopping all active); KIND autoencoder: the built-in autoencoder. Writes OUT/weights.safetensors and
OUT/record.json (the step it resumed from, its scores or loss)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file


def main(kind: str, out: str, checkpoints: str | None) -> None:
    torch.set_num_threads(1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if kind == "classifier":
        from medlatent.classifiers import DeepClassifier, TrainConfig
        from medlatent.training import LoopConfig

        g = torch.Generator().manual_seed(0)
        x = torch.randn(96, 4, 8, 8, generator=g)
        y = (x[:, 0].mean((1, 2)) > 0).long().numpy()
        teacher = torch.stack([-x[:, 0].mean((1, 2)), x[:, 0].mean((1, 2))], 1) * 4
        cfg = TrainConfig(
            "resnet10t",
            loss="ldam",
            epochs=8,
            batch_size=8,
            patience=3,
            noise_conditioned=True,
            distill_alpha=0.5,
            loop=LoopConfig(checkpoint_every=1, ema_decay=0.9),
        )
        clf = DeepClassifier(cfg, latent_space=True, device="cpu", progress=False).fit(
            x[:64], y[:64], x[64:], y[64:], "binary", teacher_logits=teacher[:64], checkpoint_dir=checkpoints
        )
        state = clf.model_.state_dict()
        record = {
            "resumed_from_step": clf.resumed_from_step_,
            "probs": clf.predict_proba(x[64:]).tolist(),
            "best_epoch": clf.best_epoch_,
            "history": clf.history_,
        }
    else:
        from medlatent.autoencoders.builtin import BuiltinRecipe, train_autoencoder
        from medlatent.training import LoopConfig

        recipe = BuiltinRecipe(
            block_out_channels=(8, 16),
            dataset="synthetic:n_train=32,n_val=8,n_test=8",
            size=16,
            crop=8,
            steps=40,
            batch_size=4,
        )
        folder = train_autoencoder(
            recipe,
            out / "vae",
            device="cpu",
            progress=False,
            loop=LoopConfig(checkpoint_every=1),
            checkpoint_dir=checkpoints,
        )
        from safetensors.torch import load_file

        state = load_file(folder / "diffusion_pytorch_model.safetensors")
        record = json.loads((folder / "medlatent_training.json").read_text())
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(out / "weights.safetensors"))
    (out / "record.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
