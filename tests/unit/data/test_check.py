"""check_dataset / verify_dataset: every kind of damage is reported, naming the file."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from osmd_ray.data.checker import check_dataset, verify_dataset
from osmd_ray.data.writer import write_dataset
from osmd_ray.errors import DataError

SHARD = "train/part-00000.parquet"
SHARD2 = "train/part-00001.parquet"


@pytest.fixture
def ds(tmp_path) -> Path:
    """A small valid dataset: two train shards, an optional sequence modality."""
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 12), ("val", 4), ("test", 5)):
        splits[split] = {
            "rgb": rng.integers(0, 256, (n, 3, 4, 4), dtype=np.uint8),
            "imu": rng.normal(size=(n, 2, 6)).astype(np.float32),
            "label": rng.integers(0, 3, n),
        }
    root = tmp_path / "ds"
    write_dataset(
        str(root),
        splits,
        task="classification",
        num_classes=3,
        present={"train": {"imu": np.arange(12) % 2 == 0}},
        rows_per_shard=6,
        progress=False,
    )
    return root


def edit_manifest(root: Path, edit) -> None:
    path = root / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def rewrite_shard(root: Path, rel: str, change, keep_rows: bool = False) -> None:
    """Rewrite a shard's table through ``change`` and record the new size and sha256 in the
    manifest, so that only what ``change`` did is wrong (rows too unless keep_rows)."""
    table = change(pq.read_table(root / rel))
    pq.write_table(table, root / rel)
    blob = (root / rel).read_bytes()

    def fix(data):
        for shard in data["splits"][rel.split("/")[0]]:
            if shard["path"] == rel:
                shard.update(bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
                if not keep_rows:
                    shard["rows"] = table.num_rows

    edit_manifest(root, fix)


def replace_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, values)


def test_a_good_dataset_has_no_problems(ds):
    assert check_dataset(str(ds)) == []
    assert check_dataset(str(ds), deep=False) == []
    assert verify_dataset(str(ds)).num_rows("train") == 12


@pytest.mark.parametrize("deep", [True, False])
def test_truncated_shard(ds, deep):
    blob = (ds / SHARD).read_bytes()
    (ds / SHARD).write_bytes(blob[: len(blob) // 2])
    problems = check_dataset(str(ds), deep=deep)
    assert f"{SHARD}: {len(blob) // 2} bytes, but manifest.json says {len(blob)}" in problems[0]
    assert any(p.startswith(f"{SHARD}: not readable as Parquet") for p in problems)
    assert all(p.startswith(SHARD) for p in problems)


def test_changed_byte_fails_the_checksum_only_in_the_deep_check(ds):
    blob = bytearray((ds / SHARD).read_bytes())
    blob[len(blob) // 3] ^= 0xFF
    (ds / SHARD).write_bytes(bytes(blob))
    problems = check_dataset(str(ds))
    assert any(p.startswith(f"{SHARD}: sha256 ") and "differs" in p for p in problems)
    assert not any("sha256" in p for p in check_dataset(str(ds), deep=False))


def test_schema_mismatch_wrong_tensor_shape(ds):
    def narrower(t):
        rgb = t.column("rgb").combine_chunks().to_numpy_ndarray()[:, :, :, :3].copy()
        return replace_column(t, "rgb", pa.FixedShapeTensorArray.from_numpy_ndarray(rgb))

    rewrite_shard(ds, SHARD2, narrower)
    for deep in (True, False):
        assert check_dataset(str(ds), deep=deep) == [
            f"{SHARD2}: column 'rgb' holds tensors of shape (3, 4, 3), the manifest says (3, 4, 4)"
        ]


def test_schema_mismatch_value_dtype_label_type_missing_and_extra_column(ds):
    def damage(t):
        rgb = t.column("rgb").combine_chunks().to_numpy_ndarray().astype(np.float32)
        t = replace_column(t, "rgb", pa.FixedShapeTensorArray.from_numpy_ndarray(rgb))
        t = replace_column(t, "label", t.column("label").cast(pa.int32()))
        return t.drop_columns(["has_imu"]).append_column("extra", pa.array([1] * t.num_rows))

    rewrite_shard(ds, SHARD, damage)
    problems = check_dataset(str(ds), deep=False)
    assert sorted(problems) == sorted(
        [
            f"{SHARD}: column 'rgb' holds float values, the manifest says uint8",
            f"{SHARD}: column 'label' has type int32, the manifest says int64",
            f"{SHARD}: column 'has_imu' is missing",
            f"{SHARD}: unexpected column 'extra' (not in the manifest)",
        ]
    )


def test_missing_shard(ds):
    (ds / SHARD2).unlink()
    assert check_dataset(str(ds)) == [f"{SHARD2}: missing (listed in manifest.json)"]


def test_stray_parquet_file(ds):
    shutil.copy(ds / SHARD, ds / "train" / "part-00099.parquet")
    (ds / "old").mkdir()
    shutil.copy(ds / SHARD, ds / "old" / "x.parquet")
    assert check_dataset(str(ds), deep=False) == [
        "old/x.parquet: not in manifest (manifest.json does not list it)",
        "train/part-00099.parquet: not in manifest (manifest.json does not list it)",
    ]


def test_nan_in_a_float_modality_only_in_the_deep_check(ds):
    def poison(t):
        imu = t.column("imu").combine_chunks().to_numpy_ndarray().copy()
        imu[4, 1, 2] = np.nan
        imu[5, 0, 0] = np.inf
        return replace_column(t, "imu", pa.FixedShapeTensorArray.from_numpy_ndarray(imu))

    rewrite_shard(ds, SHARD2, poison)
    assert check_dataset(str(ds)) == [
        f"{SHARD2}: column 'imu': NaN or inf in 2 row(s) (first: row 4)"
    ]
    assert check_dataset(str(ds), deep=False) == []


def test_label_out_of_range(ds):
    def bad_label(t):
        label = t.column("label").to_numpy().copy()
        label[3] = 3
        return replace_column(t, "label", pa.array(label))

    rewrite_shard(ds, "test/part-00000.parquet", bad_label)
    assert check_dataset(str(ds)) == [
        "test/part-00000.parquet: label: 1 row(s) with labels outside [0, 3) (first: row 3, 3) "
        "(counting from row 0)"
    ]


def test_row_count_differs(ds):
    rewrite_shard(ds, "val/part-00000.parquet", lambda t: t.slice(0, 3), keep_rows=True)
    assert check_dataset(str(ds), deep=False) == [
        "val/part-00000.parquet: 3 rows, but manifest.json says 4"
    ]


def test_repeated_sample_ids_within_a_split(ds):
    def dup(t):
        ids = t.column("sample_id").to_pylist()
        ids[0] = "train-0000003"  # the first shard already holds it
        return replace_column(t, "sample_id", pa.array(ids))

    rewrite_shard(ds, SHARD2, dup)
    assert check_dataset(str(ds)) == [
        f"{SHARD2}: 1 sample_id value(s) repeated within the split (first: 'train-0000003')"
    ]


def test_future_schema_version(ds):
    edit_manifest(ds, lambda d: d.update(schema_version=99))
    (problem,) = check_dataset(str(ds))
    assert problem.startswith(f"{ds}/manifest.json: schema_version 99 is newer")
    assert "upgrade osmd_ray" in problem


def test_malformed_and_missing_manifest(ds):
    (ds / "manifest.json").write_text("{not json")
    assert check_dataset(str(ds))[0].startswith(f"{ds}/manifest.json: not valid JSON")
    (ds / "manifest.json").unlink()
    assert check_dataset(str(ds))[0].startswith(f"{ds}/manifest.json: not found")


def test_empty_split(ds):
    edit_manifest(ds, lambda d: d["splits"].update(val=[]))
    (ds / "val" / "part-00000.parquet").unlink()
    assert check_dataset(str(ds)) == ["manifest.json: split 'val' is empty (no rows)"]


def test_several_problems_are_reported_at_once(ds):
    (ds / SHARD2).unlink()
    blob = (ds / "val" / "part-00000.parquet").read_bytes()
    (ds / "val" / "part-00000.parquet").write_bytes(blob[:100])
    shutil.copy(ds / SHARD, ds / "test" / "part-00007.parquet")
    problems = check_dataset(str(ds))
    files = {p.split(":")[0] for p in problems}
    assert files == {SHARD2, "val/part-00000.parquet", "test/part-00007.parquet"}
    assert len(problems) >= 4  # the truncated shard: size, checksum, unreadable

    with pytest.raises(DataError) as err:
        verify_dataset(str(ds))
    lines = str(err.value).splitlines()
    assert lines[0] == f"dataset {ds} failed its check (4 problem(s)):"
    assert set(lines[1:]) == set(check_dataset(str(ds), deep=False))
