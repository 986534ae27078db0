"""The Ray Datasets a run's workers read: streamed from storage, or read once into memory."""

from __future__ import annotations

from typing import Any

from osmd_ray.config import (
    Config,
)
from osmd_ray.data.reading import read_split, read_split_table, subset_rows
from osmd_ray.data.schema import Manifest


def streamed_dataset(cfg: Config, manifest: Manifest, split: str, columns: list[str]) -> Any:
    """A split streamed from storage by Ray Data read tasks, shards in seeded random order."""

    return read_split(
        cfg.data.root,
        split,
        columns,
        manifest=manifest,
        shuffle_files=split == "train",
        seed=cfg.seed,
    )


def in_memory_dataset(cfg: Config, manifest: Manifest, split: str, columns: list[str]) -> Any:
    """A small split read once by the driver into Ray's object store.

    Ray Data's read tasks cost seconds of start-up per read, more than a small dataset takes
    to train on. Rows are put in a seeded random order once and cut into blocks, so the even
    split across workers mixes the classes; workers shuffle within a window every epoch.
    """
    import numpy as np
    import ray.data

    table = read_split_table(cfg.data.root, split, columns, manifest=manifest)
    if split == "train" and cfg.data.train_rows:
        table = table.take(subset_rows(table.num_rows, cfg.data.train_rows))
    if split == "train":
        order = np.random.default_rng(cfg.seed).permutation(table.num_rows)
        table = table.take(order)
    rows_per_block = max(1, -(-table.num_rows // (8 * cfg.scaling.num_workers)))
    blocks = [table.slice(i, rows_per_block) for i in range(0, table.num_rows, rows_per_block)]
    # from_blocks computes each block's metadata here; from_arrow would run a Ray task per
    # block for it, which on a fresh instance starts worker processes (seconds per split).
    return ray.data.from_blocks(blocks)
