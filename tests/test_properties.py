"""Property-based tests of the readers at the boundary: any YAML config, autoencoder or dataset spec
and CSV manifest gives a result or one clear MedlatentInputError, never another exception."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medlatent.errors import MedlatentInputError

FAST = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
KEYS = [
    "epochs",
    "batch-size",
    "batch_size",
    "seed",
    "seeds",
    "lr",
    "size",
    "dataset",
    "autoencoder",
    "folds",
    "interval",
    "loss",
    "stream",
    "threads",
    "out",
    "nosuch",
    "",
]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=4), SCALARS, max_size=2))


def one_clear_error(call):
    """call() returns, or raises one MedlatentInputError of one line."""
    try:
        return call()
    except MedlatentInputError as err:
        assert str(err) and "\n" not in str(err).strip(), str(err)
        return None


@FAST
@given(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=5))
def test_any_yaml_mapping_is_a_config_or_one_clear_error(values):
    from medlatent.api import load_config

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(yaml.safe_dump(values))
        config = one_clear_error(lambda: load_config(path, {}))
    if config is not None:
        assert config.train.epochs >= 1 and config.data.size >= 8


@FAST
@given(st.one_of(st.text(max_size=40), st.binary(max_size=40).map(lambda b: b.decode("latin-1"))))
def test_any_config_text_is_a_config_or_one_clear_error(text):
    from medlatent.api import load_config

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_bytes(
            text.encode("utf-8", "surrogateescape") if text.isprintable() else text.encode("latin-1", "replace")
        )
        one_clear_error(lambda: load_config(path, {}))


AE_KINDS = ["hf", "taesd", "builtin", "reference", "timm", "encoder", "medvae", "zip", ""]
TARGET = st.text(alphabet="abc:/._-,=0123456789 ", max_size=16)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(AE_KINDS), TARGET)
def test_any_autoencoder_spec_is_an_autoencoder_or_one_clear_error(kind, target):
    from medlatent.autoencoders import load_autoencoder

    spec = f"{kind}:{target}" if kind else target
    if spec.strip(":").startswith(("builtin:kl-", "encoder:builtin:kl-")):  # a named recipe trains itself on first use
        return
    one_clear_error(lambda: load_autoencoder(spec, device="cpu", progress=False))


SYNTHETIC_KEYS = ["n_train", "n_val", "n_test", "lesion_size", "lesion_contrast", "seed", "nosuch", ""]
SMALL = st.text(alphabet="0123456789.-e", min_size=0, max_size=3)


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(["synthetic", "medmnist", "csv", "nosuch", ""]),
    st.lists(st.tuples(st.sampled_from(SYNTHETIC_KEYS), SMALL), max_size=3),
    st.text(max_size=8),
)
def test_any_dataset_spec_is_a_dataset_or_one_clear_error(kind, options, other):
    from medlatent.data import load_dataset

    target = ",".join(f"{k}={v}" for k, v in options) if kind == "synthetic" else other
    dataset = one_clear_error(lambda: load_dataset(f"{kind}:{target}", 16))
    if dataset is not None:
        assert len(dataset) == len(dataset.labels) and bool(
            dataset.load(np.arange(min(2, len(dataset)))).isfinite().all()
        )


CELLS = st.one_of(
    st.sampled_from(
        [
            "a.png",
            "b.png",
            "missing.png",
            "../a.png",
            "",
            "0",
            "1",
            "2",
            "-1",
            "x",
            "1.5",
            "train",
            "val",
            "test",
            "p1",
        ]
    ),
    st.text(max_size=5),
)


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("pngs")
    for name, value in (("a.png", 40), ("b.png", 200)):
        Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(folder / name)
    return folder


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    header=st.lists(st.sampled_from(["path", "label", "patient", "split", "extra", ""]), min_size=0, max_size=4),
    rows=st.lists(st.lists(CELLS, min_size=0, max_size=4), max_size=6),
    label_columns=st.one_of(
        st.none(), st.lists(st.sampled_from(["label", "extra", "nosuch"]), min_size=1, max_size=2)
    ),
    task=st.sampled_from([None, "binary", "multiclass", "multilabel", "ordinal", "regression"]),
)
def test_any_csv_manifest_is_a_dataset_or_one_clear_error(pngs, header, rows, label_columns, task):
    import csv

    from medlatent.data.manifest import load_manifest

    path = pngs / "manifest.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    split = "split" if "split" in header else None
    patient = "patient" if "patient" in header else None
    dataset = one_clear_error(
        lambda: load_manifest(
            path, 16, label_columns=label_columns, split_column=split, patient_column=patient, task=task
        )
    )
    if dataset is not None:
        assert len(dataset) == len(rows) and dataset.load(np.arange(len(dataset))).shape[-2:] == (16, 16)
