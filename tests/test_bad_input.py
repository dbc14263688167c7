"""Every command under bad input: one `medlatent: error:` line on stderr, exit 2, nothing before it,
nothing of the user's lost, no half-written output."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

import medlatent.api as api
from medlatent.errors import MedlatentInputError

SPEC = "synthetic:n_train=32,n_val=8,n_test=8"


class Payload:
    """A pickle that would run code (make a folder) when unpickled without weights_only."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.mkdir, (self.marker,))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny latent diffusion model, a latent classifier and an image classifier of the default autoencoder."""
    root = tmp_path_factory.mktemp("bad-input")
    cache = str(root / "cache")
    api.diffusion_train(
        root / "ldm",
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
    api.classifier_train(root / "latent-clf", space="latent", autoencoder="builtin:kl-f4-synthetic", **common)
    api.classifier_train(root / "image-clf", space="image", **common)
    return root


@pytest.fixture
def one_line(capsys):
    """check(code): the command exited with `code` (2 by default) and printed exactly one error line, nothing else."""

    def check(code: int, *fragments: str, exit_code: int = 2) -> str:
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert code == exit_code, captured.err
        assert len(lines) == 1 and lines[0].startswith("medlatent: error: "), captured.err
        assert "Traceback" not in captured.err and captured.out == "", captured.out
        for fragment in fragments:
            assert fragment in lines[0], lines[0]
        return lines[0]

    return check


def copy_model(built, tmp_path, name="ldm"):
    import shutil

    return shutil.copytree(built / name, tmp_path / name)


# -- 1: nothing of the user's is ever deleted ---------------------------------------------------------


def test_sampling_into_a_folder_of_the_users_own_files_keeps_every_file(built, tmp_path, run_cli, one_line):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("years of work")
    code = run_cli(
        "diffusion",
        "sample",
        "--model",
        str(built / "ldm"),
        "--class",
        "nodule",
        "--n",
        "2",
        "--steps",
        "1",
        "--out",
        str(mine),
    )
    one_line(code, str(mine), "never deleted")
    assert (mine / "chapter1.tex").read_text() == "years of work"
    assert not (tmp_path / ".thesis.partial").exists()


@pytest.mark.parametrize("command", ["diffusion train", "classifier train", "autoencoder train", "diffusion sample"])
def test_finishing_a_folder_never_replaces_one_medlatent_did_not_write(tmp_path, command):
    from medlatent.rundir import finish_folder, partial_folder

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    tmp = partial_folder(mine)
    tmp.mkdir()
    with pytest.raises(MedlatentInputError, match="did not write"):
        finish_folder(tmp, mine, command)
    assert (mine / "notes.txt").read_text() == "mine"


def test_a_previous_run_is_replaced_only_with_overwrite_and_only_by_the_same_command(
    built, tmp_path, run_cli, one_line, capsys
):
    sample = [
        "diffusion",
        "sample",
        "--model",
        str(built / "ldm"),
        "--class",
        "nodule",
        "--n",
        "1",
        "--steps",
        "1",
        "--out",
        str(tmp_path / "s"),
    ]
    assert run_cli(*sample) == 0
    capsys.readouterr()
    one_line(run_cli(*sample), "--overwrite")
    assert run_cli(*sample, "--overwrite") == 0
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "00000.png",
        "grid.png",
        "latents.safetensors",
        "samples.json",
    ]
    with pytest.raises(MedlatentInputError, match="holds a `medlatent diffusion sample` run"):
        api.diffusion_train(tmp_path / "s", "builtin:kl-f4-synthetic", overwrite=True, dataset=SPEC, size=16, steps=1)


# -- 2, 3, 4: damaged and hostile files -----------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated weights", "missing config"])
def test_a_damaged_diffusion_model_folder_is_one_line(built, tmp_path, run_cli, one_line, damage):
    model = copy_model(built, tmp_path)
    if damage == "truncated weights":
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        (model / "config.json").unlink()
    code = run_cli("diffusion", "sample", "--model", str(model), "--class", "nodule", "--out", str(tmp_path / "s"))
    one_line(code, "train it again")


