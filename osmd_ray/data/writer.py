"""Writing a dataset of the §4 contract (:func:`write_dataset`): shards cut to a target size,
each written whole under a temporary name, normalisation statistics of the training split, and
the manifest last; in one process or, for large data on a cluster, in Ray tasks.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from osmd_ray import cluster, storage
from osmd_ray.data.schema import (
    KIND_NDIM,
    KINDS,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    SPLITS,
    TASKS,
    Manifest,
    ModalitySpec,
    ShardInfo,
    dataset_fs,
    infer_kind,
    is_int,
    join_path,
    label_problem,
    nonfinite_rows,
)
from osmd_ray.errors import DataError

# Float64 working set of one chunk of the normalisation statistics.
_STATS_CHUNK_BYTES = 32 * 2**20


DEFAULT_SHARD_MB = 256


"""Target shard size (MiB of uncompressed rows) of write_dataset and `--shard-mb`: large
enough that per-file costs (a read task, an object-store request, a footer) are negligible,
small enough that a split of a few GB still gives every reader several files."""


PARALLEL_MIN_BYTES = 512 * 2**20


"""write_dataset(parallel=None) writes shards in Ray tasks from this much data on, and only on
a cluster (RAY_ADDRESS): on one 2-core machine, 512 MiB took 35 s in Ray tasks against 10 s in
process, plus 9 s to start Ray (benchmarks/RESULTS.md, data I/O)."""


# Rows of a shard are grouped in Parquet row groups of about this many bytes.
_ROW_GROUP_BYTES = 64 * 2**20


# Per-row bytes beyond the tensors: the sample id's characters and its 4-byte offset.
_ROW_OVERHEAD_BYTES = 32


# How long a failed parallel write waits for its cancelled shard tasks to end.
_CANCEL_WAIT_S = 60.0


class _HashingSink:
    """A write-only file wrapper that hashes and counts what passes through, so a shard's
    sha256 and size come from the bytes written instead of a second read."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self.sha = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        self._raw.write(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._raw.flush()

    def close(self) -> None:
        # The owner of the underlying file closes it; pyarrow only marks its view closed.
        self.closed = True


def _write_parquet_atomic(
    fs: fsspec.AbstractFileSystem, path: str, table: pa.Table, row_group_size: int | None = None
) -> tuple[int, str]:
    """Write ``table`` whole or not at all (storage.atomic_writer); return (bytes, sha256)."""
    with storage.atomic_writer(path, fs) as raw:
        sink = _HashingSink(raw)
        if row_group_size is None:
            pq.write_table(table, sink)
        else:
            pq.write_table(table, sink, row_group_size=row_group_size)
    return sink.size, sink.sha.hexdigest()


@dataclass
class _Plan:
    """Validated input of write_dataset."""

    modalities: dict[str, ModalitySpec]
    label_shape: tuple[int, ...]
    rows: dict[str, int]
    sample_ids: dict[str, list[str]]
    present: dict[str, dict[str, np.ndarray]]
    optional: list[str]


def _plan(
    splits: Mapping[str, Mapping[str, np.ndarray]],
    task: str,
    num_classes: int,
    ignore_index: int,
    kinds: Mapping[str, str] | None,
    present: Mapping[str, Mapping[str, np.ndarray]] | None,
    class_names: list[str] | None,
) -> _Plan:
    """Check everything about the input that does not need a pass over the values."""
    _check_arguments(splits, task, num_classes, ignore_index, class_names)
    names = _modality_names(splits["train"], kinds)
    modalities = _modality_specs(splits["train"], names, dict(kinds or {}))

    present = present or {}
    for split in present:
        if split not in splits:
            raise DataError(f"present names split {split!r}, which is not given")
    optional = [m for m in names if any(m in present[s] for s in present)]

    label_shape: tuple[int, ...] | None = None
    rows: dict[str, int] = {}
    sample_ids: dict[str, list[str]] = {}
    masks: dict[str, dict[str, np.ndarray]] = {}
    for split, data in splits.items():
        where = f"split {split!r}"
        keys = [k for k in data if k not in ("label", "sample_id")]
        if set(keys) != set(names):
            raise DataError(
                f"{where}: modalities {sorted(keys)} differ from split 'train''s {sorted(names)} "
                "(every split must hold the same modalities)"
            )
        n, label_shape = _check_label(where, data, task, label_shape)
        _check_split_modalities(where, data, modalities, n)
        rows[split] = n
        sample_ids[split] = _sample_ids(split, where, data, n)
        masks[split] = _split_masks(split, where, present, modalities, optional, n)
    assert label_shape is not None
    return _Plan(modalities, label_shape, rows, sample_ids, masks, optional)


