"""A corpus of corrupt, hostile and mistaken inputs to every command, each run as a new user would
run it (a fresh `python -m medlatent` process), with the totals a release must hold at zero:

    python benchmarks/bad_inputs.py [--keep DIR] [--only SUBSTRING]

Each case must end with exit code 2 and exactly one `medlatent: error:` line on stderr, nothing on
stdout, no code run from a hostile file, and every file of the user's still in place. Counted:
tracebacks (or any other exit code), bad values accepted (exit 0), noise (more than the one line),
files of the user's lost, and hostile payloads that ran.
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

SPEC = "synthetic:n_train=32,n_val=8,n_test=8"
D = ["--dataset", SPEC, "--size", "16"]


class Payload:
    """Unpickled without weights_only, it makes the folder `marker`: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def build(w: Path) -> dict[str, Path]:
    """Small, genuine artefacts made with medlatent itself, then damaged copies of them."""
    import torch
    from safetensors.torch import save_file

    import medlatent.api as api

    cache = str(w / "cache")
    api.diffusion_train(
        w / "ldm",
        "builtin:kl-f4-synthetic",
        device="cpu",
        progress=False,
        dataset=SPEC,
        size=16,
        cache_dir=cache,
        steps=2,
        batch_size=8,
    )
    common = dict(device="cpu", progress=False, dataset=SPEC, size=16, cache_dir=cache, epochs=1, batch_size=16)
    api.classifier_train(w / "latent-clf", space="latent", autoencoder="builtin:kl-f4-synthetic", **common)
    api.classifier_train(w / "image-clf", space="image", **common)
    api.autoencoder_train(
        w / "other-ae", steps=2, size=16, crop=16, batch_size=4, dataset=SPEC, device="cpu", progress=False
    )
    a = {name: w / name for name in ("ldm", "latent-clf", "image-clf", "other-ae")}

    def damaged(name: str, source: str, change) -> Path:
        folder = shutil.copytree(w / source, w / name)
        change(folder)
        return folder

    a["ldm-truncated"] = damaged(
        "ldm-truncated",
        "ldm",
        lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:100]),
    )
    a["ldm-no-config"] = damaged("ldm-no-config", "ldm", lambda f: (f / "config.json").unlink())
    a["ldm-bad-record"] = damaged("ldm-bad-record", "ldm", lambda f: (f / "diffusion.json").write_text("{not json"))
    a["ldm-list-record"] = damaged("ldm-list-record", "ldm", lambda f: (f / "diffusion.json").write_text("[1, 2]"))
    a["ldm-foreign-weights"] = damaged(
        "ldm-foreign-weights", "ldm", lambda f: save_file({"x": torch.zeros(2)}, str(f / "model.safetensors"))
    )
    a["clf-truncated"] = damaged(
        "clf-truncated",
        "image-clf",
        lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:64]),
    )
    a["clf-bad-estimator"] = damaged(
        "clf-bad-estimator", "latent-clf", lambda f: (f / "estimator.json").write_text('{"space": "latent"}')
    )
    a["clf-bad-scaler"] = damaged(
        "clf-bad-scaler", "latent-clf", lambda f: (f / "input_scaler.safetensors").write_bytes(b"\x00" * 40)
    )
    files = w / "files"
    files.mkdir()
    (files / "text.safetensors").write_text("not tensors")
    (files / "payload.pt").write_bytes(pickle.dumps(Payload(w / "PAYLOAD-RAN")))
    np.savez(files / "objects.npz", latents=np.array([{"a": 1}], dtype=object))
    (files / "empty.npz").write_bytes(b"")
    torch.save([1, 2, 3], files / "list.pt")
    save_file({"latents": torch.zeros(2, 7, 4, 4)}, str(files / "channels.safetensors"))
    save_file({"a": torch.zeros(2, 4, 4, 4), "b": torch.zeros(1)}, str(files / "two.safetensors"))
    save_file({"latents": torch.zeros(5)}, str(files / "flat.safetensors"))
    (files / "picture.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    (files / "list.yaml").write_text("- 1\n- 2\n")
    (files / "bad.yaml").write_text("epochs: [1,\n")
    (files / "unknown.yaml").write_text("epochz: 3\n")
    (files / "typed.yaml").write_text("epochs: many\n")
    (files / "results-other.json").write_text('{"kind": "medlatent.diffusion_classifier", "model": "m"}')
    (files / "results-list.json").write_text("[1]")
    (files / "taken.txt").write_text("the user's")
    (files / "bad.csv").write_text("path,label\nmissing.png,0\n")
    (files / "text.npz").write_text("not arrays")
    np.savez(files / "nokeys.npz", x=np.zeros(3))
    np.savez(files / "objects-medmnist.npz", train_images=np.array([{"a": 1}], dtype=object))
    (files / "bad.png").write_bytes(b"\x89PNG garbage")
    (files / "bad.dcm").write_bytes(b"DICM garbage")
    (files / "png.csv").write_text("path,label\nbad.png,0\nbad.png,1\n")
    (files / "dcm.csv").write_text("path,label\nbad.dcm,0\nbad.dcm,1\n")
    (files / "nolabel.csv").write_text("path\nbad.png\n")
    mine = w / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    (w / "vae-bin").mkdir()
    _pickled_vae(w / "vae-bin")
    checkpoint = w / ".ckpt-run.checkpoint"
    checkpoint.mkdir()
    (checkpoint / "checkpoint.pt").write_bytes(pickle.dumps(Payload(w / "PAYLOAD-RAN")))
    (w / "garbage_encoder.pth").write_bytes(pickle.dumps(Payload(w / "PAYLOAD-RAN")))
    torch.save({"0.weight": torch.zeros(8, 3)}, w / "linear_encoder.pth")
    return a


def _pickled_vae(folder: Path) -> None:
    from diffusers import AutoencoderKL

    AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        norm_num_groups=4,
        latent_channels=4,
    ).save_pretrained(folder, safe_serialization=False)