def test_a_truncated_classifier_is_one_line_in_classifier_eval(built, tmp_path, run_cli, one_line):
    clf = copy_model(built, tmp_path, "image-clf")
    weights = clf / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    one_line(
        run_cli("classifier", "eval", str(clf), "--dataset", SPEC, "--size", "16"),
        "model.safetensors",
        "train it again",
    )


@pytest.mark.parametrize(
    "name", ["text.safetensors", "payload.pt", "objects.npz", "empty.npz", "list.pt", "text.pt", "bare.npz"]
)
def test_score_refuses_unreadable_latent_files_in_one_line(built, tmp_path, run_cli, one_line, name):
    path = tmp_path / name
    if name == "text.safetensors":
        path.write_text("these are not tensors")
    elif name == "payload.pt":
        path.write_bytes(pickle.dumps(Payload(tmp_path / "ran")))
    elif name == "objects.npz":
        np.savez(path, latents=np.array([{"a": 1}], dtype=object))
    elif name == "empty.npz":
        path.write_bytes(b"")
    elif name == "text.pt":
        path.write_text("hello world")
    elif name == "bare.npz":
        with open(path, "wb") as handle:
            np.save(handle, np.zeros((2, 4, 4, 4), np.float32))
    else:
        torch.save([1, 2, 3], path)
    code = run_cli(
        "score", "--classifier", str(built / "latent-clf"), "--latents", str(path), "--out", str(tmp_path / "p.csv")
    )
    one_line(code, str(path))
    assert not (tmp_path / "ran").exists() and not (tmp_path / "p.csv").exists()


def test_a_replaced_training_checkpoint_is_one_line_and_runs_no_code(tmp_path, run_cli, one_line):
    from medlatent.training.engine import CHECKPOINT

    checkpoint = tmp_path / ".ldm.checkpoint"
    checkpoint.mkdir()
    (checkpoint / CHECKPOINT).write_bytes(pickle.dumps(Payload(tmp_path / "ran")))
    code = run_cli(
        "diffusion",
        "train",
        "--out",
        str(tmp_path / "ldm"),
        "--dataset",
        SPEC,
        "--size",
        "16",
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--cache-dir",
        str(tmp_path / "c"),
        "--quiet",
    )
    one_line(code, CHECKPOINT, "to train from the start")
    assert not (tmp_path / "ran").exists()


# -- 5: --out checked before any work ------------------------------------------------------------------


def test_out_naming_an_existing_file_is_refused_before_any_work(built, tmp_path, run_cli, one_line):
    taken = tmp_path / "taken.txt"
    taken.write_text("mine")
    one_line(
        run_cli("diffusion", "sample", "--model", str(built / "ldm"), "--class", "nodule", "--out", str(taken)),
        "an existing file",
    )
    one_line(
        run_cli("classifier", "train", "--out", str(taken), "--space", "image", "--dataset", SPEC, "--size", "16"),
        "an existing file",
    )
    assert taken.read_text() == "mine" and [p.name for p in tmp_path.iterdir()] == ["taken.txt"]  # no hidden .partial


def test_out_in_a_place_that_cannot_be_written_is_refused_before_any_work(
    built, tmp_path, run_cli, one_line, monkeypatch
):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line(
        run_cli(
            "score",
            "--classifier",
            str(built / "latent-clf"),
            "--latents",
            str(tmp_path),
            "--out",
            str(blocker / "p.csv"),
        ),
        "cannot write",
    )
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode: False if str(path) == str(locked) else real_access(path, mode)
    )  # root ignores modes
    one_line(
        run_cli("diffusion", "sample", "--model", str(built / "ldm"), "--class", "nodule", "--out", str(locked / "s")),
        "cannot write",
        "permission denied",
    )