def _check_arguments(
    splits: Mapping[str, Mapping[str, np.ndarray]],
    task: str,
    num_classes: int,
    ignore_index: int,
    class_names: list[str] | None,
) -> None:
    """The task, the classes and the split names."""
    if task not in TASKS:
        raise DataError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if not is_int(num_classes) or num_classes < 1:
        raise DataError(f"num_classes must be a positive integer, got {num_classes!r}")
    if task == "segmentation" and 0 <= ignore_index < num_classes:
        raise DataError(f"ignore_index {ignore_index} lies inside the classes [0, {num_classes})")
    if class_names is not None and len(class_names) != num_classes:
        raise DataError(f"{len(class_names)} class_names given for {num_classes} classes")
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise DataError(f"unknown split(s) {unknown}; splits are {', '.join(SPLITS)}")
    if "train" not in splits:
        raise DataError("a train split is required (normalisation statistics come from it)")


def _modality_names(train: Mapping[str, np.ndarray], kinds: Mapping[str, str] | None) -> list[str]:
    """The modalities of the training split (every key but label and sample_id), checking
    that none is a presence mask and that ``kinds`` names only modalities."""
    names = [k for k in train if k not in ("label", "sample_id")]
    if not names:
        raise DataError("split 'train' holds no modality arrays, only label/sample_id")
    for name in names:
        if name.startswith("has_"):
            raise DataError(
                f"split 'train': {name!r} looks like a presence mask; pass it as "
                f"present={{'train': {{{name[4:]!r}: mask}}}} instead of as a modality"
            )
    for name in kinds or {}:
        if name not in names:
            raise DataError(f"kinds names {name!r}, which is not a modality ({names})")
    return names


def _modality_specs(
    train: Mapping[str, np.ndarray], names: list[str], kinds: Mapping[str, str]
) -> dict[str, ModalitySpec]:
    """Kind, per-sample shape and dtype of each modality, read off the training split."""
    modalities: dict[str, ModalitySpec] = {}
    for name in names:
        arr = train[name]
        if not isinstance(arr, np.ndarray) or arr.ndim < 2:
            raise DataError(
                f"split 'train', modality {name!r}: expected an array (N, *shape), got "
                f"{getattr(arr, 'shape', type(arr).__name__)}"
            )
        if arr.dtype.kind not in "iuf":
            raise DataError(
                f"split 'train', modality {name!r}: dtype {arr.dtype} is not an integer or float "
                "type"
            )
        shape = tuple(int(d) for d in arr.shape[1:])
        kind = kinds.get(name) or infer_kind(shape)
        if kind not in KINDS:
            raise DataError(f"modality {name!r}: kind {kind!r} is not one of {', '.join(KINDS)}")
        if len(shape) != KIND_NDIM[kind]:
            raise DataError(f"modality {name!r}: per-sample shape {shape} does not fit kind {kind}")
        modalities[name] = ModalitySpec(name, kind, shape, arr.dtype.name)
    return modalities


