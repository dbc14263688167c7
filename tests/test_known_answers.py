"""Audits with known answers, which a stub cannot pass: a lossless autoencoder has no fidelity gap,
a blurring one loses small lesions, and swapping the spaces is caught."""

from __future__ import annotations

import pytest

import medlatent

SMALL_LESIONS = "synthetic:n_train=160,n_val=40,n_test=160,lesion_size=0.06,lesion_contrast=0.6"


def _identity_run(tmp_path, name: str) -> dict:
    return medlatent.gap(
        dataset=SMALL_LESIONS,
        size=32,
        autoencoders=["reference:identity"],
        epochs=1,
        batch_size=32,
        bootstrap=100,
        progress=False,
        out=str(tmp_path / name),
        cache_dir=str(tmp_path / "cache"),
    )


def _check_identity(results: dict) -> None:
    """What a lossless autoencoder must give."""
    ae = results["autoencoders"][0]
    assert ae["latent_shape"] == [16, 8, 8]  # pixel unshuffle by 4 of 1 x 32 x 32
    assert ae["reconstruction_quality"]["mse"] == 0.0
    for row in results["rows"]:
        for metric, gap in row["gaps"]["fidelity"].items():
            if metric == "paired_test" or gap is None:
                continue
            assert gap["value"] == 0.0 and list(gap["ci95"]) == [0.0, 0.0], (row["model"], metric, gap)


def test_identity_autoencoder_has_a_fidelity_gap_of_exactly_zero(tmp_path):
    _check_identity(_identity_run(tmp_path, "identity"))


def test_swapping_latent_and_reconstruction_spaces_is_caught(tmp_path, monkeypatch):
    from medlatent.audits import gap

    encode = gap.encode_spaces

    def swapped(*args, **kwargs):
        entries, spaces = encode(*args, **kwargs)
        return entries, {"reconstruction": spaces["latent"], "latent": spaces["reconstruction"]}

    monkeypatch.setattr(gap, "encode_spaces", swapped)
    with pytest.raises((AssertionError, RuntimeError, ValueError)):
        _check_identity(_identity_run(tmp_path, "swapped"))


@pytest.mark.slow
def test_blurring_autoencoder_loses_small_lesions(tmp_path):
    results = medlatent.gap(
        dataset=SMALL_LESIONS,
        size=32,
        autoencoders=["reference:blur"],
        epochs=8,
        patience=8,
        batch_size=32,
        lr=3e-3,
        bootstrap=200,
        linear_probe=False,
        progress=False,
        out=str(tmp_path / "blur"),
        cache_dir=str(tmp_path / "cache"),
    )
    row = results["rows"][0]
    fidelity = row["gaps"]["fidelity"]["auroc"]
    assert fidelity["ci95"][0] > 0, (row["scores"], fidelity)  # seeds 0-2 on CPU: lower bounds 0.25, 0.24, 0.23
    assert results["autoencoders"][0]["reconstruction_quality"]["mse"] > 0


@pytest.mark.slow
def test_latents_stream_from_disk_under_a_memory_cap(tmp_path):
    """A dataset's latents are encoded and trained on without ever being held in memory: the peak
    resident memory the encode-and-train adds stays far below the size of the latents."""
    import subprocess
    import sys

    script = tmp_path / "capped.py"
    script.write_text(CAPPED.format(cache=str(tmp_path / "cache")))
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=600,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    latent_mb, peak_mb, auroc = map(float, result.stdout.split()[-3:])
    assert peak_mb < latent_mb / 4 and auroc > 0.6, (latent_mb, peak_mb, auroc)


CAPPED = """
import numpy as np, torch
from medlatent.autoencoders import load_autoencoder
from medlatent.cache import LatentCache
from medlatent.data.base import ImageDataset
from medlatent.training import ClassificationObjective, Trainer
from medlatent.training.losses import ClassificationLoss
from medlatent.evaluation.metrics import score

class Noise:  # images made on the fly: the dataset never sits in memory either
    def __init__(self, labels): self.labels = labels
    def __len__(self): return len(self.labels)
    def load(self, idx):
        out = torch.stack([torch.rand(1, 64, 64, generator=torch.Generator().manual_seed(int(i))) for i in idx])
        # the signal: a bright corner
        out[:, :, :8, :8] += torch.as_tensor(self.labels[idx], dtype=torch.float32).view(-1, 1, 1, 1) * 0.5
        return out.clamp(0, 1)

n = 48000  # 750 MiB of latents; encoding and training add about 100 MiB whatever the size
labels = np.arange(n) % 2
data = ImageDataset("noise", "binary", ["a", "b"], labels, Noise(labels), 64, 1, "noise-v1")
ae = load_autoencoder("reference:identity")
latent_bytes = n * 16 * 16 * 16 * 4

def status(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))

class Labelled(torch.utils.data.Dataset):
    def __init__(self, part): self.part = part
    def __len__(self): return len(self.part)
    def __getitem__(self, i): return {{**self.part[i], "y": torch.tensor(labels[self.part.positions[i]])}}

def fit(train_data):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(16, 8, 3),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 2),
    )
    objective = ClassificationObjective(ClassificationLoss("ce", "binary", np.array([1, 1]), 1))
    Trainer(device="cpu", progress=False).fit(model, objective, train_data, batch_size=32, lr=1e-2, epochs=1)
    return model

# Warm up in memory (libraries and kernels paged in), then count only what encoding and training add.
fit({{"x": torch.randn(64, 16, 16, 16), "y": torch.arange(64) % 2}})
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak resident memory mark
base = status("VmRSS")
entry = LatentCache("{cache}", shard_size=256, progress=False).encode(
    data, "all", np.arange(n), ae, torch.device("cpu"), reconstruct=False
)
mean, std = entry.channel_mean.view(1, -1, 1, 1), entry.channel_std.view(1, -1, 1, 1)
stream = entry.dataset(transform=lambda z: (z - mean) / std * 0.5)
train, test = np.arange(0, 4000), np.arange(n - 1000, n)  # read back from the first and the last shards
model = fit(Labelled(stream.subset(train)))
with torch.no_grad():
    probs = torch.cat(
        [model(b["x"]).softmax(1) for b in torch.utils.data.DataLoader(stream.subset(test), batch_size=100)]
    ).numpy()
print(latent_bytes / 2**20, (status("VmHWM") - base) / 2**20, score("binary", labels[test], probs)["auroc"])
"""