def cases(w: Path, a: dict[str, Path]) -> list[tuple[str, list[str]]]:
    f, ldm, lat, img = w / "files", str(a["ldm"]), str(a["latent-clf"]), str(a["image-clf"])
    out = str(w / "out")
    sample = ["diffusion", "sample", "--class", "nodule", "--n", "2", "--steps", "1"]
    score = ["score", "--classifier", lat, "--out", str(w / "p.csv")]
    evaluate = ["diffusion", "evaluate", "--model", ldm, "--classifier", img, "--n", "2", "--steps", "1"]
    cf = ["counterfactual", "--model", ldm, "--out", out, "--n", "2", "--steps", "1"]
    return [
        # gap, audit, augment
        ("gap: unknown dataset", ["gap", "--dataset", "nosuch:thing"]),
        ("gap: missing CSV image", ["gap", "--dataset", f"csv:{f / 'bad.csv'}", "--size", "16"]),
        ("gap: size too small", ["gap", "--size", "4"]),
        ("gap: MedMNIST file of text", ["gap", "--dataset", f"medmnist:{f / 'text.npz'}"]),
        ("gap: MedMNIST file without its arrays", ["gap", "--dataset", f"medmnist:{f / 'nokeys.npz'}"]),
        ("gap: MedMNIST file of objects", ["gap", "--dataset", f"medmnist:{f / 'objects-medmnist.npz'}"]),
        ("gap: unknown MedMNIST flag", ["gap", "--dataset", "medmnist:nosuchmnist"]),
        ("gap: CSV of a corrupt PNG", ["gap", "--dataset", f"csv:{f / 'png.csv'}", "--size", "16"]),
        ("gap: CSV of a corrupt DICOM", ["gap", "--dataset", f"csv:{f / 'dcm.csv'}", "--size", "16"]),
        ("gap: CSV without its label column", ["gap", "--dataset", f"csv:{f / 'nolabel.csv'}", "--size", "16"]),
        ("gap: missing CSV", ["gap", "--dataset", f"csv:{w / 'nosuch.csv'}"]),
        ("gap: zero epochs", ["gap", "--epochs", "0"]),
        ("gap: epochs not a number", ["gap", "--epochs", "many"]),
        ("gap: config not text", ["gap", "--config", str(f / "picture.yaml")]),
        ("gap: config a list", ["gap", "--config", str(f / "list.yaml")]),
        ("gap: config bad YAML", ["gap", "--config", str(f / "bad.yaml")]),
        ("gap: config unknown key", ["gap", "--config", str(f / "unknown.yaml")]),
        ("gap: config wrong type", ["gap", "--config", str(f / "typed.yaml")]),
        ("gap: missing config", ["gap", "--config", str(w / "nope.yaml")]),
        ("gap: out is the user's folder", ["gap", *D, "--out", str(w / "mine")]),
        ("gap: out is a file", ["gap", *D, "--out", str(f / "taken.txt")]),
        ("gap: hostile TAESD encoder", ["gap", *D, "--autoencoder", f"encoder:taesd:{w / 'garbage_encoder.pth'}"]),
        ("gap: non-TAESD layout", ["gap", *D, "--autoencoder", f"encoder:taesd:{w / 'linear_encoder.pth'}"]),
        ("gap: pickled hf folder", ["gap", *D, "--autoencoder", f"hf:{w / 'vae-bin'}", "--quiet"]),
        ("gap: unknown autoencoder kind", ["gap", *D, "--autoencoder", "zip:model"]),
        ("gap: val fraction 1", ["gap", "--val-fraction", "1"]),
        ("gap: negative lr", ["gap", "--lr", "-1"]),
        ("audit: unknown section", ["audit", *D, "--section", "everything"]),
        ("audit: out is the user's folder", ["audit", *D, "--out", str(w / "mine")]),
        ("augment: not a model", ["augment", "--model", str(w / "mine")]),
        ("augment: negative cfg", ["augment", "--model", ldm, "--cfg", "-1"]),
        # diffusion
        ("diffusion train: zero steps", ["diffusion", "train", "--out", out, *D, "--steps", "0"]),
        ("diffusion train: unknown preset", ["diffusion", "train", "--out", out, *D, "--preset", "huge"]),
        ("diffusion train: label dropout 1", ["diffusion", "train", "--out", out, *D, "--label-dropout", "1"]),
        (
            "diffusion train: hostile checkpoint",
            [
                "diffusion",
                "train",
                "--out",
                str(w / "ckpt-run"),
                *D,
                "--steps",
                "2",
                "--batch-size",
                "8",
                "--cache-dir",
                str(w / "cache"),
                "--quiet",
            ],
        ),
        (
            "diffusion train: pickled hf folder",
            ["diffusion", "train", "--autoencoder", f"hf:{w / 'vae-bin'}", "--out", out, *D, "--quiet"],
        ),
        (
            "diffusion train: out is the user's folder",
            ["diffusion", "train", "--out", str(w / "mine"), *D, "--steps", "1"],
        ),
        (
            "diffusion train: over a sample run",
            ["diffusion", "train", "--out", str(w / "made-sample"), *D, "--steps", "1", "--overwrite"],
        ),
        ("diffusion sample: the user's folder", [*sample, "--model", ldm, "--out", str(w / "mine")]),
        ("diffusion sample: out is a file", [*sample, "--model", ldm, "--out", str(f / "taken.txt")]),
        ("diffusion sample: out under a file", [*sample, "--model", ldm, "--out", str(f / "taken.txt" / "s")]),
        ("diffusion sample: finished run, no --overwrite", [*sample, "--model", ldm, "--out", str(w / "made-sample")]),
        ("diffusion sample: unknown class", [*sample, "--model", ldm, "--class", "tumour", "--out", out]),
        ("diffusion sample: negative cfg", [*sample, "--model", ldm, "--cfg", "-1", "--out", out]),
        ("diffusion sample: zero samples", [*sample, "--model", ldm, "--n", "0", "--out", out]),
        ("diffusion sample: drift not a number", [*sample, "--model", ldm, "--drift", "abc", "--out", out]),
        ("diffusion sample: unknown sampler", [*sample, "--model", ldm, "--sampler", "rk4", "--out", out]),
        ("diffusion sample: truncated weights", [*sample, "--model", str(a["ldm-truncated"]), "--out", out]),
        ("diffusion sample: missing config", [*sample, "--model", str(a["ldm-no-config"]), "--out", out]),
        ("diffusion sample: record not JSON", [*sample, "--model", str(a["ldm-bad-record"]), "--out", out]),
        ("diffusion sample: record a list", [*sample, "--model", str(a["ldm-list-record"]), "--out", out]),
        ("diffusion sample: foreign weights", [*sample, "--model", str(a["ldm-foreign-weights"]), "--out", out]),
        ("diffusion sample: not a model", [*sample, "--model", str(w / "mine"), "--out", out]),
        (
            "diffusion sample: guidance by an image classifier",
            [*sample, "--model", ldm, "--guidance-classifier", img, "--out", out],
        ),
        ("diffusion evaluate: zero samples", [*evaluate, "--n", "0"]),
        ("diffusion evaluate: negative cfg", [*evaluate, "--cfg", "-1"]),
        (
            "diffusion evaluate: latent judge",
            ["diffusion", "evaluate", "--model", ldm, "--classifier", lat, "--n", "2"],
        ),
        ("diffusion classify: zero draws", ["diffusion", "classify", "--model", ldm, "--draws", "0", "--out", out]),
        ("diffusion classify: alpha 1", ["diffusion", "classify", "--model", ldm, "--alpha", "1", "--out", out]),
        ("diffusion classify: bad sigma", ["diffusion", "classify", "--model", ldm, "--sigma", "wide", "--out", out]),
        ("diffusion classify: the user's folder", ["diffusion", "classify", "--model", ldm, "--out", str(w / "mine")]),
        # counterfactual
        ("counterfactual: unknown target", [*cf, "--target-class", "tumour"]),
        ("counterfactual: unknown source", [*cf, "--target-class", "normal", "--source-class", "tumour"]),
        ("counterfactual: strength 2", [*cf, "--target-class", "normal", "--strength", "2"]),
        ("counterfactual: bad drift grid", [*cf, "--target-class", "normal", "--drift-grid", "a:b"]),
        (
            "counterfactual: the user's folder",
            ["counterfactual", "--model", ldm, "--target-class", "normal", "--out", str(w / "mine")],
        ),
        # score
        ("score: text as safetensors", [*score, "--latents", str(f / "text.safetensors")]),
        ("score: pickle payload .pt", [*score, "--latents", str(f / "payload.pt")]),
        ("score: object npz", [*score, "--latents", str(f / "objects.npz")]),
        ("score: empty npz", [*score, "--latents", str(f / "empty.npz")]),
        ("score: a list in .pt", [*score, "--latents", str(f / "list.pt")]),
        ("score: wrong channels", [*score, "--latents", str(f / "channels.safetensors")]),
        ("score: two tensors", [*score, "--latents", str(f / "two.safetensors")]),
        ("score: flat tensor", [*score, "--latents", str(f / "flat.safetensors")]),
        (
            "score: out a folder",
            ["score", "--classifier", lat, "--latents", str(f / "channels.safetensors"), "--out", str(w / "mine")],
        ),
        (
            "score: out under a file",
            [
                "score",
                "--classifier",
                lat,
                "--latents",
                str(f / "channels.safetensors"),
                "--out",
                str(f / "taken.txt" / "p.csv"),
            ],
        ),
        (
            "score: image classifier",
            ["score", "--classifier", img, "--latents", str(f / "channels.safetensors"), "--out", str(w / "p.csv")],
        ),
        (
            "score: bad scaler",
            [
                "score",
                "--classifier",
                str(a["clf-bad-scaler"]),
                "--latents",
                str(f / "channels.safetensors"),
                "--out",
                str(w / "p.csv"),
            ],
        ),
        ("score: zero batch", [*score, "--latents", str(f / "channels.safetensors"), "--batch-size", "0"]),
        # classifier
        (
            "classifier train: out is a file",
            ["classifier", "train", "--out", str(f / "taken.txt"), "--space", "image", *D],
        ),
        (
            "classifier train: the user's folder",
            ["classifier", "train", "--out", str(w / "mine"), "--space", "image", *D],
        ),
        ("classifier train: unknown space", ["classifier", "train", "--out", out, "--space", "pixels", *D]),
        (
            "classifier train: init of another space",
            [
                "classifier",
                "train",
                "--out",
                out,
                "--space",
                "latent",
                "--autoencoder",
                "builtin:kl-f4-synthetic",
                "--init",
                img,
                *D,
            ],
        ),
        (
            "classifier train: zero batch",
            ["classifier", "train", "--out", out, "--space", "image", "--batch-size", "0", *D],
        ),
        ("classifier eval: truncated weights", ["classifier", "eval", str(a["clf-truncated"]), *D]),
        ("classifier eval: bad estimator", ["classifier", "eval", str(a["clf-bad-estimator"]), *D]),
        ("classifier eval: sigma not a number", ["classifier", "eval", img, "--sigma", "nonsense"]),
        (
            "classifier eval: another autoencoder",
            ["classifier", "eval", lat, "--autoencoder", f"builtin:{a['other-ae']}", *D, "--quiet"],
        ),
        ("classifier eval: missing argument", ["classifier", "eval"]),
        # autoencoder, report, bench
        ("autoencoder train: zero steps", ["autoencoder", "train", "--out", out, "--steps", "0"]),
        ("autoencoder train: unknown recipe", ["autoencoder", "train", "--out", out, "--recipe", "vq-f16"]),
        ("autoencoder train: crop not a multiple", ["autoencoder", "train", "--out", out, "--crop", "18"]),
        ("autoencoder train: the user's folder", ["autoencoder", "train", "--out", str(w / "mine"), "--steps", "1"]),
        ("report: no results", ["report", str(w / "mine")]),
        ("report: results of another kind, incomplete", ["report", str(f / "results-other.json")]),
        ("report: results a list", ["report", str(f / "results-list.json")]),
        ("bench classifiers: unknown decoder", ["bench", "classifiers", "--decoder", "sd"]),
        ("bench diffusion: unknown preset", ["bench", "diffusion", "--preset", "huge"]),
        ("bench diffusion: zero steps", ["bench", "diffusion", "--train-steps", "0"]),
        ("unknown option", ["gap", "--epochz", "3"]),
    ]