def _check_label(
    where: str,
    data: Mapping[str, np.ndarray],
    task: str,
    label_shape: tuple[int, ...] | None,
) -> tuple[int, tuple[int, ...]]:
    """The rows of one split and its label maps' shape (() for classification), which must
    match ``label_shape`` of the splits before it (None for the first)."""
    if "label" not in data:
        raise DataError(f"{where}: no 'label' array")
    label = data["label"]
    if not isinstance(label, np.ndarray) or label.dtype.kind not in "iu":
        raise DataError(
            f"{where}: label must be an integer array, got "
            f"{getattr(label, 'dtype', type(label).__name__)}"
        )
    n = label.shape[0] if label.ndim else 0
    if n == 0:
        raise DataError(f"{where} has no rows; leave the split out instead")
    want_ndim = 1 if task == "classification" else 3
    if label.ndim != want_ndim:
        raise DataError(
            f"{where}: label has shape {label.shape}; {task} expects "
            + ("(N,)" if task == "classification" else "(N, H, W)")
        )
    if label_shape is None:
        label_shape = tuple(int(d) for d in label.shape[1:])
    elif tuple(label.shape[1:]) != label_shape:
        raise DataError(f"{where}: label maps of shape {label.shape[1:]} differ from {label_shape}")
    return n, label_shape


def _check_split_modalities(
    where: str, data: Mapping[str, np.ndarray], modalities: dict[str, ModalitySpec], n: int
) -> None:
    """Every modality of one split: ``n`` rows of the training split's shape and dtype."""
    for name, spec in modalities.items():
        arr = data[name]
        if not isinstance(arr, np.ndarray):
            raise DataError(f"{where}, modality {name!r}: not a numpy array")
        if arr.shape[0] != n:
            raise DataError(f"{where}, modality {name!r}: {arr.shape[0]} rows but label has {n}")
        if tuple(arr.shape[1:]) != spec.shape:
            raise DataError(
                f"{where}, modality {name!r}: per-sample shape {tuple(arr.shape[1:])} "
                f"differs from split 'train''s {spec.shape}"
            )
        if arr.dtype.name != spec.dtype:
            raise DataError(
                f"{where}, modality {name!r}: dtype {arr.dtype.name} differs from split "
                f"'train''s {spec.dtype}"
            )


def _sample_ids(split: str, where: str, data: Mapping[str, np.ndarray], n: int) -> list[str]:
    """The split's sample ids (non-empty, unique), or <split>-<row> when it gives none."""
    if "sample_id" not in data:
        return [f"{split}-{i:07d}" for i in range(n)]
    ids = np.asarray(data["sample_id"])
    if ids.shape != (n,):
        raise DataError(f"{where}: sample_id has shape {ids.shape}, expected ({n},)")
    id_list = [str(s) for s in ids.tolist()]
    if any(not s for s in id_list):
        raise DataError(f"{where}: sample_id holds an empty string")
    if len(set(id_list)) != n:
        raise DataError(f"{where}: sample_id values are not unique")
    return id_list


def _split_masks(
    split: str,
    where: str,
    present: Mapping[str, Mapping[str, np.ndarray]],
    modalities: dict[str, ModalitySpec],
    optional: list[str],
    n: int,
) -> dict[str, np.ndarray]:
    """has_<m> of every optional modality in one split: the mask given, or all true."""
    split_masks = {}
    for m, mask in present.get(split, {}).items():
        if m not in modalities:
            raise DataError(f"present[{split!r}] names {m!r}, which is not a modality")
        mask = np.asarray(mask)
        if mask.dtype != np.bool_ or mask.shape != (n,):
            raise DataError(
                f"{where}: present mask for {m!r} must be a bool array of shape ({n},), got "
                f"{mask.dtype} {mask.shape}"
            )
        split_masks[m] = mask
    for m in optional:
        split_masks.setdefault(m, np.ones(n, dtype=bool))
    return split_masks


