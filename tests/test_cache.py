from __future__ import annotations

import numpy as np
import pytest
import torch

from medlatent.autoencoders import load_autoencoder
from medlatent.cache import META, LatentCache
from medlatent.data import make_synthetic


@pytest.fixture
def setup(tiny_kl_folder, tmp_path):
    dataset = make_synthetic(16, n_train=40, n_val=4, n_test=4)
    ae = load_autoencoder(f"hf:{tiny_kl_folder}")
    cache = LatentCache(tmp_path / "cache", shard_size=16, batch_size=8, progress=False)
    return dataset, ae, cache


def test_encode_once_and_statistics(setup):
    dataset, ae, cache = setup
    idx = dataset.partitions["train"]
    entry = cache.encode(dataset, "train", idx, ae, torch.device("cpu"))
    assert entry.meta["num_shards"] == 3 and (entry.folder / META).is_file()
    z = entry.latents()
    assert z.shape == (40, 4, 8, 8)
    assert np.array_equal(entry.indices(), idx)
    assert torch.allclose(entry.channel_mean, z.mean((0, 2, 3)), atol=1e-5)
    # Latents equal a direct encode of the prepared images (grayscale -> RGB).
    with torch.no_grad():
        direct = ae.encode(ae.prepare(dataset.load(idx[:8])))
    assert torch.allclose(z[:8], direct, atol=1e-5)
    recon = entry.reconstructions()
    assert recon.shape == (40, 1, 16, 16) and recon.min() >= 0 and recon.max() <= 1
    again = cache.encode(dataset, "train", idx, ae, torch.device("cpu"))
    assert again.folder == entry.folder and again.meta == entry.meta


def test_key_changes_with_inputs(setup, tiny_kl_folder):
    dataset, ae, cache = setup
    idx = dataset.partitions["train"]
    base = cache.encode(dataset, "train", idx, ae, torch.device("cpu")).folder
    assert cache.encode(dataset, "train", idx[:-1], ae, torch.device("cpu")).folder != base
    bigger = make_synthetic(24, n_train=40, n_val=4, n_test=4)
    assert cache.encode(bigger, "train", idx, ae, torch.device("cpu")).folder != base
    ae.scaling_factor = 0.25
    assert cache.encode(dataset, "train", idx, ae, torch.device("cpu")).folder != base


def test_resume_after_interrupted_encode(setup, monkeypatch):
    dataset, ae, cache = setup
    idx = dataset.partitions["train"]
    calls = {"n": 0}
    original = ae.encode_raw

    def crash_on_third_batch(x):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return original(x)

    monkeypatch.setattr(ae, "encode_raw", crash_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        cache.encode(dataset, "train", idx, ae, torch.device("cpu"))
    folders = list(cache.root.iterdir())
    assert len(folders) == 1
    assert not (folders[0] / META).exists()  # incomplete entries never look complete
    assert sorted(p.name for p in folders[0].iterdir() if not p.name.startswith(".")) == ["shard-00000.safetensors"]

    monkeypatch.setattr(ae, "encode_raw", original)
    entry = cache.encode(dataset, "train", idx, ae, torch.device("cpu"))
    assert entry.meta["encoded_now"] == 2  # only the two missing shards
    fresh = LatentCache(cache.root.parent / "fresh", shard_size=16, batch_size=8, progress=False).encode(dataset, "train", idx, ae, torch.device("cpu"))
    assert torch.allclose(entry.latents(), fresh.latents(), atol=1e-6)


def test_nan_input_leaves_no_complete_entry(setup):
    from medlatent.errors import MedlatentInputError

    dataset, ae, cache = setup
    dataset.images.array = dataset.images.array.astype(np.float32) / 255
    dataset.images.array[3, 0, 0] = np.nan
    with pytest.raises(MedlatentInputError, match="NaN or Inf"):
        cache.encode(dataset, "train", dataset.partitions["train"], ae, torch.device("cpu"))
    assert not list(cache.root.glob(f"*/{META}"))
