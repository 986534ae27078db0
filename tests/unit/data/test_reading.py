"""read_split (Ray Data) and read_split_numpy (pyarrow) over the manifest's shard list.

The Ray test uses the session's local Ray instance (tests/conftest.py: ray_local).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from osmd_ray.data.reading import read_split, read_split_numpy, select_columns
from osmd_ray.data.schema import read_manifest
from osmd_ray.data.writer import write_dataset
from osmd_ray.errors import DataError


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 14), ("val", 5), ("test", 4)):
        splits[split] = {
            "rgb": rng.integers(0, 256, (n, 3, 4, 5), dtype=np.uint8),
            "imu": rng.normal(size=(n, 2, 7)).astype(np.float32),
            "vec": rng.normal(size=(n, 6)).astype(np.float32),
            "label": rng.integers(0, 3, n),
        }
    root = tmp_path_factory.mktemp("reading") / "ds"
    write_dataset(
        str(root),
        splits,
        task="classification",
        num_classes=3,
        present={"train": {"imu": np.arange(14) % 3 > 0}},
        rows_per_shard=4,
        progress=False,
    )
    return str(root), splits


def test_read_split_through_ray_gives_rows_and_tensor_shapes(ds, ray_local, tmp_path):
    root, splits = ds
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    # A stray shard beside the listed ones must not be read: only the manifest's list is.
    shutil.copy(copy / "train" / "part-00000.parquet", copy / "train" / "part-00009.parquet")
    data = read_split(
        str(copy),
        "train",
        ["rgb", "imu", "vec", "label", "has_imu", "has_vec"],
        shuffle_files=True,
        seed=1,
    )
    # has_vec does not exist (vec is never missing): it is left out, not an error.
    assert data.columns() == ["rgb", "imu", "vec", "label", "has_imu"]
    batches = list(data.iter_torch_batches(batch_size=5, drop_last=False))
    assert sum(len(b["label"]) for b in batches) == 14
    first = batches[0]
    n = len(first["label"])
    assert tuple(first["rgb"].shape) == (n, 3, 4, 5) and str(first["rgb"].dtype) == "torch.uint8"
    assert tuple(first["imu"].shape) == (n, 2, 7) and str(first["imu"].dtype) == "torch.float32"
    assert tuple(first["vec"].shape) == (n, 6)
    assert str(first["label"].dtype) == "torch.int64"
    assert str(first["has_imu"].dtype) == "torch.bool"
    # Ray does not promise the row order; the rows themselves (vec with its label) must match.
    got = np.concatenate([np.column_stack([b["vec"].numpy(), b["label"].numpy()]) for b in batches])
    want = np.column_stack([splits["train"]["vec"], splits["train"]["label"]])
    np.testing.assert_array_equal(got[np.lexsort(got.T)], want[np.lexsort(want.T)])


def test_streamed_read_tasks_hand_on_small_blocks(ds, ray_local, monkeypatch):
    """A read task emits a block as soon as it holds STREAMED_BLOCK_BYTES, not 128 MiB (Ray
    Data's default), so the first batches of an epoch need not wait for a whole shard."""
    from osmd_ray.data import reading

    root, _ = ds
    columns = ["rgb", "imu", "vec", "label"]
    shards = len(read_manifest(root).files(root, "train"))
    assert read_split(root, "train", columns).materialize().num_blocks() == shards
    monkeypatch.setattr(reading, "STREAMED_BLOCK_BYTES", 200)  # under one 4-row shard
    small = read_split(root, "train", columns).materialize()
    assert small.num_blocks() > shards
    assert small.count() == 14


def test_read_split_numpy_columns_and_order(ds):
    root, splits = ds
    got = read_split_numpy(root, "val", ["label", "vec", "has_vec"])
    assert list(got) == ["label", "vec"]
    np.testing.assert_array_equal(got["vec"], splits["val"]["vec"])
    assert got["vec"].flags.writeable
    allcols = read_split_numpy(root, "test")
    assert list(allcols) == ["sample_id", "rgb", "imu", "vec", "label", "has_imu"]
    assert allcols["has_imu"].all() and allcols["sample_id"].dtype.kind == "U"


def test_unknown_column_or_split_is_a_data_error(ds):
    root, _ = ds
    manifest = read_manifest(root)
    with pytest.raises(DataError, match=r"column 'depth' is not in the dataset at .*; it has"):
        select_columns(manifest, ["rgb", "depth"], root)
    with pytest.raises(DataError, match=r"column 'has_depth' is not in the dataset"):
        select_columns(manifest, ["has_depth"], root)
    with pytest.raises(DataError, match=r"no split 'extra'"):
        read_split_numpy(root, "extra")
    with pytest.raises(DataError, match="no columns to read"):
        read_split_numpy(root, "val", ["has_vec"])