# -- 6: numbers out of range --------------------------------------------------------------------------------


def test_evaluate_refuses_no_samples_and_a_negative_guidance_scale(built, tmp_path, run_cli, one_line):
    evaluate = ["diffusion", "evaluate", "--model", str(built / "ldm"), "--classifier", str(built / "image-clf")]
    one_line(run_cli(*evaluate, "--n", "0"), "--n 0")
    one_line(run_cli(*evaluate, "--cfg", "-1"), "--cfg -1")


def test_autoencoder_train_refuses_zero_steps_and_saves_nothing(tmp_path, run_cli, one_line):
    one_line(run_cli("autoencoder", "train", "--out", str(tmp_path / "ae"), "--steps", "0"), "--steps 0", ">= 1")
    assert not (tmp_path / "ae").exists()


# -- 7: a config file that is not text ------------------------------------------------------------------


def test_a_config_file_that_is_not_text_is_one_line(tmp_path, run_cli, one_line):
    png = tmp_path / "picture.yaml"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    one_line(run_cli("gap", "--config", str(png)), "not a text file")


# -- 8: classifiers of another space or autoencoder ---------------------------------------------------------


def test_init_from_a_classifier_of_another_space_is_refused_before_training(built, tmp_path, run_cli, one_line):
    code = run_cli(
        "classifier",
        "train",
        "--out",
        str(tmp_path / "c"),
        "--space",
        "latent",
        "--autoencoder",
        "builtin:kl-f4-synthetic",
        "--init",
        str(built / "image-clf"),
        "--dataset",
        SPEC,
        "--size",
        "16",
        "--cache-dir",
        str(tmp_path / "cache"),
    )
    one_line(code, "image-space classifier", "--space latent")


def test_eval_with_another_autoencoder_than_the_classifiers_is_refused(
    built, tmp_path, run_cli, one_line, tiny_builtin_folder
):
    code = run_cli(
        "classifier",
        "eval",
        str(built / "latent-clf"),
        "--autoencoder",
        f"builtin:{tiny_builtin_folder}",
        "--dataset",
        SPEC,
        "--size",
        "16",
        "--cache-dir",
        str(tmp_path / "cache"),
    )
    one_line(code, "builtin:kl-f4-synthetic", "give that autoencoder")


# -- 9: report of results it cannot draw ------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        {"kind": "medlatent.something_else"},
        {"kind": "medlatent.diffusion_classifier", "model": "m"},
        {"rows": "no"},
        [1, 2],
    ],
)
def test_report_of_results_it_cannot_draw_is_one_line(tmp_path, run_cli, one_line, content):
    (tmp_path / "results.json").write_text(json.dumps(content))
    one_line(run_cli("report", str(tmp_path)), "results.json")
    assert not (tmp_path / "report.html").exists()


# -- 10, 11: bench choices and typed values ---------------------------------------------------------------


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("bench", "classifiers", "--decoder", "sd"), "--decoder sd"),
        (("bench", "diffusion", "--preset", "huge"), "--preset huge"),
    ],
)
def test_bench_choices_are_checked_in_one_line(run_cli, one_line, args, fragment):
    one_line(run_cli(*args), fragment, "one of")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("diffusion", "sample", "--model", "m", "--class", "a", "--out", "o", "--drift", "abc"), "--drift"),
        (("classifier", "eval", "m", "--sigma", "nonsense"), "--sigma"),
        (("gap", "--epochs", "many"), "--epochs"),
        (("diffusion", "sample", "--model", "m"), "--class"),
    ],
)
def test_a_value_of_the_wrong_type_is_one_line_without_a_usage_block(run_cli, one_line, args, fragment):
    line = one_line(run_cli(*args), fragment)
    assert "Usage:" not in line


def test_the_usage_line_names_arguments_in_capitals(run_cli, capsys):
    assert run_cli("classifier", "eval", "--help") == 0
    assert "{model}" not in capsys.readouterr().out


