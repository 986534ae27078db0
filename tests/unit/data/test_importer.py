"""import_npz: all three kinds, val carved or given, and errors naming file and key."""

from __future__ import annotations

import numpy as np
import pytest

from osmd_ray.data.checker import check_dataset
from osmd_ray.data.importer import import_npz, stratified_val_indices
from osmd_ray.data.reading import read_split_numpy
from osmd_ray.errors import DataError


def npz_arrays(rng: np.random.Generator, n: int, classes: int = 4) -> dict[str, np.ndarray]:
    # Every class present, in a fixed share, so stratification can be checked exactly.
    return {
        "rgb": rng.integers(0, 256, (n, 3, 5, 5), dtype=np.uint8),
        "gyro": rng.normal(size=(n, 3, 10)).astype(np.float32),
        "meta": rng.normal(size=(n, 4)).astype(np.float32),
        "label": np.arange(n) % classes,
    }


@pytest.fixture
def npz(tmp_path):
    rng = np.random.default_rng(0)
    paths = {}
    for split, n in (("train", 80), ("val", 12), ("test", 16)):
        arrays = npz_arrays(rng, n)
        if split == "train":
            arrays["has_gyro"] = rng.random(n) > 0.25
        paths[split] = tmp_path / f"{split}.npz"
        np.savez(paths[split], **arrays)
    return paths


