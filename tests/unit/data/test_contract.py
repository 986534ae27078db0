"""Writing datasets: round trip, statistics, manifest parsing, refusals and atomicity."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from osmd_ray.data import writer
from osmd_ray.data.checker import check_dataset
from osmd_ray.data.reading import read_split_numpy
from osmd_ray.data.schema import (
    SCHEMA_VERSION,
    Manifest,
    ModalitySpec,
    ShardInfo,
    infer_kind,
    read_manifest,
)
from osmd_ray.data.writer import write_dataset
from osmd_ray.errors import DataError


def make_split(rng: np.random.Generator, n: int, num_classes: int = 3) -> dict[str, np.ndarray]:
    """One split with an image, a sequence and a vector modality."""
    return {
        "rgb": rng.integers(0, 256, (n, 3, 6, 5), dtype=np.uint8),
        "imu": rng.normal(2.0, 3.0, (n, 4, 7)).astype(np.float32),
        "feat": rng.normal(-1.0, 0.5, (n, 9)).astype(np.float64),
        "label": rng.integers(0, num_classes, n),
    }


def make_splits(seed: int = 0, n=(23, 7, 9)) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {s: make_split(rng, k) for s, k in zip(("train", "val", "test"), n, strict=True)}


def files_under(root) -> set[str]:
    return {
        os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root) for f in names
    }


def test_round_trip_values_shapes_dtypes_ids_and_presence(tmp_path):
    splits = make_splits()
    splits["test"]["sample_id"] = np.array([f"t{i}" for i in range(9)])
    has_imu = np.arange(23) % 3 != 0
    out = str(tmp_path / "ds")
    m = write_dataset(
        out,
        splits,
        task="classification",
        num_classes=3,
        present={"train": {"imu": has_imu}},
        class_names=["a", "b", "c"],
        description="unit test",
        rows_per_shard=10,
        progress=False,
    )
    assert [s.path for s in m.splits["train"]] == [
        "train/part-00000.parquet",
        "train/part-00001.parquet",
        "train/part-00002.parquet",
    ]
    assert [s.rows for s in m.splits["train"]] == [10, 10, 3]
    assert m.modalities["rgb"] == ModalitySpec("rgb", "image", (3, 6, 5), "uint8")
    assert m.modalities["imu"] == ModalitySpec("imu", "sequence", (4, 7), "float32")
    assert m.modalities["feat"] == ModalitySpec("feat", "vector", (9,), "float64")
    assert m.optional_modalities == ["imu"]
    assert m.label_shape == ()
    assert read_manifest(out) == m

    for split, data in splits.items():
        got = read_split_numpy(out, split)
        assert set(got) == {"sample_id", "rgb", "imu", "feat", "label", "has_imu"}
        for name in ("rgb", "feat", "label"):
            assert got[name].dtype == data[name].dtype or name == "label"
            np.testing.assert_array_equal(got[name], data[name])
        assert got["label"].dtype == np.int64
        mask = has_imu if split == "train" else np.ones(len(data["label"]), bool)
        np.testing.assert_array_equal(got["has_imu"], mask)
        # Rows without the modality are stored as zeros, the others unchanged.
        np.testing.assert_array_equal(got["imu"][mask], data["imu"][mask])
        assert not got["imu"][~mask].any()
        assert got["imu"].dtype == np.float32 and got["imu"].shape[1:] == (4, 7)
    assert read_split_numpy(out, "train", ["sample_id"])["sample_id"][11] == "train-0000011"
    assert list(read_split_numpy(out, "test", ["sample_id"])["sample_id"]) == [
        f"t{i}" for i in range(9)
    ]
    # The caller's array was not zeroed in place.
    assert splits["train"]["imu"][0].any()


def test_shards_use_arrow_fixed_shape_tensors(tmp_path):
    out = tmp_path / "ds"
    write_dataset(str(out), make_splits(), task="classification", num_classes=3, progress=False)
    schema = pq.read_schema(out / "train" / "part-00000.parquet")
    assert schema.field("sample_id").type == pa.string()
    assert schema.field("label").type == pa.int64()
    rgb = schema.field("rgb").type
    assert isinstance(rgb, pa.FixedShapeTensorType)
    assert rgb.extension_name == "arrow.fixed_shape_tensor"
    assert tuple(rgb.shape) == (3, 6, 5) and rgb.value_type == pa.uint8()


def test_normalisation_statistics_match_numpy_on_present_train_rows(tmp_path):
    splits = make_splits()
    splits["train"]["feat"][:, 4] = 7.0  # a constant element: std floored to 1
    has_imu = np.arange(23) % 4 != 1
    splits["train"]["imu"][~has_imu] = 1e6  # would wreck the statistics if counted
    m = write_dataset(
        str(tmp_path / "ds"),
        splits,
        task="classification",
        num_classes=3,
        present={"train": {"imu": has_imu}},
        progress=False,
    )
    tr = splits["train"]
    rgb = tr["rgb"].astype(np.float64)
    np.testing.assert_allclose(m.normalization["rgb"]["mean"], rgb.mean(axis=(0, 2, 3)))
    np.testing.assert_allclose(m.normalization["rgb"]["std"], rgb.std(axis=(0, 2, 3)))
    imu = tr["imu"][has_imu].astype(np.float64)
    np.testing.assert_allclose(m.normalization["imu"]["mean"], imu.mean(axis=(0, 2)))
    np.testing.assert_allclose(m.normalization["imu"]["std"], imu.std(axis=(0, 2)))
    feat_std = tr["feat"].std(axis=0)
    feat_std[4] = 1.0
    np.testing.assert_allclose(m.normalization["feat"]["mean"], tr["feat"].mean(axis=0))
    np.testing.assert_allclose(m.normalization["feat"]["std"], feat_std)


def test_statistics_are_exact_across_chunks(monkeypatch):
    # Force one-row chunks: the pairwise merge must equal the one-pass result, also for a large
    # offset where a naive sum of squares loses precision.
    monkeypatch.setattr(writer, "_STATS_CHUNK_BYTES", 1)
    rng = np.random.default_rng(1)
    x = (1e4 + rng.normal(size=(40, 2, 3))).astype(np.float32)
    mask = rng.random(40) > 0.3
    stats = writer._channel_stats(x, mask)
    ref = x[mask].astype(np.float64)
    np.testing.assert_allclose(stats["mean"], ref.mean(axis=(0, 2)), rtol=1e-12)
    np.testing.assert_allclose(stats["std"], ref.std(axis=(0, 2)), rtol=1e-9)


def test_segmentation_labels_are_tensors_and_ignore_index_is_allowed(tmp_path):
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        label = rng.integers(0, 5, (n, 4, 3))
        label[:, 0, 0] = -100
        splits[split] = {"rgb": rng.random((n, 3, 4, 3), dtype=np.float32), "label": label}
    out = str(tmp_path / "seg")
    m = write_dataset(out, splits, task="segmentation", num_classes=5, progress=False)
    assert m.label_shape == (4, 3)
    assert check_dataset(out) == []
    np.testing.assert_array_equal(read_split_numpy(out, "val")["label"], splits["val"]["label"])
    splits["val"]["label"][1, 2, 2] = 5
    with pytest.raises(DataError, match=r"split 'val'.*outside \[0, 5\) or -100"):
        write_dataset(
            out, splits, task="segmentation", num_classes=5, overwrite=True, progress=False
        )


def test_manifest_json_round_trip_and_readable_layout():
    m = Manifest(
        schema_version=1,
        task="classification",
        num_classes=2,
        ignore_index=-100,
        label_shape=(),
        modalities={"x": ModalitySpec("x", "vector", (3,), "float32")},
        splits={"train": [ShardInfo("train/part-00000.parquet", 5, 100, "a" * 64)]},
        normalization={"x": {"mean": [0.0, 1.5, -2e-5], "std": [1.0, 1.0, 3.0]}},
        optional_modalities=[],
        class_names=["no", "yes"],
        description="list [1, 2] in text",
    )
    text = m.to_json()
    assert Manifest.from_json(text, "m.json") == m
    assert '"shape": [3]' in text and '"mean": [0.0, 1.5, -2e-05]' in text
    assert m.num_rows("train") == 5
    assert m.files("s3://bucket/ds/", "train") == ["s3://bucket/ds/train/part-00000.parquet"]
    with pytest.raises(DataError, match="no split 'val'"):
        m.num_rows("val")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("task"), "missing field.*task"),
        (lambda d: d.update(num_classes=0), "num_classes must be a positive integer"),
        (lambda d: d["modalities"]["x"].update(kind="cube"), "kind must be one of"),
        (lambda d: d["modalities"]["x"].update(dtype="object"), "dtype must be a numeric"),
        (lambda d: d["splits"]["train"][0].update(path="../etc/x.parquet"), "path must be"),
        (lambda d: d["splits"]["train"][0].update(sha256="xyz"), "sha256 must be"),
        (lambda d: d["normalization"]["x"].update(std=[1.0]), r"normalization.x.std must be 3"),
        (lambda d: d.update(class_names=["only one"]), "class_names must be null or a list of 2"),
    ],
)
def test_malformed_manifest_is_rejected_naming_source_and_field(edit, message):
    d = {
        "schema_version": 1,
        "task": "classification",
        "num_classes": 2,
        "ignore_index": -100,
        "label_shape": [],
        "class_names": None,
        "description": "",
        "modalities": {"x": {"kind": "vector", "shape": [3], "dtype": "float32"}},
        "optional_modalities": [],
        "normalization": {"x": {"mean": [0, 0, 0], "std": [1, 1, 1]}},
        "splits": {
            "train": [{"path": "train/p.parquet", "rows": 1, "bytes": 9, "sha256": "0" * 64}]
        },
    }
    Manifest.from_json(json.dumps(d), "ok.json")  # the unedited one is valid
    edit(d)
    with pytest.raises(DataError, match="somewhere/manifest.json") as err:
        Manifest.from_json(json.dumps(d), "somewhere/manifest.json")
    assert err.match(message)


def test_future_schema_version_asks_for_an_upgrade():
    text = json.dumps({"schema_version": SCHEMA_VERSION + 1})
    with pytest.raises(DataError, match=r"src\.json: schema_version 2 .*upgrade osmd_ray"):
        Manifest.from_json(text, "src.json")


def test_not_json_names_source():
    with pytest.raises(DataError, match="here.json: not valid JSON"):
        Manifest.from_json("{", "here.json")


def test_infer_kind():
    assert infer_kind((3, 4, 5)) == "image"
    assert infer_kind((3, 4)) == "sequence"
    assert infer_kind((3,)) == "vector"
    with pytest.raises(DataError, match="fits no modality kind"):
        infer_kind((1, 2, 3, 4))


def test_read_manifest_missing_names_the_file(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path}/manifest.json: not found"):
        read_manifest(str(tmp_path))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s["val"].pop("imu"), r"split 'val': modalities \['feat', 'rgb'\] differ"),
        (
            lambda s: s["test"].update(rgb=s["test"]["rgb"][:, :, :5]),
            r"split 'test', modality 'rgb': per-sample shape \(3, 5, 5\) differs",
        ),
        (
            lambda s: s["val"].update(feat=s["val"]["feat"].astype(np.float32)),
            r"split 'val', modality 'feat': dtype float32 differs",
        ),
        (
            lambda s: s["val"].update(label=s["val"]["label"].astype(float)),
            r"split 'val': label must be an integer array",
        ),
        (lambda s: s["train"]["imu"].__setitem__((2, 0, 0), np.nan), r"'imu': NaN or inf"),
        (lambda s: s["test"]["label"].__setitem__(3, 3), r"split 'test'.*outside \[0, 3\)"),
        (lambda s: s["val"].update(feat=s["val"]["feat"][:3]), r"'feat': 3 rows but label has 7"),
        (lambda s: s.pop("train"), "a train split is required"),
        (lambda s: s.update(extra=s["val"]), r"unknown split\(s\) \['extra'\]"),
    ],
)
def test_invalid_input_is_refused_and_nothing_is_left(tmp_path, edit, message):
    splits = make_splits()
    edit(splits)
    out = tmp_path / "ds"
    with pytest.raises(DataError, match=message):
        write_dataset(str(out), splits, task="classification", num_classes=3, progress=False)
    assert not out.exists()


def test_existing_dataset_is_not_overwritten_without_overwrite(tmp_path):
    out = str(tmp_path / "ds")
    first = write_dataset(out, make_splits(0), task="classification", num_classes=3, progress=False)
    with pytest.raises(DataError, match="already holds a dataset.*--overwrite"):
        write_dataset(out, make_splits(1), task="classification", num_classes=3, progress=False)
    assert read_manifest(out) == first
    second = write_dataset(
        out, make_splits(1), task="classification", num_classes=3, overwrite=True, progress=False
    )
    assert second != first and read_manifest(out) == second
    assert check_dataset(out) == []
    assert os.listdir(tmp_path) == ["ds"]  # no staging or backup folder left


def test_a_foreign_non_empty_folder_is_refused_even_with_overwrite(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty and holds no manifest.json; choose a new"):
        write_dataset(
            str(tmp_path),
            make_splits(),
            task="classification",
            num_classes=3,
            overwrite=True,
            progress=False,
        )
    assert files_under(tmp_path) == {"notes.txt"}


def _fail_on_second_shard(monkeypatch):
    """Make pq.write_table write the first shard, then write half a file and raise."""
    real = pq.write_table
    calls = {"n": 0}

    def flaky(table, where, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 2:
            where.write(b"PAR1 half a shard")
            raise OSError("disk full")
        return real(table, where, *args, **kwargs)

    monkeypatch.setattr(writer.pq, "write_table", flaky)
    return calls


def test_failure_half_way_leaves_the_previous_dataset_intact(tmp_path, monkeypatch):
    out = str(tmp_path / "ds")
    before = write_dataset(
        out, make_splits(0), task="classification", num_classes=3, progress=False
    )
    files_before = files_under(out)
    bytes_before = {f: (tmp_path / "ds" / f).read_bytes() for f in files_before}
    calls = _fail_on_second_shard(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        write_dataset(
            out,
            make_splits(1),
            task="classification",
            num_classes=3,
            rows_per_shard=5,
            overwrite=True,
            progress=False,
        )
    assert calls["n"] == 2
    assert files_under(out) == files_before
    assert {f: (tmp_path / "ds" / f).read_bytes() for f in files_before} == bytes_before
    assert read_manifest(out) == before
    assert check_dataset(out) == []
    assert os.listdir(tmp_path) == ["ds"]  # the staging folder is gone too


def test_failure_in_a_new_folder_leaves_no_shard_under_a_final_name(tmp_path, monkeypatch):
    out = tmp_path / "new"
    _fail_on_second_shard(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        write_dataset(
            str(out),
            make_splits(),
            task="classification",
            num_classes=3,
            rows_per_shard=5,
            progress=False,
        )
    assert not out.exists()


def test_present_mask_must_match_rows(tmp_path):
    with pytest.raises(DataError, match=r"present mask for 'imu' must be a bool array of shape"):
        write_dataset(
            str(tmp_path / "ds"),
            make_splits(),
            task="classification",
            num_classes=3,
            present={"val": {"imu": np.ones(3, bool)}},
            progress=False,
        )


def test_uris_work_like_folders_through_fsspec():
    # fsspec's in-memory filesystem stands in for s3://: same URI handling, no server.
    fsspec = pytest.importorskip("fsspec")
    root = f"memory://osmd-test-{os.getpid()}/ds"
    fs = fsspec.filesystem("memory")
    try:
        splits = make_splits()
        m = write_dataset(root, splits, task="classification", num_classes=3, progress=False)
        assert m.files(root, "val") == [f"{root}/val/part-00000.parquet"]
        assert check_dataset(root) == []
        m2 = write_dataset(
            root,
            splits,
            task="classification",
            num_classes=3,
            rows_per_shard=10,
            overwrite=True,
            progress=False,
        )
        assert read_manifest(root) == m2 and check_dataset(root) == []
        np.testing.assert_array_equal(read_split_numpy(root, "val")["imu"], splits["val"]["imu"])
        fs.pipe(f"/osmd-test-{os.getpid()}/ds/test/old.parquet", b"x")
        assert check_dataset(root, deep=False) == [
            "test/old.parquet: not in manifest (manifest.json does not list it)"
        ]
    finally:
        fs.rm(f"/osmd-test-{os.getpid()}", recursive=True)


def test_leftovers_of_an_interrupted_write_are_replaced_only_with_overwrite(tmp_path):
    out = tmp_path / "ds"
    (out / "train").mkdir(parents=True)
    (out / "train" / "part-00000.parquet").write_bytes(b"old")
    (out / "train" / ".part-00001.parquet.tmp-abc").write_bytes(b"half")
    kwargs = dict(task="classification", num_classes=3, progress=False)
    with pytest.raises(DataError, match="looks like an interrupted write: pass --overwrite"):
        write_dataset(str(out), make_splits(), **kwargs)
    m = write_dataset(str(out), make_splits(), overwrite=True, **kwargs)
    assert files_under(out) == {"manifest.json", *(s.path for v in m.splits.values() for s in v)}
    assert check_dataset(str(out)) == []
