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
    timing = cache.last_timing  # the breakdown benchmarks/encode.py prints: the writer saved 3 shards
    assert timing["save_seconds"] > 0 and 0 <= timing["encoder_blocked_seconds"] <= timing["encode_loop_seconds"]
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
    fresh = LatentCache(cache.root.parent / "fresh", shard_size=16, batch_size=8, progress=False).encode(
        dataset, "train", idx, ae, torch.device("cpu")
    )
    assert torch.allclose(entry.latents(), fresh.latents(), atol=1e-6)


def test_nan_input_leaves_no_complete_entry(setup):
    from medlatent.errors import MedlatentInputError

    dataset, ae, cache = setup
    dataset.images.array = dataset.images.array.astype(np.float32) / 255
    dataset.images.array[3, 0, 0] = np.nan
    with pytest.raises(MedlatentInputError, match="NaN or Inf"):
        cache.encode(dataset, "train", dataset.partitions["train"], ae, torch.device("cpu"))
    assert not list(cache.root.glob(f"*/{META}"))


def test_workers_give_the_same_entry(setup):
    """Reading in DataLoader workers (the CUDA default) changes nothing that is stored."""
    dataset, ae, cache = setup
    idx = dataset.partitions["train"]
    inline = cache.encode(dataset, "train", idx, ae, torch.device("cpu"))
    workers = LatentCache(cache.root.parent / "workers", shard_size=16, batch_size=8, progress=False, num_workers=2)
    threaded = workers.encode(dataset, "train", idx, ae, torch.device("cpu"))
    assert (
        workers.workers_for(torch.device("cpu")) == 2
        and LatentCache(num_workers="auto").workers_for(torch.device("cpu")) == 0
    )
    for name in ("latents", "reconstructions", "indices"):
        assert torch.equal(inline.read((name,))[name], threaded.read((name,))[name])
    assert inline.meta["channel_std"] == threaded.meta["channel_std"]


def test_nonfinite_latents_stop_the_writer(setup, monkeypatch):
    """A shard whose latents hold NaN is refused in the writer thread; the error reaches the caller,
    the shards before it stay, it is never written, and no meta.json is written."""
    dataset, ae, cache = setup
    calls = {"n": 0}
    original = ae.encode_raw

    def nan_in_third_batch(x):
        calls["n"] += 1
        z = original(x)
        return z * float("nan") if calls["n"] == 3 else z

    monkeypatch.setattr(ae, "encode_raw", nan_in_third_batch)
    with pytest.raises(FloatingPointError, match="NaN or Inf latents"):
        cache.encode(dataset, "train", dataset.partitions["train"], ae, torch.device("cpu"))
    (folder,) = cache.root.iterdir()
    written = {p.name for p in folder.iterdir()}
    assert "shard-00000.safetensors" in written and "shard-00001.safetensors" not in written and META not in written


def test_default_shards_keep_the_last_write_small():
    cache = LatentCache(batch_size=64)
    assert cache.shard_size_for(2048) == 256  # 8 shards: the unoverlapped last write is 1/8 of the data
    assert cache.shard_size_for(100_000) == 1024 and cache.shard_size_for(100) == 64
    assert LatentCache(shard_size=16).shard_size_for(2048) == 16


def test_8_bit_pixels_converted_on_the_device_give_the_same_entry(setup, monkeypatch):
    """The CUDA path copies 8-bit pixels and converts them on the device; forced here on the CPU,
    every stored byte is the same."""
    dataset, ae, cache = setup
    assert dataset.images.array.dtype == np.uint8
    idx = dataset.partitions["train"]
    host = cache.encode(dataset, "train", idx, ae, torch.device("cpu"))
    monkeypatch.setattr(LatentCache, "reads_uint8", staticmethod(lambda device, dataset: True))
    raw = LatentCache(cache.root.parent / "raw", shard_size=16, batch_size=8, progress=False).encode(
        dataset, "train", idx, ae, torch.device("cpu")
    )
    for name in ("latents", "reconstructions", "indices"):
        assert torch.equal(host.read((name,))[name], raw.read((name,))[name])


@pytest.mark.parametrize(
    "shape, size", [((5, 12, 12), 12), ((5, 12, 12, 3), 12), ((5, 20, 16, 3), 8), ((5, 9, 9), 16)]
)
def test_8_bit_conversion_on_a_tensor_equals_the_host_conversion(shape, size):
    from medlatent.data.base import to_float_images, uint8_to_float_images

    batch = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    assert torch.equal(uint8_to_float_images(torch.from_numpy(batch), size), to_float_images(batch, size))
