"""Reading a dataset of the §4 contract: through Ray Data for training, or into numpy.

Both readers take the shard list from the manifest (never a glob), so a stray or
half-written file under the root is never read. Neither verifies the shards; call
:func:`osmd_ray.data.checker.verify_dataset` first where that matters (it is cheap).

Column selection: ``has_<modality>`` columns exist only for modalities missing on some rows
(``manifest.optional_modalities``). Asking for ``has_<m>`` of a modality that is always
present is allowed and simply yields no such column: a consumer treats a missing
``has_<m>`` as "present on every row". Any other unknown column is a DataError.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from osmd_ray import storage
from osmd_ray.data.schema import Manifest, column_to_numpy, read_manifest
from osmd_ray.errors import DataError

if TYPE_CHECKING:
    import ray.data

STREAMED_BLOCK_BYTES = 16 * 2**20
"""Largest Ray Data block a streamed read task emits (a few row groups of the shards)."""


def select_columns(manifest: Manifest, columns: Sequence[str], root: str) -> list[str]:
    """The requested columns that the shards hold, in the order asked.

    ``has_<m>`` of a modality without that column is dropped (see the module docstring);
    anything else the shards do not hold raises DataError naming it and the choices.
    """
    available = manifest.columns()
    chosen: list[str] = []
    for col in columns:
        if col in available:
            if col not in chosen:
                chosen.append(col)
        elif not (col.startswith("has_") and col[4:] in manifest.modalities):
            raise DataError(
                f"column {col!r} is not in the dataset at {root}; it has {', '.join(available)}"
            )
    if not chosen:
        raise DataError(f"no columns to read from {root} (asked for {list(columns)})")
    return chosen


def read_split(
    root: str,
    split: str,
    columns: Sequence[str],
    *,
    manifest: Manifest | None = None,
    shuffle_files: bool = False,
    seed: int | None = None,
) -> ray.data.Dataset:
    """A lazy Ray Dataset over one split's shards, restricted to ``columns``.

    Tensor columns arrive as (B, *shape) arrays/tensors (``iter_torch_batches``);
    ``sample_id`` is a string column, so leave it out of anything converted to torch.
    ``shuffle_files`` shuffles the order of the shards (not rows), anew at every execution
    (epoch), reproducibly when ``seed`` is given.

    One Ray Data block per shard, read by a map task one row group at a time. Not
    ``ray.data.read_parquet``: its file listing step (ListFiles, Ray 2.60) took 20 to 25 s
    per epoch for four local files here, while the manifest already lists every shard
    (benchmarks/RESULTS.md, data I/O).
    """
    import ray.data  # lazy: seconds to import, and only Ray readers need it

    manifest = manifest or read_manifest(root)
    cols = select_columns(manifest, columns, root)
    files = manifest.files(root, split)
    if not files:
        raise DataError(f"split {split!r} of {root} has no shards")
    # The same fsspec filesystem (endpoint, timeouts; credentials from each worker's
    # environment) that wrote and checked the data, pickled into the read tasks.
    fs, _ = storage.url_to_fs(root)
    paths = [storage.url_to_fs(f)[1] for f in files]
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths))
    if shuffle_files:
        ds = ds.randomize_block_order(
            seed=ray.data.RandomSeedConfig(seed=seed, reseed_after_execution=True)
            if seed is not None
            else None
        )
    ds = ds.map_batches(
        partial(_read_shards, fs=fs, columns=cols), batch_size=None, batch_format="pyarrow"
    )
    # A read task hands on its rows only once they fill a block of target_max_block_size
    # (128 MiB by default): a 256 MiB shard then reached the workers 3.5 s after each
    # epoch's start. Blocks of about a row group let the first batches arrive as soon as
    # the first row group is read (benchmarks/RESULTS.md, data I/O).
    ds.context.target_max_block_size = STREAMED_BLOCK_BYTES
    return ds


def _read_shards(
    batch: pa.Table, *, fs: fsspec.AbstractFileSystem, columns: list[str]
) -> Iterator[pa.Table]:
    """The rows of the shards named in ``batch`` (a ``path`` column), one row group at a time."""
    for path in batch.column("path").to_pylist():
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            for g in range(pf.num_row_groups):
                yield pf.read_row_group(g, columns=columns)


def read_split_numpy(
    root: str,
    split: str,
    columns: Sequence[str] | None = None,
    manifest: Manifest | None = None,
) -> dict[str, np.ndarray]:
    """One split in memory, without Ray: {column: array} with tensor columns as
    (N, *shape), ``label`` as (N,) or (N, H, W) int64, ``sample_id`` as str and ``has_<m>``
    as bool. ``columns=None`` reads every column. For prediction and tests.
    """
    manifest = manifest or read_manifest(root)
    cols = select_columns(manifest, columns if columns is not None else manifest.columns(), root)
    if split in manifest.splits and not manifest.splits[split]:
        return {c: _empty(manifest, c) for c in cols}
    table = read_split_table(root, split, cols, manifest=manifest)
    return {c: column_to_numpy(table.column(c)) for c in cols}


def read_split_table(
    root: str, split: str, columns: Sequence[str], *, manifest: Manifest | None = None
) -> pa.Table:
    """One split as a single pyarrow Table (tensor columns keep their fixed-shape type)."""
    manifest = manifest or read_manifest(root)
    cols = select_columns(manifest, columns, root)
    fs, _ = storage.url_to_fs(root)
    tables = []
    for path in manifest.files(root, split):
        with fs.open(storage.url_to_fs(path)[1], "rb") as f:
            tables.append(pq.read_table(f, columns=cols))
    if not tables:
        raise DataError(f"split {split!r} of {root} has no shards")
    return pa.concat_tables(tables)


def _empty(manifest: Manifest, col: str) -> np.ndarray:
    """A zero-row array of the right shape and dtype for a split without shards."""
    if col == "sample_id":
        return np.array([], dtype=str)
    if col.startswith("has_"):
        return np.zeros(0, dtype=bool)
    if col == "label":
        return np.zeros((0, *manifest.label_shape), dtype=np.int64)
    spec = manifest.modalities[col]
    return np.zeros((0, *spec.shape), dtype=spec.dtype)


SUBSET_SEED = 0
"""The seed of the one random order that ``data.train_rows`` subsets are cut from."""


def subset_rows(total: int, rows: int) -> np.ndarray:
    """The row indexes, in ascending order, of a ``rows``-row training subset out of
    ``total`` (0 or ``total``: every row). Every size is a prefix of one seeded permutation,
    so a smaller subset lies inside every larger one."""
    if rows <= 0 or rows >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(SUBSET_SEED).permutation(total)[:rows])