# -- 12, 13: no library notices, the option the user gave --------------------------------------------------


@pytest.mark.slow
def test_a_folder_of_pickled_weights_is_refused_before_any_library_notice(tmp_path):
    import subprocess
    import sys

    from tests.conftest import tiny_kl

    tiny_kl().save_pretrained(tmp_path / "vae", safe_serialization=False)
    assert not list((tmp_path / "vae").glob("*.safetensors"))
    out = tmp_path / "ldm"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "medlatent",
            "diffusion",
            "train",
            "--autoencoder",
            f"hf:{tmp_path / 'vae'}",
            "--out",
            str(out),
            "--quiet",
            "--dataset",
            SPEC,
        ],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "no .safetensors weights" in proc.stderr, (
        proc.stderr
    )


@pytest.mark.parametrize("option", ["--source-class", "--target-class"])
def test_counterfactual_names_the_class_option_the_user_gave(built, tmp_path, run_cli, one_line, option):
    classes = {"--source-class": "nodule", "--target-class": "normal"} | {option: "tumour"}
    args = [arg for name, value in classes.items() for arg in (name, value)]
    one_line(
        run_cli("counterfactual", "--model", str(built / "ldm"), *args, "--out", str(tmp_path / "cf")),
        option,
        "tumour",
    )


# -- what a second reader found ------------------------------------------------------------------------


def test_a_users_folder_with_a_file_named_like_a_record_is_never_taken(tmp_path):
    from medlatent.rundir import check_out, finish_folder, partial_folder

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "samples.json").write_text('{"my": "notes"}')
    tmp = partial_folder(mine)
    tmp.mkdir()
    with pytest.raises(MedlatentInputError, match="did not write"):
        check_out(mine, "diffusion sample", overwrite=True)
    with pytest.raises(MedlatentInputError, match="did not write"):
        finish_folder(tmp, mine, "diffusion sample")
    assert (mine / "samples.json").read_text() == '{"my": "notes"}'


def test_out_as_the_current_folder_or_a_link_is_refused_where_the_folder_is_built_beside(tmp_path, monkeypatch):
    from medlatent.rundir import check_out

    monkeypatch.chdir(tmp_path)
    for out in (".", "./", ".."):
        with pytest.raises(MedlatentInputError, match="the folder you are in"):
            check_out(out, "diffusion sample")
    assert check_out(".", "gap", resumable=True) == tmp_path.joinpath(".").relative_to(
        tmp_path
    )  # an audit writes inside
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(MedlatentInputError, match="symbolic link"):
        check_out(tmp_path / "link", "classifier train", overwrite=True)


def test_an_existing_writable_folder_under_a_locked_parent_is_accepted(tmp_path, monkeypatch):
    import os

    from medlatent.rundir import check_out

    out = tmp_path / "volume"
    out.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode: False if str(path) == str(tmp_path) else real_access(path, mode)
    )
    assert check_out(out, "gap", resumable=True) == out


def test_a_mark_being_written_by_another_process_is_not_a_users_file(tmp_path):
    from medlatent.rundir import MARK, check_out

    out = tmp_path / "run"
    out.mkdir()
    (out / f".{MARK}.abc123.tmp").write_text("")
    assert check_out(out, "gap", resumable=True) == out


def test_counterfactual_settings_from_yaml_or_python_numbers_and_an_empty_strength(tmp_path):
    from medlatent.audits.config import CounterfactualConfig
    from medlatent.config import from_flat

    config = from_flat(CounterfactualConfig, {"model": "m", "target-class": 1, "drift": [0.1, "auto"], "judge": "j"})
    assert config.target_class == "1" and config.drifts == ["0.1", "auto"]
    with pytest.raises(MedlatentInputError, match="--strength"):
        from_flat(CounterfactualConfig, {"model": "m", "target-class": "a", "strength": []})
