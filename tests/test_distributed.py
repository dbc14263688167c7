"""Two CPU processes (gloo), launched as a cluster would launch them (torchrun; `accelerate launch`
uses the same variables): the same cache and the same audit results as one process."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], processes: int, cwd: Path, threads: str | None = "1") -> subprocess.CompletedProcess:
    """threads: OMP_NUM_THREADS for every process, or None to leave it to the launcher (torchrun
    gives each of several processes 1 thread; one process alone takes every CPU)."""
    launcher = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
        ]
        if processes > 1
        else [sys.executable]
    )
    env = {**{k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}, "PYTHONPATH": str(ROOT)}
    if threads is not None:
        env["OMP_NUM_THREADS"] = threads
    return subprocess.run([*launcher, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_write_the_same_cache_as_one(tmp_path):
    for processes in (1, 2):
        result = _run(["-m", "tests.distributed_child", str(tmp_path / f"cache{processes}")], processes, ROOT)
        assert result.returncode == 0, result.stderr[-3000:]
    (one,), (two,) = (list((tmp_path / f"cache{p}").iterdir()) for p in (1, 2))
    shards = sorted(f.name for f in one.glob("shard-*.safetensors"))
    assert len(shards) == 7 and shards == sorted(f.name for f in two.glob("shard-*.safetensors"))
    assert all((one / s).read_bytes() == (two / s).read_bytes() for s in shards)  # identical bytes
    meta = [json.loads((d / "meta.json").read_text()) for d in (one, two)]
    assert (meta[0]["encoded_now"], meta[1]["encoded_now"]) == (
        7,
        4,
    )  # the main process encoded shards 0, 2, 4, 6; the other 1, 3, 5
    for m in meta:
        m.pop("encode_seconds"), m.pop("encoded_now")
    assert meta[0] == meta[1]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_audit_gives_the_one_process_results_whatever_threads_the_launcher_sets(
    tmp_path, tiny_builtin_folder
):
    common = [
        "-m",
        "medlatent",
        "gap",
        "--dataset",
        "synthetic:n_train=48,n_val=16,n_test=40,lesion_size=0.12,lesion_contrast=0.5",
        "--size",
        "32",
        "--autoencoder",
        f"builtin:{tiny_builtin_folder}",
        "--folds",
        "2",
        "--seed",
        "0",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--bootstrap",
        "100",
        "--quiet",
    ]
    outputs = {}
    for processes in (1, 2):
        out = tmp_path / f"run{processes}"
        result = _run(
            [*common, "--out", str(out), "--cache-dir", str(tmp_path / f"cache{processes}")],
            processes,
            tmp_path,
            threads=None,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.count("wrote ") == 1  # the main process alone reports and writes
        outputs[processes] = json.loads((out / "results.json").read_text())
    one, two = outputs[1], outputs[2]
    threads = {run["provenance"]["reproducibility"]["cpu_threads"] for run in (one, two)}
    assert threads == {len(os.sched_getaffinity(0))}  # the launcher's OMP_NUM_THREADS=1 did not decide it
    assert two["rows"] == one["rows"]
    assert (
        two["trained_classifiers"] == one["trained_classifiers"] == 12
    )  # (image, reconstruction, latent) x (deep, linear) x 2 folds
    assert (one["processes"], two["processes"], one["gathered_classifiers"], two["gathered_classifiers"]) == (
        1,
        2,
        0,
        6,
    )  # one fold each
    first, second = np.load(tmp_path / "run1" / "predictions.npz"), np.load(tmp_path / "run2" / "predictions.npz")
    assert sorted(first.files) == sorted(second.files) and all(
        np.array_equal(first[k], second[k]) for k in first.files
    )


@pytest.mark.slow
@pytest.mark.distributed
def test_one_model_trains_with_ddp_across_two_processes(tmp_path):
    from safetensors.torch import load_file

    result = _run(["-m", "tests.distributed_child", "ddp", str(tmp_path)], 2, ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    # 64 samples, batch 8 per process, 2 epochs: 4 steps per epoch each, on its own half of every epoch
    assert sorted(re.findall(r"rank (\d) of (\d): (\d+) steps", result.stdout)) == [
        ("0", "2", "8"),
        ("1", "2", "8"),
    ]  # the two processes' lines, in either order
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # DDP kept the replicas equal
    assert (tmp_path / "checkpoint" / "checkpoint.pt").is_file()  # written once, by the main process
