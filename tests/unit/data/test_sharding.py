"""Shards cut by size, and shards written in parallel by Ray tasks (issue 6, item 2).

The parallel tests use the session's local Ray instance (tests/conftest.py: ray_local).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from osmd_ray.cli.data import main as data_main
from osmd_ray.data import writer
from osmd_ray.data.checker import check_dataset, verify_dataset
from osmd_ray.data.reading import read_split_numpy
from osmd_ray.data.schema import ModalitySpec, read_manifest
from osmd_ray.data.writer import estimate_row_bytes, rows_per_shard_for, write_dataset
from osmd_ray.errors import DataError

# rgb 3x8x8 uint8 (192 B) + depth 1x8x8 float32 (256 B) + int64 label (8 B) + 32 B per row
# for the sample id: 488 bytes per row.
ROW_BYTES = 192 + 256 + 8 + 32


def make_splits(seed: int = 0, n=(23, 7, 9)) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {
        split: {
            "rgb": rng.integers(0, 256, (k, 3, 8, 8), dtype=np.uint8),
            "depth": rng.uniform(1, 5, (k, 1, 8, 8)).astype(np.float32),
            "label": rng.integers(0, 4, k),
        }
        for split, k in zip(("train", "val", "test"), n, strict=True)
    }


def files_under(root) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root) for f in names
    )


def test_row_estimate_and_rows_per_shard():
    specs = {
        "rgb": ModalitySpec("rgb", "image", (3, 8, 8), "uint8"),
        "depth": ModalitySpec("depth", "image", (1, 8, 8), "float32"),
    }
    assert estimate_row_bytes(specs, ()) == ROW_BYTES
    # A segmentation label map is 8 bytes per pixel; each has_<m> column one byte.
    assert estimate_row_bytes(specs, (8, 8), optional=1) == ROW_BYTES - 8 + 8 * 64 + 1
    assert rows_per_shard_for(ROW_BYTES, 10 * ROW_BYTES + ROW_BYTES - 1) == 10
    assert rows_per_shard_for(ROW_BYTES, 1) == 1  # a row larger than the target: one per shard
    with pytest.raises(DataError, match="target shard size must be positive"):
        rows_per_shard_for(ROW_BYTES, 0)


def test_shards_are_cut_by_the_target_size(tmp_path):
    out = str(tmp_path / "ds")
    m = write_dataset(
        out,
        make_splits(),
        task="classification",
        num_classes=4,
        target_shard_bytes=10 * ROW_BYTES + 100,
        progress=False,
    )
    assert {s: [x.rows for x in shards] for s, shards in m.splits.items()} == {
        "train": [10, 10, 3],
        "val": [7],
        "test": [9],
    }
    assert [x.path for x in m.splits["train"]] == [f"train/part-{k:05d}.parquet" for k in range(3)]
    assert check_dataset(out) == []


def test_cli_shard_mb_sets_the_shard_size(tmp_path, capsys):
    out = str(tmp_path / "synth")
    # 0.01 MiB = 10485 bytes: 21 rows of 488 bytes (8x8 images: the sizes above).
    argv = ["data", "synth", "--out", out, "--train", "50", "--val", "8", "--test", "8"]
    assert data_main([*argv, "--size", "8", "--shard-mb", "0.01"]) == 0
    assert "train: 50 rows in 3 shard(s)" in capsys.readouterr().out
    assert [s.rows for s in read_manifest(out).splits["train"]] == [21, 21, 8]
    with pytest.raises(SystemExit):
        data_main([*argv, "--shard-mb", "0"])
    assert "must be a positive number" in capsys.readouterr().err


def test_parallel_write_gives_the_same_dataset_as_one_process(tmp_path, ray_local):
    splits = make_splits(n=(23, 7, 9))
    present = {"train": {"depth": np.arange(23) % 4 > 0}}
    kwargs = dict(task="classification", num_classes=4, present=present, progress=False)
    one = write_dataset(str(tmp_path / "one"), splits, rows_per_shard=40, **kwargs)
    serial = write_dataset(
        str(tmp_path / "serial"), splits, rows_per_shard=5, parallel=False, **kwargs
    )
    par = write_dataset(str(tmp_path / "par"), splits, rows_per_shard=5, parallel=True, **kwargs)

    assert [s.rows for s in par.splits["train"]] == [5, 5, 5, 5, 3]
    # Same bytes as the in-process writer, shard for shard, listed in order.
    assert par.splits == serial.splits
    assert par == read_manifest(str(tmp_path / "par"))
    verify_dataset(str(tmp_path / "par"), deep=True)
    assert files_under(tmp_path / "par") == ["manifest.json"] + [
        p.path for s in ("test", "train", "val") for p in par.splits[s]
    ]
    # The same rows in the same order as a one-shard-per-split write.
    assert one.normalization == par.normalization
    for split in ("train", "val", "test"):
        a = read_split_numpy(str(tmp_path / "one"), split)
        b = read_split_numpy(str(tmp_path / "par"), split)
        assert a.keys() == b.keys()
        for col in a:
            np.testing.assert_array_equal(a[col], b[col])


def test_failed_shard_task_leaves_nothing_in_a_new_folder(tmp_path, ray_local):
    splits = make_splits()
    splits["train"]["depth"][17, 0, 3, 3] = np.nan  # shard 3 of 5-row shards
    out = tmp_path / "new"
    with pytest.raises(DataError, match=r"split 'train', modality 'depth'.*first: row 17"):
        write_dataset(
            str(out),
            splits,
            task="classification",
            num_classes=4,
            rows_per_shard=5,
            parallel=True,
            progress=False,
        )
    # No dataset under the final name, no staging folder, no temporary or half-written file.
    assert files_under(tmp_path) == []


def test_failed_shard_task_keeps_the_previous_dataset(tmp_path, ray_local):
    out = tmp_path / "ds"
    kwargs = dict(task="classification", num_classes=4, rows_per_shard=5, progress=False)
    before = write_dataset(str(out), make_splits(0), **kwargs)
    bytes_before = {f: (out / f).read_bytes() for f in files_under(out)}
    splits = make_splits(1)
    splits["test"]["label"][4] = 9  # label out of range in a shard task
    with pytest.raises(DataError, match=r"split 'test': 1 row\(s\) with labels outside"):
        write_dataset(str(out), splits, overwrite=True, parallel=True, **kwargs)
    assert {f: (out / f).read_bytes() for f in files_under(out)} == bytes_before
    assert read_manifest(str(out)) == before
    assert os.listdir(tmp_path) == ["ds"]  # the staging folder is gone


def test_small_data_stays_in_process(tmp_path, monkeypatch):
    """Automatic choice: a dataset below PARALLEL_MIN_BYTES never starts Ray."""
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")

    def no_ray(*args, **kwargs):
        raise AssertionError("the parallel writer was used for a small dataset")

    monkeypatch.setattr(writer, "_write_shards_in_ray", no_ray)
    m = write_dataset(
        str(tmp_path / "ds"),
        make_splits(),
        task="classification",
        num_classes=4,
        rows_per_shard=5,
        progress=False,
    )
    assert len(m.splits["train"]) == 5


def test_large_data_in_several_shards_goes_to_ray_tasks(tmp_path, monkeypatch):
    """Automatic choice: from PARALLEL_MIN_BYTES on, with more than one shard, on a cluster."""
    used = []

    def fake_parallel(fs, target, jobs, fmt, bar):  # the serial writer, recording the call
        used.append(len(jobs))
        return [writer._write_shard(fs, target, job, fmt) for job in jobs]

    monkeypatch.setattr(writer, "_write_shards_in_ray", fake_parallel)
    monkeypatch.setattr(writer, "PARALLEL_MIN_BYTES", 40 * ROW_BYTES)
    kwargs = dict(task="classification", num_classes=4, progress=False)
    small = make_splits(n=(23, 7, 9))  # 39 rows: below the threshold
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    write_dataset(str(tmp_path / "small"), small, rows_per_shard=5, **kwargs)
    assert used == []
    large = make_splits(n=(40, 7, 9))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    write_dataset(str(tmp_path / "local"), large, rows_per_shard=5, **kwargs)
    assert used == []  # large, in several shards, but no cluster: in process
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # never contacted: the writer is faked
    write_dataset(str(tmp_path / "one"), {"train": large["train"]}, rows_per_shard=40, **kwargs)
    assert used == []  # large, but a single shard: in process
    write_dataset(str(tmp_path / "many"), large, rows_per_shard=5, **kwargs)
    assert used == [8 + 2 + 2]
    assert check_dataset(str(tmp_path / "many")) == []