def _channel_stats(arr: np.ndarray, mask: np.ndarray | None) -> dict[str, list[float]]:
    """Per-channel mean and std over every other axis (axis 1 is the channel; for a vector,
    each element is its own channel), excluding rows whose mask is false.

    Works in float64 chunks of rows and merges them with Chan et al.'s pairwise update, which
    keeps the memory bounded and avoids the cancellation of sum-of-squares formulas.
    """
    n, channels = arr.shape[0], arr.shape[1]
    per_row = max(1, int(np.prod(arr.shape[1:])) * 8)
    chunk = max(1, _STATS_CHUNK_BYTES // per_row)
    count = 0
    mean = np.zeros(channels)
    m2 = np.zeros(channels)
    for start in range(0, n, chunk):
        x = arr[start : start + chunk]
        if mask is not None:
            x = x[mask[start : start + chunk]]
        if len(x) == 0:
            continue
        x = x.astype(np.float64).reshape(len(x), channels, -1)
        nb = x.shape[0] * x.shape[2]
        mb = x.mean(axis=(0, 2))
        m2b = ((x - mb[None, :, None]) ** 2).sum(axis=(0, 2))
        delta = mb - mean
        total = count + nb
        mean = mean + delta * (nb / total)
        m2 = m2 + m2b + delta**2 * (count * nb / total)
        count = total
    if count == 0:
        # Absent from every training row: identity normalisation rather than NaN.
        return {"mean": [0.0] * channels, "std": [1.0] * channels}
    std = np.sqrt(m2 / count)
    # A constant channel would divide by ~0; leave it unscaled instead.
    std[std < 1e-6] = 1.0
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}


@dataclass
class _ShardJob:
    """The rows of one shard, as views of the caller's arrays (no copy until written)."""

    split: str
    index: int
    """Shard number within the split: the k of part-0000k.parquet."""
    start: int
    """First row of the shard within its split (error messages count rows from there)."""
    arrays: dict[str, np.ndarray]
    """Every modality and ``label``, rows [start, start + rows)."""
    sample_ids: list[str]
    masks: dict[str, np.ndarray]
    """has_<m> of every optional modality."""

    @property
    def rel(self) -> str:
        return f"{self.split}/part-{self.index:05d}.parquet"

    @property
    def rows(self) -> int:
        return len(self.sample_ids)


@dataclass(frozen=True)
class _ShardFormat:
    """What every shard of one dataset shares: the columns and the label rules."""

    modalities: tuple[str, ...]
    optional: tuple[str, ...]
    task: str
    num_classes: int
    ignore_index: int
    row_group_size: int
    """Rows per Parquet row group (about _ROW_GROUP_BYTES each): check_dataset and readers
    hold one row group of a shard in memory at a time."""


def _shard_jobs(
    splits: Mapping[str, Mapping[str, np.ndarray]], plan: _Plan, rows_per_shard: int
) -> list[_ShardJob]:
    jobs = []
    for split, data in splits.items():
        keys = [*plan.modalities, "label"]
        for k, start in enumerate(range(0, plan.rows[split], rows_per_shard)):
            stop = min(plan.rows[split], start + rows_per_shard)
            jobs.append(
                _ShardJob(
                    split,
                    k,
                    start,
                    {key: data[key][start:stop] for key in keys},
                    plan.sample_ids[split][start:stop],
                    {m: plan.present[split][m][start:stop] for m in plan.optional},
                )
            )
    return jobs


def _shard_table(job: _ShardJob, fmt: _ShardFormat) -> pa.Table:
    """The Arrow table of one shard; DataError for NaN/inf or labels out of range."""
    split, start = job.split, job.start
    cols: dict[str, pa.Array] = {"sample_id": pa.array(job.sample_ids, type=pa.string())}
    for name in fmt.modalities:
        arr = np.ascontiguousarray(job.arrays[name])
        mask = job.masks.get(name)
        if mask is not None and not mask.all():
            arr = arr.copy()  # never write into the caller's array
            arr[~mask] = 0
        if arr.dtype.kind == "f":
            bad = nonfinite_rows(arr)
            if len(bad):
                raise DataError(
                    f"split {split!r}, modality {name!r}: NaN or inf in {len(bad)} row(s) "
                    f"(first: row {start + int(bad[0])})"
                )
        cols[name] = pa.FixedShapeTensorArray.from_numpy_ndarray(arr)
    label = np.ascontiguousarray(job.arrays["label"], dtype=np.int64)
    ignore = fmt.ignore_index if fmt.task == "segmentation" else None
    problem = label_problem(label, fmt.num_classes, ignore)
    if problem:
        raise DataError(f"split {split!r}: {problem} (counting from row {start})")
    if fmt.task == "classification":
        cols["label"] = pa.array(label, type=pa.int64())
    else:
        cols["label"] = pa.FixedShapeTensorArray.from_numpy_ndarray(label)
    for m in fmt.optional:
        cols[f"has_{m}"] = pa.array(job.masks[m], type=pa.bool_())
    return pa.table(cols)


