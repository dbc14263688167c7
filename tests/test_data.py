from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from medlatent.data import load_dataset, load_manifest, make_splits, make_synthetic, read_image
from medlatent.errors import MedlatentInputError


def test_synthetic_is_deterministic_and_parametrised():
    a = make_synthetic(32, n_train=20, n_val=4, n_test=8, seed=3)
    b = make_synthetic(32, n_train=20, n_val=4, n_test=8, seed=3)
    c = make_synthetic(32, n_train=20, n_val=4, n_test=8, seed=4)
    idx = np.arange(len(a))
    assert torch.equal(a.load(idx), b.load(idx))
    assert not torch.equal(a.load(idx), c.load(idx))
    assert a.fingerprint == b.fingerprint != c.fingerprint
    x = a.load(idx)
    assert x.shape == (32, 1, 32, 32) and x.min() >= 0 and x.max() <= 1
    assert set(a.partitions) == {"train", "val", "test"} and len(a.partitions["test"]) == 8


def test_synthetic_lesion_is_the_class_signal():
    """Same anatomy (same seed), no noise: a positive differs from a negative only by one local blob."""
    from medlatent.data.synthetic import SyntheticConfig, render_radiographs

    config = SyntheticConfig(noise=0.0, lesion_contrast=0.3, lesion_size=0.07)
    neg = render_radiographs(np.zeros(8, int), 64, config, np.random.default_rng(1)).astype(float) / 255
    pos = render_radiographs(np.ones(8, int), 64, config, np.random.default_rng(1)).astype(float) / 255
    diff = pos - neg
    assert diff.min() >= -1 / 255 - 1e-9
    assert np.all(diff.max((1, 2)) > 0.15)  # the nodule is visible
    assert np.all((diff > 0.05).mean((1, 2)) < 0.03)  # and local: under 3% of the image
    assert neg.max() < 1.0  # anatomy does not saturate


def test_synthetic_spec_options_and_errors():
    ds = load_dataset("synthetic:n_train=10,n_val=2,n_test=4,lesion_size=0.1", 32)
    assert len(ds) == 16 and ds.source["lesion_size"] == 0.1
    with pytest.raises(MedlatentInputError, match="unknown synthetic option"):
        load_dataset("synthetic:bogus=1", 32)
    with pytest.raises(MedlatentInputError, match="unknown data source"):
        load_dataset("foo:bar", 32)