def snapshot(w: Path) -> dict[str, bytes]:
    """The user's own files, byte for byte."""
    return {str(p): p.read_bytes() for p in (w / "mine").rglob("*") if p.is_file()} | {
        "taken": (w / "files" / "taken.txt").read_bytes()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="Build the artefacts here (emptied first) and keep them.")
    parser.add_argument("--only", default="", help="Run only the cases whose name contains this.")
    args = parser.parse_args()
    w = args.keep or Path(tempfile.mkdtemp(prefix="medlatent-bad-inputs-"))
    shutil.rmtree(w, ignore_errors=True)  # artefacts built afresh each time
    w.mkdir(parents=True)
    artefacts = build(w)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "medlatent",
            "diffusion",
            "sample",
            "--model",
            str(artefacts["ldm"]),
            "--class",
            "nodule",
            "--n",
            "1",
            "--steps",
            "1",
            "--out",
            str(w / "made-sample"),
        ],
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    totals = {
        "cases": 0,
        "one clear line": 0,
        "tracebacks or other exit codes": 0,
        "bad values accepted": 0,
        "noise lines": 0,
        "files of the user's lost": 0,
        "payloads run": 0,
    }
    for name, argv in cases(w, artefacts):
        if args.only not in name:
            continue
        before = snapshot(w)
        proc = subprocess.run(
            [sys.executable, "-m", "medlatent", *argv], capture_output=True, text=True, env=env, cwd=w, timeout=600
        )
        lines = proc.stderr.strip().splitlines()
        verdict = "one clear line"
        if proc.returncode == 0:
            verdict = "bad values accepted"
        elif proc.returncode != 2 or "Traceback" in proc.stderr:
            verdict = "tracebacks or other exit codes"
        elif len(lines) != 1 or not lines[0].startswith("medlatent: error: ") or proc.stdout.strip():
            verdict = "noise lines"
        if snapshot(w) != before:
            verdict = "files of the user's lost"
        if (w / "PAYLOAD-RAN").exists():
            verdict = "payloads run"
            (w / "PAYLOAD-RAN").rmdir()
        totals["cases"] += 1
        totals[verdict] += 1
        shown = lines[-1] if lines else proc.stdout.strip().splitlines()[-1:] or ""
        print(f"{'ok  ' if verdict == 'one clear line' else 'FAIL'} {name}: exit {proc.returncode}: {shown}")
        shutil.rmtree(w / "out", ignore_errors=True)
    print("totals: " + ", ".join(f"{k} {v}" for k, v in totals.items()))
    if not args.keep:
        shutil.rmtree(w, ignore_errors=True)
    return 0 if totals["one clear line"] == totals["cases"] else 1


if __name__ == "__main__":
    sys.exit(main())