def _write_shard(
    fs: fsspec.AbstractFileSystem, target: str, job: _ShardJob, fmt: _ShardFormat
) -> ShardInfo:
    """Build, check and atomically write one shard under ``target``; its manifest entry.

    The same function runs in the writing process and, for parallel writes, in Ray tasks."""
    table = _shard_table(job, fmt)
    nbytes, digest = _write_parquet_atomic(
        fs, join_path(target, job.rel), table, row_group_size=fmt.row_group_size
    )
    return ShardInfo(job.rel, job.rows, nbytes, digest)


def _sibling(base: str, tag: str) -> str:
    head, tail = posixpath.split(base.rstrip("/"))
    if not tail:
        raise DataError(f"cannot replace {base!r}: it has no parent folder to stage into")
    return posixpath.join(head, f".{tail}.{tag}-{uuid.uuid4().hex[:12]}")


def _is_leftover(rel: str) -> bool:
    """A file an interrupted write_dataset could have left: a shard or a temporary name."""
    parts = rel.split("/")
    if len(parts) == 1:
        return parts[0].startswith(f".{MANIFEST_NAME}.tmp-")
    return (
        len(parts) == 2
        and parts[0] in SPLITS
        and (parts[1].endswith(".parquet") or ".tmp-" in parts[1])
    )


def _prepare_target(fs: fsspec.AbstractFileSystem, base: str, out: str, overwrite: bool) -> bool:
    """Decide where to write; True when the new dataset must be staged beside ``out`` and
    swapped in at the end (there is something at ``out`` to keep until then)."""
    if fs.isfile(join_path(base, MANIFEST_NAME)):
        if not overwrite:
            raise DataError(
                f"{out} already holds a dataset ({MANIFEST_NAME} exists); pass --overwrite "
                "(overwrite=True) to replace it"
            )
        return True
    if not fs.exists(base):
        return False
    if not fs.isdir(base):
        raise DataError(f"{out} exists and is not a folder")
    present = [p[len(base) :].lstrip("/") for p in fs.find(base)]
    if not present:
        return False
    if overwrite and all(_is_leftover(rel) for rel in present):
        return True
    hint = (
        "it looks like an interrupted write: pass --overwrite to replace it"
        if all(_is_leftover(rel) for rel in present)
        else "choose a new or empty folder"
    )
    raise DataError(f"{out} is not empty and holds no {MANIFEST_NAME}; {hint}")


def check_target(out: str, overwrite: bool = False) -> None:
    """Raise the DataError :func:`write_dataset` would raise for an occupied ``out``, before
    an importer spends minutes reading its source."""
    fs, base = dataset_fs(out)
    _prepare_target(fs, base, out, overwrite)


def _swap_in(fs: fsspec.AbstractFileSystem, staging: str, base: str) -> None:
    """Replace ``base`` by the complete dataset at ``staging``; on failure put it back."""
    backup = _sibling(base, "osmd-old")
    fs.mv(base, backup, recursive=True)
    try:
        fs.mv(staging, base, recursive=True)
    except BaseException:
        fs.mv(backup, base, recursive=True)
        raise
    with contextlib.suppress(Exception):
        fs.rm(backup, recursive=True)


def estimate_row_bytes(
    modalities: Mapping[str, ModalitySpec], label_shape: tuple[int, ...], optional: int = 0
) -> int:
    """Uncompressed bytes of one row: the tensors, the int64 label(s), ``optional`` has_<m>
    booleans and _ROW_OVERHEAD_BYTES for the sample id. Shards are cut by this estimate."""
    tensors = sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in modalities.values())
    return tensors + 8 * max(1, int(np.prod(label_shape))) + optional + _ROW_OVERHEAD_BYTES