def _write_npz(path, n=(12, 4, 6), size=28, labels_dim=1, classes=2, rgb=False):
    rng = np.random.default_rng(0)
    arrays = {}
    for part, count in zip(("train", "val", "test"), n, strict=False):
        shape = (count, size, size, 3) if rgb else (count, size, size)
        arrays[f"{part}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        if labels_dim == 1:
            arrays[f"{part}_labels"] = (np.arange(count) % classes).astype(np.uint8)[:, None]
        else:
            arrays[f"{part}_labels"] = rng.integers(0, 2, (count, labels_dim)).astype(np.uint8)
    np.savez(path, **arrays)
    return path


def test_medmnist_npz_binary_official_split(tmp_path):
    path = _write_npz(tmp_path / "pneumoniamnist.npz")
    ds = load_dataset(f"medmnist:{path}", 32)
    assert ds.task == "binary" and ds.class_names == ["normal", "pneumonia"]
    assert {k: len(v) for k, v in ds.partitions.items()} == {"train": 12, "val": 4, "test": 6}
    assert ds.load(np.arange(3)).shape == (3, 1, 32, 32)
    split = make_splits(ds)[0]
    assert split.name == "official" and len(split.test) == 6


def test_medmnist_multilabel_multiclass_ordinal_rgb(tmp_path):
    chest = load_dataset(f"medmnist:{_write_npz(tmp_path / 'chestmnist.npz', labels_dim=14)}", 28)
    assert chest.task == "multilabel" and chest.labels.shape[1] == 14
    derma = load_dataset(f"medmnist:{_write_npz(tmp_path / 'dermamnist.npz', classes=7, rgb=True)}", 28)
    assert derma.task == "multiclass" and derma.channels == 3 and derma.load([0]).shape == (1, 3, 28, 28)
    retina = load_dataset(f"medmnist:{_write_npz(tmp_path / 'retinamnist.npz', classes=5, rgb=True)}", 28)
    assert retina.task == "ordinal" and len(retina.class_names) == 5


def test_medmnist_bad_inputs(tmp_path, monkeypatch):
    with pytest.raises(MedlatentInputError, match="unknown MedMNIST flag"):
        load_dataset("medmnist:notadataset", 28)
    bad = tmp_path / "breastmnist.npz"
    np.savez(bad, train_images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(MedlatentInputError, match="missing arrays"):
        load_dataset(f"medmnist:{bad}", 28)
    (tmp_path / "w").mkdir()
    wrong = _write_npz(tmp_path / "w" / "breastmnist.npz", classes=3)
    with pytest.raises(MedlatentInputError, match="labels must lie in 0..1"):
        load_dataset(f"medmnist:{wrong}", 28)
    # No network here: a flag whose file is absent must fail with one clear line, leaving no partial file.
    monkeypatch.setenv("MEDMNIST_ROOT", str(tmp_path / "root"))
    monkeypatch.setattr(
        "torchvision.datasets.utils.download_url", lambda *a, **k: (_ for _ in ()).throw(OSError("offline"))
    )
    with pytest.raises(MedlatentInputError, match="could not download breastmnist_64.npz"):
        load_dataset("medmnist:breastmnist", 64)
    assert not (tmp_path / "root" / "breastmnist_64.npz").exists()


def _manifest(tmp_path, rows, header="path,label,patient"):
    csv = tmp_path / "labels.csv"
    csv.write_text(header + "\n" + "\n".join(rows) + "\n")
    return csv


def _save_images(tmp_path, count=8):
    import tifffile

    rng = np.random.default_rng(0)
    names = []
    for i in range(count):
        kind = i % 5
        if kind == 0:
            name = f"img{i}.png"
            Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(tmp_path / name)
        elif kind == 1:
            name = f"img{i}.png"  # 16-bit PNG
            Image.fromarray(rng.integers(0, 65535, (40, 40)).astype(np.uint16)).save(tmp_path / name)
        elif kind == 2:
            name = f"img{i}.jpg"
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / name)
        elif kind == 3:
            name = f"img{i}.tif"
            tifffile.imwrite(tmp_path / name, rng.integers(0, 65535, (40, 40)).astype(np.uint16))
        else:
            name = f"img{i}.dcm"
            _dicom(tmp_path / name, rng.integers(0, 4096, (40, 40)).astype(np.uint16), 12)
        names.append(name)
    return names


def test_manifest_reads_every_format_and_groups_patients(tmp_path):
    names = _save_images(tmp_path, 10)
    rows = [f"{n},{'pos' if i % 2 else 'neg'},p{i // 2}" for i, n in enumerate(names)]
    ds = load_manifest(_manifest(tmp_path, rows), 32, label_columns=["label"], patient_column="patient")
    assert ds.task == "binary" and ds.class_names == ["neg", "pos"]
    x = ds.load(np.arange(len(ds)))
    assert x.shape == (10, 1, 32, 32) and torch.isfinite(x).all() and x.max() <= 1 and x.min() >= 0
    assert x.std() > 0.05  # real pixels, not zeros
    for split in make_splits(ds, folds=2, seed=0, val_fraction=0.5):
        patients = lambda idx: set(ds.patient_ids[idx])  # noqa: E731
        assert not (patients(split.test) & patients(split.train)) and not (patients(split.test) & patients(split.val))


def test_manifest_one_hot_and_multilabel(tmp_path):
    names = _save_images(tmp_path, 6)[:1] * 6
    one_hot = _manifest(
        tmp_path,
        [f"{names[0]},{int(i % 3 == 0)},{int(i % 3 == 1)},{int(i % 3 == 2)}" for i in range(6)],
        header="path,a,b,c",
    )
    ds = load_manifest(one_hot, 16, label_columns=["a", "b", "c"])
    assert ds.task == "multiclass" and ds.labels.tolist() == [0, 1, 2, 0, 1, 2]  # three one-hot columns
    multi = _manifest(tmp_path, [f"{names[0]},1,1,0", f"{names[0]},0,0,0", f"{names[0]},1,0,1"], header="path,a,b,c")
    ds = load_manifest(multi, 16, label_columns=["a", "b", "c"])
    assert ds.task == "multilabel" and ds.labels.shape == (3, 3)


@pytest.mark.parametrize(
    "rows, options, message",
    [
        (["missing.png,0"], {}, r"row 2: image 'missing.png' not found"),
        (["IMG,0"], {"label_columns": ["diagnosis"]}, r"column 'diagnosis' not found"),
        (["IMG,nan", "IMG,1"], {}, r"row 2: label 'nan' in column 'label' is missing or not finite"),
        (["IMG,0", "IMG,0"], {}, r"holds a single class"),
        (["IMG,0", "IMG,1"], {"task": "multilabel"}, r"multilabel task needs one 0/1 column per label"),
    ],
)
def test_manifest_bad_inputs(tmp_path, rows, options, message):
    name = _save_images(tmp_path, 1)[0]
    csv = _manifest(tmp_path, [r.replace("IMG", name) for r in rows], header="path,label")
    with pytest.raises(MedlatentInputError, match=message):
        load_manifest(csv, 16, **options)


def test_manifest_unreadable_and_nan_images(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    import tifffile

    tifffile.imwrite(tmp_path / "nan.tif", np.full((8, 8), np.nan, dtype=np.float32))
    csv = _manifest(tmp_path, ["broken.png,0", "nan.tif,1"], header="path,label")
    with pytest.raises(MedlatentInputError, match=r"row 2: cannot read image"):
        load_manifest(csv, 16)
    csv = _manifest(tmp_path, ["nan.tif,0", "nan.tif,1"], header="path,label")
    with pytest.raises(MedlatentInputError, match="NaN or Inf"):
        load_manifest(csv, 16)


def test_kfold_is_stratified_and_covers_everything():
    ds = make_synthetic(32, n_train=60, n_val=0, n_test=0)
    splits = make_splits(ds, folds=3, seed=1)
    tests = np.concatenate([s.test for s in splits])
    assert sorted(tests.tolist()) == list(range(len(ds)))
    for s in splits:
        assert not set(s.train) & set(s.val) and not set(s.train) & set(s.test)
        assert abs(ds.labels[s.test].mean() - ds.labels.mean()) < 0.15
    with pytest.raises(MedlatentInputError, match="rarest class"):
        make_splits(ds, folds=100)


def _dicom(path, pixels, bits_stored, **tags):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    allocated = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = allocated, bits_stored, bits_stored - 1, 0
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("dtype, high", [(np.uint8, 256), (np.uint16, 65536)])
def test_dicom_and_png_of_the_same_pixels_load_to_the_same_tensor(tmp_path, dtype, high):
    rng = np.random.default_rng(0)
    pixels = rng.integers(high // 4, high // 2, (24, 24)).astype(
        dtype
    )  # a narrow range: min-max scaling would stretch it
    Image.fromarray(pixels).save(tmp_path / "a.png")
    _dicom(tmp_path / "a.dcm", pixels, 8 * pixels.itemsize)
    png, dcm = read_image(tmp_path / "a.png"), read_image(tmp_path / "a.dcm")
    assert np.array_equal(png, dcm)
    assert png.max() <= 0.5  # scaled by the bit depth, not by the image's own range
    csv = _manifest(tmp_path, ["a.png,0", "a.dcm,1"], header="path,label")
    loaded = load_manifest(csv, 24).load(np.arange(2))
    assert torch.equal(loaded[0], loaded[1])


def test_dicom_rescale_and_window_follow_the_luts(tmp_path):
    stored = np.array([[0, 1000], [2000, 4095]], dtype=np.uint16)
    # CT-like: HU = stored - 1024; window centre 40, width 400 maps [-160, 240] HU onto the full output range.
    path = _dicom(
        tmp_path / "ct.dcm", stored, 12, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400
    )
    image = read_image(path)
    assert image[0, 0] == 0.0 and image[1, 1] == 1.0  # below and above the window
    inside = np.array(
        [[0, 1184], [1204, 1224]], dtype=np.uint16
    )  # HU -1024, 160, 180, 200: the last three inside the window
    ramp = read_image(
        _dicom(
            tmp_path / "ramp.dcm", inside, 12, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400
        )
    )
    assert 0 < ramp[0, 1] < ramp[1, 0] < ramp[1, 1] < 1
    assert ramp[1, 1] - ramp[1, 0] == pytest.approx(
        20 / 399, abs=1e-3
    )  # linear in HU across the window (DICOM C.11.2.1.2)
    plain = read_image(_dicom(tmp_path / "plain.dcm", stored, 12, RescaleSlope=1, RescaleIntercept=-1024))
    assert (
        plain[0, 0] == 0.0 and plain[1, 1] == 1.0 and plain[0, 1] == pytest.approx(1000 / 4095)
    )  # the 12-bit range, rescaled


def test_one_hot_columns_and_one_label_column_give_the_same_task(tmp_path):
    names = _save_images(tmp_path, 1) * 6
    single = load_manifest(_manifest(tmp_path, [f"{names[0]},{i % 2}" for i in range(6)], header="path,label"), 16)
    one_hot = load_manifest(
        _manifest(tmp_path, [f"{names[0]},{1 - i % 2},{i % 2}" for i in range(6)], header="path,neg,pos"),
        16,
        label_columns=["neg", "pos"],
    )
    assert single.task == one_hot.task == "binary"
    assert single.labels.tolist() == one_hot.labels.tolist()


def test_a_manifest_with_one_class_present_is_refused(tmp_path):
    names = _save_images(tmp_path, 1) * 4
    with pytest.raises(MedlatentInputError, match="every row has class '1'"):
        load_manifest(_manifest(tmp_path, [f"{names[0]},1" for _ in range(4)], header="path,label"), 16)


def test_a_training_limit_keeps_a_stratified_subset_and_names_the_split():
    from medlatent.data import make_synthetic
    from medlatent.data.splits import make_splits
    from medlatent.errors import MedlatentInputError

    dataset = make_synthetic(16, n_train=200, n_val=40, n_test=40, prevalence=0.25)
    (full,) = make_splits(dataset)
    (limited,) = make_splits(dataset, train_limit=40, seed=3)
    assert len(limited.train) == 40 and set(limited.train) <= set(full.train) and limited.name == "official-train40"
    assert np.array_equal(limited.val, full.val) and np.array_equal(limited.test, full.test)
    assert (
        abs(dataset.labels[limited.train].mean() - dataset.labels[full.train].mean()) < 0.05
    )  # the classes keep their shares
    assert np.array_equal(make_splits(dataset, train_limit=40, seed=3)[0].train, limited.train) and np.array_equal(
        make_splits(dataset, train_limit=500)[0].train, full.train
    )
    with pytest.raises(MedlatentInputError, match="--train-limit 1"):
        make_splits(dataset, train_limit=1)