def load(path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return dict(f)


def test_import_with_val_keeps_every_file_and_kind(tmp_path, npz):
    out = str(tmp_path / "ds")
    m = import_npz(out, str(npz["train"]), str(npz["test"]), str(npz["val"]), progress=False)
    assert {n: (s.kind, s.shape, s.dtype) for n, s in m.modalities.items()} == {
        "rgb": ("image", (3, 5, 5), "uint8"),
        "gyro": ("sequence", (3, 10), "float32"),
        "meta": ("vector", (4,), "float32"),
    }
    assert m.num_classes == 4 and m.optional_modalities == ["gyro"]
    assert list(m.splits) == ["train", "val", "test"]
    for split in ("train", "val", "test"):
        src = load(npz[split])
        got = read_split_numpy(out, split)
        np.testing.assert_array_equal(got["rgb"], src["rgb"])
        np.testing.assert_array_equal(got["meta"], src["meta"])
        np.testing.assert_array_equal(got["label"], src["label"])
        assert got["sample_id"][1] == f"{split}-0000001"
    train = load(npz["train"])
    got = read_split_numpy(out, "train", ["gyro", "has_gyro"])
    np.testing.assert_array_equal(got["has_gyro"], train["has_gyro"])
    np.testing.assert_array_equal(got["gyro"][train["has_gyro"]], train["gyro"][train["has_gyro"]])
    assert check_dataset(out) == []


def test_import_without_val_carves_a_stratified_seeded_disjoint_slice(tmp_path, npz):
    out = str(tmp_path / "ds")
    m = import_npz(
        out, str(npz["train"]), str(npz["test"]), val_fraction=0.25, seed=3, progress=False
    )
    train, val = read_split_numpy(out, "train"), read_split_numpy(out, "val")
    assert m.num_rows("train") == 60 and m.num_rows("val") == 20
    # Stratified: each of the 4 classes (20 each) gives 5 to val.
    assert np.bincount(val["label"], minlength=4).tolist() == [5, 5, 5, 5]
    # Disjoint and complete, and each row is still the row of train.npz its id names.
    ids = np.concatenate([train["sample_id"], val["sample_id"]])
    assert len(set(ids)) == 80
    assert set(ids) == {f"train-{i:07d}" for i in range(80)}
    src = load(npz["train"])
    rows = np.array([int(s.split("-")[1]) for s in val["sample_id"]])
    np.testing.assert_array_equal(val["rgb"], src["rgb"][rows])
    np.testing.assert_array_equal(val["has_gyro"], src["has_gyro"][rows])
    # Seeded: the same seed picks the same rows, another seed other rows.
    again = import_npz(
        str(tmp_path / "again"),
        str(npz["train"]),
        str(npz["test"]),
        val_fraction=0.25,
        seed=3,
        progress=False,
    )
    other = import_npz(
        str(tmp_path / "other"),
        str(npz["train"]),
        str(npz["test"]),
        val_fraction=0.25,
        seed=4,
        progress=False,
    )
    assert again.splits["val"][0].sha256 == m.splits["val"][0].sha256
    assert other.splits["val"][0].sha256 != m.splits["val"][0].sha256


def test_stratified_slice_takes_one_of_every_class_that_can_spare_one():
    labels = np.array([0] * 30 + [1] * 2 + [2])
    idx = stratified_val_indices(labels, 0.1, seed=0)
    assert np.bincount(labels[idx], minlength=3).tolist() == [3, 1, 0]
    assert np.all(np.diff(idx) > 0)


def test_num_classes_is_the_largest_label_over_all_files(tmp_path, npz):
    test = load(npz["test"])
    test["label"][0] = 6
    np.savez(npz["test"], **test)
    m = import_npz(str(tmp_path / "ds"), str(npz["train"]), str(npz["test"]), progress=False)
    assert m.num_classes == 7


def test_segmentation_import(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for name, n in (("train", 10), ("test", 3)):
        label = rng.integers(0, 3, (n, 4, 4))
        label[:, 0] = -100
        np.savez(tmp_path / f"{name}.npz", img=rng.random((n, 2, 4, 4)), label=label)
        paths.append(str(tmp_path / f"{name}.npz"))
    m = import_npz(str(tmp_path / "ds"), *paths, task="segmentation", progress=False)
    assert m.label_shape == (4, 4) and m.num_classes == 3
    assert m.num_rows("val") == 1 and m.num_rows("train") == 9


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda a: a.pop("label"), r"train\.npz: no 'label' array"),
        (lambda a: a.update(label=a["label"].astype(np.float32)), r"'label' has dtype float32"),
        (lambda a: a["label"].__setitem__(0, -1), r"train\.npz: key 'label' holds negative"),
        (lambda a: a.update(meta=a["meta"][:5]), r"train\.npz: key 'meta' has shape \(5, 4\)"),
        (lambda a: a.update(meta=np.zeros((80, 1, 2, 3, 4))), r"key 'meta': per-sample shape"),
        (lambda a: a.update(sample_id=np.array([{}] * 80)), r"key 'sample_id' holds an object"),
        (lambda a: a.update(has_meta=np.ones(80)), r"key 'has_meta' must be a 1-D bool"),
        (lambda a: a.update(has_x=np.ones(80, bool)), r"'has_x' is a mask for 'x'"),
    ],
)
def test_bad_file_errors_name_file_and_key(tmp_path, npz, edit, message):
    arrays = load(npz["train"])
    edit(arrays)
    np.savez(npz["train"], **arrays)
    with pytest.raises(DataError, match=message) as err:
        import_npz(str(tmp_path / "ds"), str(npz["train"]), str(npz["test"]), progress=False)
    assert str(npz["train"]) in str(err.value)
    assert not (tmp_path / "ds").exists()


def test_files_that_disagree_are_named(tmp_path, npz):
    test = load(npz["test"])
    test.pop("meta")
    np.savez(npz["test"], **test)
    with pytest.raises(DataError, match=r"hold different modality keys.*\['meta'\]") as err:
        import_npz(str(tmp_path / "ds"), str(npz["train"]), str(npz["test"]), progress=False)
    assert str(npz["train"]) in str(err.value) and str(npz["test"]) in str(err.value)

    test["meta"] = np.zeros((16, 5), np.float32)
    np.savez(npz["test"], **test)
    with pytest.raises(DataError, match=r"key 'meta': per-sample shape \(4,\) in .* but \(5,\)"):
        import_npz(str(tmp_path / "ds"), str(npz["train"]), str(npz["test"]), progress=False)


def test_missing_file_is_named(tmp_path, npz):
    with pytest.raises(DataError, match=r"nope\.npz: file not found"):
        import_npz(str(tmp_path / "ds"), str(npz["train"]), str(tmp_path / "nope.npz"))