def rows_per_shard_for(row_bytes: int, target_shard_bytes: int) -> int:
    """Rows that fit ``target_shard_bytes`` at ``row_bytes`` each (at least one)."""
    if target_shard_bytes < 1:
        raise DataError(f"the target shard size must be positive, got {target_shard_bytes} bytes")
    return max(1, target_shard_bytes // max(1, row_bytes))


def shard_bytes(shard_mb: float) -> int:
    """--shard-mb in bytes (MiB), at least one."""
    return max(1, int(shard_mb * 2**20))


def write_dataset(
    out: str,
    splits: Mapping[str, Mapping[str, np.ndarray]],
    *,
    task: str,
    num_classes: int,
    ignore_index: int = -100,
    kinds: Mapping[str, str] | None = None,
    present: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    class_names: list[str] | None = None,
    description: str = "",
    rows_per_shard: int | None = None,
    target_shard_bytes: int = DEFAULT_SHARD_MB * 2**20,
    parallel: bool | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Manifest:
    """Write a dataset to ``out`` (folder or URI) and return its manifest.

    ``splits`` maps split name -> {modality: (N, *shape) array, "label": (N,) or (N, H, W)
    integers, optional "sample_id": (N,) strings}. ``present[split][modality]`` is a bool (N,)
    mask: the modality gets a has_<modality> column and the rows without it hold zeros.
    Kinds are inferred from the per-sample shapes unless ``kinds`` names them.

    Each split is cut into shards of ``rows_per_shard`` rows, by default as many as fit
    ``target_shard_bytes`` of uncompressed data (estimate_row_bytes). ``parallel`` writes
    the shards in Ray tasks (starting a local Ray instance if none is connected); None
    decides: in parallel on a cluster (RAY_ADDRESS) when there are several shards and at
    least PARALLEL_MIN_BYTES of data, in this process otherwise (no Ray start on one
    machine, where it was measured slower). Both ways write the same files.

    Shards go to temporary names and are moved into place; manifest.json comes last, once
    every shard is in place. When ``out`` already holds a dataset (and ``overwrite``), the
    new one is written beside it and swapped in only once complete, so a failure leaves the
    previous dataset as it was; the swap replaces the whole folder. A non-empty folder
    without a manifest is refused unless it holds nothing but the leftovers of an
    interrupted write (and ``overwrite``). Input that breaks the contract (mismatched
    splits, NaN, labels out of range) raises DataError and leaves nothing behind.
    """
    plan = _plan(splits, task, num_classes, ignore_index, kinds, present, class_names)
    row_bytes = estimate_row_bytes(plan.modalities, plan.label_shape, len(plan.optional))
    if rows_per_shard is None:
        rows_per_shard = rows_per_shard_for(row_bytes, target_shard_bytes)
    if rows_per_shard < 1:
        raise DataError(f"rows_per_shard must be positive, got {rows_per_shard}")
    jobs = _shard_jobs(splits, plan, rows_per_shard)
    fmt = _ShardFormat(
        modalities=tuple(plan.modalities),
        optional=tuple(plan.optional),
        task=task,
        num_classes=num_classes,
        ignore_index=ignore_index,
        row_group_size=max(1, min(rows_per_shard, _ROW_GROUP_BYTES // row_bytes)),
    )
    if parallel is None:
        parallel = _parallel_by_default(len(jobs), row_bytes * sum(plan.rows.values()))
    train = splits["train"]
    normalization = {
        name: _channel_stats(train[name], plan.present["train"].get(name))
        for name in plan.modalities
    }
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        task=task,
        num_classes=num_classes,
        ignore_index=ignore_index,
        label_shape=plan.label_shape,
        modalities=plan.modalities,
        splits={},  # _write_files adds the shards once they are written
        normalization=normalization,
        optional_modalities=plan.optional,
        class_names=list(class_names) if class_names is not None else None,
        description=description,
    )
    return _write_files(out, list(splits), jobs, fmt, manifest, parallel, overwrite, progress)


def _parallel_by_default(shards: int, nbytes: int) -> bool:
    """What ``parallel=None`` means: Ray tasks for several shards of at least
    PARALLEL_MIN_BYTES in all, on a cluster (RAY_ADDRESS) only."""
    return shards > 1 and nbytes >= PARALLEL_MIN_BYTES and bool(os.environ.get("RAY_ADDRESS"))


def _write_files(
    out: str,
    split_names: list[str],
    jobs: list[_ShardJob],
    fmt: _ShardFormat,
    manifest: Manifest,
    parallel: bool,
    overwrite: bool,
    progress: bool,
) -> Manifest:
    """Write the shards of ``jobs``, then ``manifest`` with their entries as its splits, to
    ``out`` (staged beside a dataset already there and swapped in once complete); on any
    failure remove what was written. Return the manifest written."""
    fs, base = dataset_fs(out)
    if "memory" in fs.protocol:
        parallel = False  # memory:// lives in this process; Ray tasks would write elsewhere
    staged = _prepare_target(fs, base, out, overwrite)
    existed = fs.exists(base)
    target = _sibling(base, "osmd-staging") if staged else base

    bar = _progress(len(jobs), f"writing {out}", progress)
    try:
        for split in split_names:
            fs.makedirs(join_path(target, split), exist_ok=True)
        if parallel:
            infos = _write_shards_in_ray(fs, target, jobs, fmt, bar)
        else:
            infos = []
            for job in jobs:
                infos.append(_write_shard(fs, target, job, fmt))
                bar.update(1)
        shards: dict[str, list[ShardInfo]] = {split: [] for split in split_names}
        for job, info in zip(jobs, infos, strict=True):
            shards[job.split].append(info)
        manifest = replace(manifest, splits=shards)
        with storage.atomic_writer(join_path(target, MANIFEST_NAME), fs) as f:
            f.write(manifest.to_json().encode("utf-8"))
        if staged:
            _swap_in(fs, target, base)
    except BaseException:
        _discard(fs, target, staged, existed)
        raise
    finally:
        bar.close()
    return manifest


def _write_shards_in_ray(
    fs: fsspec.AbstractFileSystem,
    target: str,
    jobs: list[_ShardJob],
    fmt: _ShardFormat,
    bar: Any,
) -> list[ShardInfo]:
    """Write every shard in a Ray task of its own; their ShardInfo, in the order of ``jobs``.

    At most one task per cluster CPU is in flight: each holds a copy of its rows in the
    object store, so memory stays bounded by that many shards, whatever the dataset's size.
    On the first failure the tasks still in flight are cancelled (a cancelled write removes
    its temporary file) and waited for, so none writes after the caller cleans up; the
    task's own exception is raised (e.g. the DataError that names a NaN row).
    """
    import ray  # lazy: seconds to import, and only parallel writes need it

    # Connect to RAY_ADDRESS or start a local instance, as `osmd train` does.
    cluster.ensure_ray(worker_cpus=2, use_gpu=False)
    write = ray.remote(num_cpus=1, max_retries=0)(_write_shard)
    window = max(2, int(ray.cluster_resources().get("CPU", 2)))
    infos: dict[int, ShardInfo] = {}
    pending: dict[Any, int] = {}

    def collect_one() -> None:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            i = pending.pop(ref)
            try:
                infos[i] = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                cause = e.cause
                if isinstance(cause, Exception):
                    raise cause from (None if isinstance(cause, DataError) else e)
                raise
            bar.update(1)

    try:
        for i, job in enumerate(jobs):
            while len(pending) >= window:
                collect_one()
            pending[write.remote(fs, target, job, fmt)] = i
        while pending:
            collect_one()
    except BaseException:
        refs = list(pending)
        for ref in refs:
            with contextlib.suppress(Exception):
                ray.cancel(ref)
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=_CANCEL_WAIT_S)
        raise
    return [infos[i] for i in range(len(jobs))]


def _discard(fs: fsspec.AbstractFileSystem, target: str, staged: bool, existed: bool) -> None:
    """Remove what a failed write left. ``target`` is either a staging folder of our own or
    ``out`` itself, which _prepare_target found absent or empty, so all of it is ours."""
    with contextlib.suppress(Exception):
        if staged or not existed:
            if fs.exists(target):
                fs.rm(target, recursive=True)
        else:
            for entry in fs.ls(target, detail=False):
                fs.rm(entry, recursive=True)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm  # lazy: only when a progress bar is shown

    return tqdm(total=total, desc=desc, unit="shard")
