"""`medlatent score` / `LatentScorer`: the fast path for scoring latents with a saved classifier."""

import csv

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import medlatent.api as api
from medlatent.errors import MedlatentInputError

SPEC = "synthetic:n_train=32,n_val=8,n_test=8"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    api.classifier_train(
        root / "clf",
        space="latent",
        autoencoder="builtin:kl-f4-synthetic",
        device="cpu",
        progress=False,
        dataset=SPEC,
        size=16,
        cache_dir=str(root / "cache"),
        noise_conditioned=True,
        epochs=1,
        batch_size=16,
    )
    from medlatent.autoencoders import load_autoencoder
    from medlatent.data import load_dataset

    images = load_dataset(SPEC, 16).load(np.arange(12))
    with torch.no_grad():
        latents = load_autoencoder("builtin:kl-f4-synthetic", device="cpu").encode(images)
    return root, images, latents


def test_scores_equal_the_classifiers_own_predictions_for_every_latent_format(trained, tmp_path):
    from medlatent.classifiers import DeepClassifier

    root, _, latents = trained
    folder = tmp_path / "latents"
    folder.mkdir()
    save_file({"latents": latents[:5].contiguous()}, str(folder / "a.safetensors"))
    np.savez(folder / "b.npz", latents[5:9].numpy())
    torch.save(latents[9], folder / "c.pt")  # one latent, (C, h, w)
    result = api.score(
        classifier=root / "clf", latents=folder, out=tmp_path / "p.csv", batch_size=4, device="cpu", progress=False
    )
    assert result == {"out": str(tmp_path / "p.csv"), "latents": 10, "files": 3, "compiled": False, "device": "cpu"}
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert [r["index"] for r in rows] == ["0", "1", "2", "3", "4", "0", "1", "2", "3", "0"]
    clf = DeepClassifier.from_pretrained(root / "clf", device="cpu")
    expected = clf.predict_proba(clf.input_scaler.transform(latents[:10]))
    got = np.array([[float(r["p_0"]), float(r["p_1"])] for r in rows])
    assert np.allclose(got, expected, atol=1e-5)
    import json

    record = json.loads((tmp_path / "p.csv.json").read_text())  # the output's provenance, beside it
    assert (
        record["config"]["batch_size"] == 4
        and record["classifier"]["autoencoder"]["spec"] == "builtin:kl-f4-synthetic"
    )
    assert "medlatent" in record and "packages" in record


def test_image_files_are_encoded_with_the_classifiers_autoencoder(trained, tmp_path):
    from PIL import Image

    root, images, latents = trained
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.fromarray((images[i, 0].numpy() * 255 + 0.5).astype(np.uint8)).save(folder / f"{i}.png")
    api.score(
        classifier=root / "clf",
        latents=folder,
        out=tmp_path / "p.npz",
        autoencoder="builtin:kl-f4-synthetic",
        size=16,
        device="cpu",
        progress=False,
    )
    from_images = np.load(tmp_path / "p.npz")["probs"]
    assert "provenance" in np.load(tmp_path / "p.npz").files
    api.score(
        classifier=root / "clf",
        latents=_saved(latents[:4], tmp_path),
        out=tmp_path / "q.npz",
        device="cpu",
        progress=False,
    )
    assert np.allclose(
        from_images, np.load(tmp_path / "q.npz")["probs"], atol=0.02
    )  # 8-bit PNGs: nearly the same latents
    with pytest.raises(MedlatentInputError, match="--size"):
        api.score(
            classifier=root / "clf",
            latents=folder,
            out=tmp_path / "r.csv",
            autoencoder="builtin:kl-f4-synthetic",
            device="cpu",
            progress=False,
        )


def test_bad_inputs_are_refused_before_anything_is_written(trained, tmp_path):
    root, _, latents = trained
    with pytest.raises(MedlatentInputError, match=r"reads \(n, 4, h, w\)"):
        api.score(
            classifier=root / "clf",
            latents=_saved(torch.zeros(2, 3, 4, 4), tmp_path),
            out=tmp_path / "p.csv",
            device="cpu",
            progress=False,
        )
    with pytest.raises(MedlatentInputError, match="--out"):
        api.score(
            classifier=root / "clf",
            latents=_saved(latents[:2], tmp_path),
            out=tmp_path / "p.txt",
            device="cpu",
            progress=False,
        )
    with pytest.raises(MedlatentInputError, match="no such file"):
        api.score(
            classifier=root / "clf", latents=tmp_path / "missing", out=tmp_path / "p.csv", device="cpu", progress=False
        )
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_compiled_bf16_scorer_matches_eager_on_cuda(trained):
    from medlatent.classifiers.scorer import LatentScorer

    root, _, latents = trained
    z = latents.repeat(20, 1, 1, 1)
    eager = LatentScorer(root / "clf", device="cuda", batch_size=64, compile=False, progress=False).predict_proba(z)
    compiled = LatentScorer(root / "clf", device="cuda", batch_size=64, compile=True, progress=False).predict_proba(
        z
    )  # last batch padded
    assert (
        compiled.shape == eager.shape and np.abs(compiled - eager).max() < 0.02
    )  # bf16 both; graphs vs eager kernels


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_scorer_never_waits_for_the_gpu_between_batches(trained):
    """A noise-conditioned classifier's sigma (a number) was copied to the GPU at every batch, and
    each batch's probabilities were copied back: two waits per batch. Synchronising calls (warned by
    CUDA's sync debug mode) may not grow with the number of batches."""
    import warnings

    from medlatent.classifiers.scorer import LatentScorer

    root, _, latents = trained
    scorer = LatentScorer(root / "clf", device="cuda", batch_size=12, progress=False)

    def synchronising_calls(batches: int) -> int:
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                scorer.predict_proba(latents.repeat(batches, 1, 1, 1))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    synchronising_calls(2)  # warm-up
    assert synchronising_calls(12) == synchronising_calls(4)


def _saved(latents: torch.Tensor, folder):
    path = folder / f"z{len(list(folder.glob('z*')))}.safetensors"
    save_file({"latents": latents.contiguous()}, str(path))
    return path


def test_the_scorer_benchmark_times_a_saved_classifier(trained, capsys):
    import runpy
    from pathlib import Path

    bench = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "score.py"))
    root, _, latents = trained
    bench["main"](
        [
            "--classifier",
            str(root / "clf"),
            "--n",
            "64",
            "--batch-size",
            "16",
            "--batch-size",
            "64",
            "--latent-size",
            str(latents.shape[-1]),
            "--device",
            "cpu",
        ]
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if "latents/s" in line]
    assert len(lines) == 2 and all(float(line.split(":")[-1].split()[0].replace(",", "")) > 0 for line in lines)
