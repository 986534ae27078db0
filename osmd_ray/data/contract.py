"""The data contract of DESIGN §4: manifest, shards, and the checks a reader makes.

A dataset is a folder or an object-store prefix::

    <root>/manifest.json
    <root>/<split>/part-00000.parquet ...      split in {train, val, test}

Every shard holds the columns ``sample_id`` (string), one column per modality in Arrow's
``arrow.fixed_shape_tensor`` type, ``label`` (int64, or an int64 ``H x W`` tensor for
segmentation) and, for modalities missing on some rows, a boolean ``has_<modality>``.
``manifest.json`` promises what the shards hold (shapes, dtypes, row counts, byte sizes,
sha256) and carries the training split's per-channel normalisation statistics.

Every file operation goes through fsspec, so ``s3://...`` roots work like local folders.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import posixpath
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from osmd_ray import cluster, storage
from osmd_ray.errors import DataError

SCHEMA_VERSION = 1
KINDS = ("image", "sequence", "vector")
TASKS = ("classification", "segmentation")
SPLITS = ("train", "val", "test")
MANIFEST_NAME = "manifest.json"

# Number of per-sample dimensions of each kind: C x H x W, C x T, D.
_KIND_NDIM = {"image": 3, "sequence": 2, "vector": 1}
# A list of numbers that json.dumps spread over lines; JSON strings hold no raw newline, so
# this never matches inside a string.
_NUMBER_LIST = re.compile(r"\[\n[-+0-9.eE,\s]*\]")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# Reading and hashing stream in blocks of this size, so big shards never sit in memory twice.
_BLOCK = 8 * 2**20
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


@dataclass(frozen=True)
class ModalitySpec:
    name: str
    """Column name, e.g. rgb."""
    kind: str
    """image (C x H x W), sequence (C x T) or vector (D)."""
    shape: tuple[int, ...]
    """Per-sample shape."""
    dtype: str
    """numpy dtype name as stored, e.g. uint8 or float32."""


@dataclass
class ShardInfo:
    """One Parquet file of a split, as the manifest promises it."""

    path: str
    """Path relative to the dataset root, e.g. train/part-00000.parquet."""
    rows: int
    """Number of rows."""
    bytes: int
    """File size in bytes."""
    sha256: str
    """Hex sha256 of the whole file."""


@dataclass
class Manifest:
    """What a dataset holds: the content of manifest.json."""

    schema_version: int
    """Version of this contract the dataset was written with."""
    task: str
    """classification or segmentation."""
    num_classes: int
    """Labels lie in [0, num_classes)."""
    ignore_index: int
    """Segmentation label value that marks pixels without a label."""
    label_shape: tuple[int, ...]
    """() for classification, (H, W) for segmentation."""
    modalities: dict[str, ModalitySpec]
    """Every modality column, in column order."""
    splits: dict[str, list[ShardInfo]]
    """Shards per split (train, val, test)."""
    normalization: dict[str, dict[str, list[float]]]
    """Per modality {"mean": [...], "std": [...]}, one value per channel (vector: per element),
    in the stored units (e.g. 0..255 for uint8), computed on the training split."""
    optional_modalities: list[str] = field(default_factory=list)
    """Modalities missing on some rows: they have a has_<modality> column."""
    class_names: list[str] | None = None
    """Optional class names, num_classes of them."""
    description: str = ""
    """Free text: where the data come from."""

    def to_json(self) -> str:
        """The manifest as indented JSON text."""
        data = {
            "schema_version": self.schema_version,
            "task": self.task,
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "label_shape": list(self.label_shape),
            "class_names": self.class_names,
            "description": self.description,
            "modalities": {
                name: {"kind": s.kind, "shape": list(s.shape), "dtype": s.dtype}
                for name, s in self.modalities.items()
            },
            "optional_modalities": list(self.optional_modalities),
            "normalization": self.normalization,
            "splits": {
                split: [
                    {"path": s.path, "rows": s.rows, "bytes": s.bytes, "sha256": s.sha256}
                    for s in shards
                ]
                for split, shards in self.splits.items()
            },
        }
        text = json.dumps(data, indent=2)
        # Keep lists of numbers (shapes, statistics) on one line each, for a readable file.
        return _NUMBER_LIST.sub(lambda mt: json.dumps(json.loads(mt.group(0))), text) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str) -> Manifest:
        """Parse manifest text; every problem raises DataError naming ``source``."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{source}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise DataError(f"{source}: expected a JSON object, found {type(data).__name__}")
        version = data.get("schema_version")
        if _is_int(version) and version > SCHEMA_VERSION:
            raise DataError(
                f"{source}: schema_version {version} is newer than this osmd_ray understands "
                f"(up to {SCHEMA_VERSION}); upgrade osmd_ray to read this dataset"
            )
        missing = [name for name in _MANIFEST_FIELDS if name not in data]
        if missing:
            raise DataError(f"{source}: malformed manifest, missing field(s): {', '.join(missing)}")
        problems: list[str] = []
        manifest = _parse_manifest(data, problems)
        if problems:
            raise DataError(f"{source}: malformed manifest:\n  " + "\n  ".join(problems))
        return manifest

    def num_rows(self, split: str) -> int:
        """Total rows of a split."""
        return sum(s.rows for s in self._shards(split))

    def files(self, root: str, split: str) -> list[str]:
        """Full paths (or URIs) of a split's shards under ``root``, in manifest order."""
        return [_join(root, s.path) for s in self._shards(split)]

    def columns(self) -> list[str]:
        """Every column a shard holds, in order."""
        return ["sample_id", *self.modalities, "label"] + [
            f"has_{m}" for m in self.optional_modalities
        ]

    def _shards(self, split: str) -> list[ShardInfo]:
        if split not in self.splits:
            raise DataError(f"no split {split!r} in this dataset; it has {sorted(self.splits)}")
        return self.splits[split]


_MANIFEST_FIELDS = (
    "schema_version",
    "task",
    "num_classes",
    "ignore_index",
    "label_shape",
    "modalities",
    "splits",
    "normalization",
    "optional_modalities",
    "class_names",
    "description",
)


def infer_kind(shape: tuple[int, ...]) -> str:
    """The kind of a modality from its per-sample shape: 3 dims image, 2 sequence, 1 vector."""
    for kind, ndim in _KIND_NDIM.items():
        if len(shape) == ndim:
            return kind
    raise DataError(
        f"per-sample shape {tuple(shape)} fits no modality kind: expected C x H x W (image), "
        "C x T (sequence) or D (vector)"
    )


# --------------------------------------------------------------------------- manifest parsing


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_shape(x: Any) -> bool:
    return isinstance(x, list) and all(_is_int(d) and d > 0 for d in x)


def _valid_dtype(name: Any) -> bool:
    """Numeric (integer or float) numpy dtype names only, as the writer stores them."""
    if not isinstance(name, str):
        return False
    try:
        dt = np.dtype(name)
    except TypeError:
        return False
    return dt.kind in "iuf" and dt.name == name


def _parse_manifest(d: dict[str, Any], p: list[str]) -> Manifest:
    """Build a Manifest from parsed JSON, appending every problem found to ``p``."""
    if not _is_int(d["schema_version"]) or d["schema_version"] < 1:
        p.append(f"schema_version must be a positive integer, found {d['schema_version']!r}")
    task = d["task"]
    if task not in TASKS:
        p.append(f"task must be one of {', '.join(TASKS)}, found {task!r}")
    num_classes = d["num_classes"]
    if not _is_int(num_classes) or num_classes < 1:
        p.append(f"num_classes must be a positive integer, found {num_classes!r}")
    if not _is_int(d["ignore_index"]):
        p.append(f"ignore_index must be an integer, found {d['ignore_index']!r}")
    label_shape = d["label_shape"]
    if not _is_shape(label_shape):
        p.append(f"label_shape must be a list of positive integers, found {label_shape!r}")
        label_shape = []
    elif task == "classification" and label_shape:
        p.append(f"label_shape must be [] for classification, found {label_shape}")
    elif task == "segmentation" and len(label_shape) != 2:
        p.append(f"label_shape must be [H, W] for segmentation, found {label_shape}")

    modalities: dict[str, ModalitySpec] = {}
    if not isinstance(d["modalities"], dict) or not d["modalities"]:
        p.append("modalities must be a non-empty object")
    else:
        for name, spec in d["modalities"].items():
            if not isinstance(spec, dict):
                p.append(f"modalities.{name} must be an object with kind, shape and dtype")
                continue
            kind, shape, dtype = spec.get("kind"), spec.get("shape"), spec.get("dtype")
            if kind not in KINDS:
                p.append(f"modalities.{name}.kind must be one of {KINDS}, found {kind!r}")
            if not _is_shape(shape):
                p.append(f"modalities.{name}.shape must be a list of positive integers")
                continue
            if kind in KINDS and len(shape) != _KIND_NDIM[kind]:
                p.append(f"modalities.{name}.shape {shape} does not fit kind {kind}")
            if not _valid_dtype(dtype):
                p.append(f"modalities.{name}.dtype must be a numeric numpy dtype, found {dtype!r}")
            if name in ("sample_id", "label") or name.startswith("has_"):
                p.append(f"modality name {name!r} is reserved for another column")
            modalities[name] = ModalitySpec(name, kind, tuple(shape), dtype)

    splits: dict[str, list[ShardInfo]] = {}
    if not isinstance(d["splits"], dict) or not d["splits"]:
        p.append("splits must be a non-empty object")
    else:
        for split, shards in d["splits"].items():
            if split not in SPLITS:
                p.append(f"split {split!r} is not one of {', '.join(SPLITS)}")
            if not isinstance(shards, list):
                p.append(f"splits.{split} must be a list of shards")
                continue
            parsed = [
                _parse_shard(raw, f"splits.{split}[{i}]", split, p) for i, raw in enumerate(shards)
            ]
            splits[split] = [s for s in parsed if s is not None]

    optional = d["optional_modalities"]
    if not isinstance(optional, list) or not all(isinstance(m, str) for m in optional):
        p.append("optional_modalities must be a list of modality names")
        optional = []
    for m in optional:
        if modalities and m not in modalities:
            p.append(f"optional_modalities names {m!r}, which is not a modality")

    normalization = d["normalization"]
    if not isinstance(normalization, dict):
        p.append("normalization must be an object")
        normalization = {}
    for name, spec in modalities.items():
        stats = normalization.get(name)
        channels = spec.shape[0]
        for key in ("mean", "std"):
            values = stats.get(key) if isinstance(stats, dict) else None
            if not (
                isinstance(values, list)
                and len(values) == channels
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
            ):
                p.append(f"normalization.{name}.{key} must be {channels} finite number(s)")

    class_names = d["class_names"]
    if class_names is not None and not (
        isinstance(class_names, list)
        and all(isinstance(c, str) for c in class_names)
        and (not _is_int(num_classes) or len(class_names) == num_classes)
    ):
        p.append(f"class_names must be null or a list of {num_classes} strings")
    if not isinstance(d["description"], str):
        p.append("description must be a string")

    return Manifest(
        schema_version=d["schema_version"],
        task=task,
        num_classes=num_classes,
        ignore_index=d["ignore_index"],
        label_shape=tuple(label_shape),
        modalities=modalities,
        splits=splits,
        normalization=normalization,
        optional_modalities=list(optional),
        class_names=class_names,
        description=d["description"],
    )


def _parse_shard(raw: Any, where: str, split: str, p: list[str]) -> ShardInfo | None:
    if not isinstance(raw, dict):
        p.append(f"{where} must be an object with path, rows, bytes and sha256")
        return None
    path, rows, nbytes, sha = raw.get("path"), raw.get("rows"), raw.get("bytes"), raw.get("sha256")
    ok = True
    # A shard path is confined to its split's folder: a manifest must never point a reader
    # outside the dataset (e.g. "../../secrets.parquet").
    if not (
        isinstance(path, str)
        and path.startswith(f"{split}/")
        and path.endswith(".parquet")
        and ".." not in path.split("/")
        and "//" not in path
    ):
        p.append(f"{where}.path must be {split}/<name>.parquet, found {path!r}")
        ok = False
    if not _is_int(rows) or rows < 0:
        p.append(f"{where}.rows must be a non-negative integer, found {rows!r}")
        ok = False
    if not _is_int(nbytes) or nbytes < 0:
        p.append(f"{where}.bytes must be a non-negative integer, found {nbytes!r}")
        ok = False
    if not isinstance(sha, str) or not _SHA256_RE.match(sha):
        p.append(f"{where}.sha256 must be 64 lowercase hex digits, found {sha!r}")
        ok = False
    return ShardInfo(path, rows, nbytes, sha) if ok else None


# --------------------------------------------------------------------------- filesystem helpers


def _join(root: str, rel: str) -> str:
    """root + "/" + rel for local paths and URIs alike."""
    return root.rstrip("/") + "/" + rel


def _url_to_fs(root: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec filesystem and the protocol-less path of ``root`` (s3:// with the endpoint,
    timeouts and retries of osmd_ray.storage)."""
    fs, path = storage.url_to_fs(root)
    return fs, path.rstrip("/") or path


def _load_manifest(fs: fsspec.AbstractFileSystem, base: str, root: str) -> Manifest:
    source = _join(root, MANIFEST_NAME)
    path = _join(base, MANIFEST_NAME)
    if not fs.isfile(path):
        raise DataError(
            f"{source}: not found, so {root} holds no dataset (write one with "
            "`osmd data synth` or `osmd data import`)"
        )
    try:
        text = fs.cat_file(path).decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{source}: not UTF-8 text ({e})") from None
    return Manifest.from_json(text, source)


def read_manifest(root: str) -> Manifest:
    """Read and validate ``<root>/manifest.json``; DataError naming it when missing or bad."""
    fs, base = _url_to_fs(root)
    return _load_manifest(fs, base, root)


def _sha256_file(fs: fsspec.AbstractFileSystem, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


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


# --------------------------------------------------------------------------- writing


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
    if task not in TASKS:
        raise DataError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if not _is_int(num_classes) or num_classes < 1:
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

    names = [k for k in splits["train"] if k not in ("label", "sample_id")]
    if not names:
        raise DataError("split 'train' holds no modality arrays, only label/sample_id")
    for name in names:
        if name.startswith("has_"):
            raise DataError(
                f"split 'train': {name!r} looks like a presence mask; pass it as "
                f"present={{'train': {{{name[4:]!r}: mask}}}} instead of as a modality"
            )
    kinds = dict(kinds or {})
    for name in kinds:
        if name not in names:
            raise DataError(f"kinds names {name!r}, which is not a modality ({names})")

    modalities: dict[str, ModalitySpec] = {}
    for name in names:
        arr = splits["train"][name]
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
        if len(shape) != _KIND_NDIM[kind]:
            raise DataError(f"modality {name!r}: per-sample shape {shape} does not fit kind {kind}")
        modalities[name] = ModalitySpec(name, kind, shape, arr.dtype.name)

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
            raise DataError(
                f"{where}: label maps of shape {label.shape[1:]} differ from {label_shape}"
            )
        for name, spec in modalities.items():
            arr = data[name]
            if not isinstance(arr, np.ndarray):
                raise DataError(f"{where}, modality {name!r}: not a numpy array")
            if arr.shape[0] != n:
                raise DataError(
                    f"{where}, modality {name!r}: {arr.shape[0]} rows but label has {n}"
                )
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
        if "sample_id" in data:
            ids = np.asarray(data["sample_id"])
            if ids.shape != (n,):
                raise DataError(f"{where}: sample_id has shape {ids.shape}, expected ({n},)")
            id_list = [str(s) for s in ids.tolist()]
            if any(not s for s in id_list):
                raise DataError(f"{where}: sample_id holds an empty string")
            if len(set(id_list)) != n:
                raise DataError(f"{where}: sample_id values are not unique")
        else:
            id_list = [f"{split}-{i:07d}" for i in range(n)]
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
        rows[split], sample_ids[split], masks[split] = n, id_list, split_masks
    assert label_shape is not None
    return _Plan(modalities, label_shape, rows, sample_ids, masks, optional)


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


def _label_problem(label: np.ndarray, num_classes: int, ignore_index: int | None) -> str | None:
    """Describe labels outside [0, num_classes) (ignore_index allowed when given), or None."""
    bad = (label < 0) | (label >= num_classes)
    if ignore_index is not None:
        bad &= label != ignore_index
    if not bad.any():
        return None
    flat = bad.reshape(len(bad), -1).any(axis=1)
    row = int(np.flatnonzero(flat)[0])
    value = int(label[row][bad[row]].flat[0]) if label.ndim > 1 else int(label[row])
    allowed = f"[0, {num_classes})" + (f" or {ignore_index}" if ignore_index is not None else "")
    return f"{int(flat.sum())} row(s) with labels outside {allowed} (first: row {row}, {value})"


def _nonfinite_rows(x: np.ndarray) -> np.ndarray:
    """Indices of rows holding NaN or inf."""
    return np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))


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
            bad = _nonfinite_rows(arr)
            if len(bad):
                raise DataError(
                    f"split {split!r}, modality {name!r}: NaN or inf in {len(bad)} row(s) "
                    f"(first: row {start + int(bad[0])})"
                )
        cols[name] = pa.FixedShapeTensorArray.from_numpy_ndarray(arr)
    label = np.ascontiguousarray(job.arrays["label"], dtype=np.int64)
    ignore = fmt.ignore_index if fmt.task == "segmentation" else None
    problem = _label_problem(label, fmt.num_classes, ignore)
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
        fs, _join(target, job.rel), table, row_group_size=fmt.row_group_size
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
    if fs.isfile(_join(base, MANIFEST_NAME)):
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
    fs, base = _url_to_fs(out)
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
        parallel = (
            len(jobs) > 1
            and row_bytes * sum(plan.rows.values()) >= PARALLEL_MIN_BYTES
            and bool(os.environ.get("RAY_ADDRESS"))
        )

    train = splits["train"]
    normalization = {
        name: _channel_stats(train[name], plan.present["train"].get(name))
        for name in plan.modalities
    }

    fs, base = _url_to_fs(out)
    if "memory" in fs.protocol:
        parallel = False  # memory:// lives in this process; Ray tasks would write elsewhere
    staged = _prepare_target(fs, base, out, overwrite)
    existed = fs.exists(base)
    target = _sibling(base, "osmd-staging") if staged else base

    bar = _progress(len(jobs), f"writing {out}", progress)
    try:
        for split in splits:
            fs.makedirs(_join(target, split), exist_ok=True)
        if parallel:
            infos = _write_shards_in_ray(fs, target, jobs, fmt, bar)
        else:
            infos = []
            for job in jobs:
                infos.append(_write_shard(fs, target, job, fmt))
                bar.update(1)
        shards: dict[str, list[ShardInfo]] = {split: [] for split in splits}
        for job, info in zip(jobs, infos, strict=True):
            shards[job.split].append(info)
        manifest = Manifest(
            schema_version=SCHEMA_VERSION,
            task=task,
            num_classes=num_classes,
            ignore_index=ignore_index,
            label_shape=plan.label_shape,
            modalities=plan.modalities,
            splits=shards,
            normalization=normalization,
            optional_modalities=plan.optional,
            class_names=list(class_names) if class_names is not None else None,
            description=description,
        )
        with storage.atomic_writer(_join(target, MANIFEST_NAME), fs) as f:
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
    import ray

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
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="shard")


# --------------------------------------------------------------------------- checking


def _expected_types(m: Manifest) -> dict[str, pa.DataType]:
    """The Arrow type of every column the manifest promises."""
    types: dict[str, pa.DataType] = {"sample_id": pa.string()}
    for name, spec in m.modalities.items():
        types[name] = pa.fixed_shape_tensor(pa.from_numpy_dtype(np.dtype(spec.dtype)), spec.shape)
    if m.task == "classification":
        types["label"] = pa.int64()
    else:
        types["label"] = pa.fixed_shape_tensor(pa.int64(), m.label_shape)
    for name in m.optional_modalities:
        types[f"has_{name}"] = pa.bool_()
    return types


def _describe(t: pa.DataType) -> str:
    if isinstance(t, pa.FixedShapeTensorType):
        return f"tensor {tuple(t.shape)} of {t.value_type}"
    return str(t)


def _schema_problems(schema: pa.Schema, m: Manifest) -> dict[str, str]:
    """Column -> what is wrong with it; extra columns under their own name."""
    problems: dict[str, str] = {}
    expected = _expected_types(m)
    for col, want in expected.items():
        if col not in schema.names:
            problems[col] = f"column {col!r} is missing"
            continue
        got = schema.field(col).type
        if col == "sample_id" and got in (pa.string(), pa.large_string()):
            continue
        if isinstance(want, pa.FixedShapeTensorType) and isinstance(got, pa.FixedShapeTensorType):
            if tuple(got.shape) != tuple(want.shape):
                problems[col] = (
                    f"column {col!r} holds tensors of shape {tuple(got.shape)}, the manifest "
                    f"says {tuple(want.shape)}"
                )
            elif got.value_type != want.value_type:
                problems[col] = (
                    f"column {col!r} holds {got.value_type} values, the manifest says "
                    f"{want.value_type}"
                )
            elif got.permutation is not None and list(got.permutation) != sorted(got.permutation):
                problems[col] = f"column {col!r} has a permuted tensor layout"
        elif got != want:
            problems[col] = (
                f"column {col!r} has type {_describe(got)}, the manifest says {_describe(want)}"
            )
    for col in schema.names:
        if col not in expected:
            problems[col] = f"unexpected column {col!r} (not in the manifest)"
    return problems


def _content_problems(
    pf: pq.ParquetFile, m: Manifest, good: Iterable[str], seen_ids: set[str]
) -> list[str]:
    """Scan the values of the columns whose schema is right, one row group at a time."""
    good = set(good)
    floats = [n for n, s in m.modalities.items() if np.dtype(s.dtype).kind == "f" and n in good]
    columns = [c for c in ("sample_id", "label", *floats) if c in good]
    if not columns:
        return []
    nulls: dict[str, int] = {}
    nonfinite: dict[str, list[int]] = {}
    bad_labels: list[str] = []
    duplicates: list[str] = []
    offset = 0
    ignore = m.ignore_index if m.task == "segmentation" else None
    for g in range(pf.num_row_groups):
        t = pf.read_row_group(g, columns=columns)
        for col in columns:
            c = t.column(col)
            if c.null_count:
                nulls[col] = nulls.get(col, 0) + c.null_count
        if "label" in columns and not t.column("label").null_count:
            label = column_to_numpy(t.column("label"))
            problem = _label_problem(label, m.num_classes, ignore)
            if problem:
                bad_labels.append(f"{problem} (counting from row {offset})")
        for col in floats:
            if t.column(col).null_count:
                continue
            rows = _nonfinite_rows(column_to_numpy(t.column(col)))
            if len(rows):
                nonfinite.setdefault(col, []).extend(int(r) + offset for r in rows)
        if "sample_id" in columns:
            for sid in t.column("sample_id").to_pylist():
                if sid in seen_ids:
                    duplicates.append(sid)
                seen_ids.add(sid)
        offset += t.num_rows
    out = [f"column {col!r} holds {n} null value(s)" for col, n in nulls.items()]
    out += [f"label: {p}" for p in bad_labels]
    out += [
        f"column {col!r}: NaN or inf in {len(rows)} row(s) (first: row {rows[0]})"
        for col, rows in nonfinite.items()
    ]
    if duplicates:
        out.append(
            f"{len(duplicates)} sample_id value(s) repeated within the split "
            f"(first: {duplicates[0]!r})"
        )
    return out


def column_to_numpy(col: pa.ChunkedArray) -> np.ndarray:
    """A column as numpy: tensors as (N, *shape), strings as str, the rest as is."""
    if isinstance(col.type, pa.FixedShapeTensorType):
        if col.num_chunks == 0:
            shape = tuple(col.type.shape)
            return np.zeros((0, *shape), dtype=col.type.value_type.to_pandas_dtype())
        arr = col.combine_chunks().to_numpy_ndarray()
    elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        arr = np.array(col.to_pylist(), dtype=str)
    else:
        arr = col.to_numpy()
    # Zero-copy views of Arrow buffers are read-only; callers (torch.from_numpy) want to own.
    return arr if arr.flags.writeable else arr.copy()


def _check_shard(
    fs: fsspec.AbstractFileSystem,
    base: str,
    m: Manifest,
    shard: ShardInfo,
    deep: bool,
    seen_ids: set[str],
) -> list[str]:
    rel, full = shard.path, _join(base, shard.path)
    if not fs.isfile(full):
        return [f"{rel}: missing (listed in {MANIFEST_NAME})"]
    out: list[str] = []
    size = fs.size(full)
    if size != shard.bytes:
        out.append(
            f"{rel}: {size} bytes, but {MANIFEST_NAME} says {shard.bytes} (truncated or rewritten)"
        )
    if deep:
        digest = _sha256_file(fs, full)
        if digest != shard.sha256:
            out.append(
                f"{rel}: sha256 {digest[:12]}... differs from {MANIFEST_NAME}'s "
                f"{shard.sha256[:12]}... (the content changed)"
            )
    with fs.open(full, "rb") as f:
        try:
            pf = pq.ParquetFile(f)
            rows, schema = pf.metadata.num_rows, pf.schema_arrow
        except Exception as e:
            out.append(f"{rel}: not readable as Parquet ({type(e).__name__}: {e})")
            return out
        if rows != shard.rows:
            out.append(f"{rel}: {rows} rows, but {MANIFEST_NAME} says {shard.rows}")
        schema_problems = _schema_problems(schema, m)
        out += [f"{rel}: {p}" for p in schema_problems.values()]
        if deep:
            good = [c for c in schema.names if c not in schema_problems]
            try:
                out += [f"{rel}: {p}" for p in _content_problems(pf, m, good, seen_ids)]
            except Exception as e:
                out.append(f"{rel}: its data cannot be read ({type(e).__name__}: {e})")
    return out


def _check(root: str, deep: bool) -> tuple[Manifest | None, list[str]]:
    fs, base = _url_to_fs(root)
    try:
        manifest = _load_manifest(fs, base, root)
    except DataError as e:
        return None, [str(e)]
    problems: list[str] = []
    listed: set[str] = set()
    for split, shards in manifest.splits.items():
        if sum(s.rows for s in shards) == 0:
            problems.append(f"{MANIFEST_NAME}: split {split!r} is empty (no rows)")
        seen_ids: set[str] = set()
        for shard in shards:
            listed.add(shard.path)
            problems += _check_shard(fs, base, manifest, shard, deep, seen_ids)
    if fs.isdir(base):
        for path in sorted(fs.find(base)):
            rel = path[len(base) :].lstrip("/")
            if rel.endswith(".parquet") and rel not in listed:
                problems.append(f"{rel}: not in manifest ({MANIFEST_NAME} does not list it)")
    return manifest, problems


def check_dataset(root: str, deep: bool = True) -> list[str]:
    """Every problem with the dataset at ``root``, each naming the file and what is wrong.

    Always: manifest present, valid and of a known schema version; every listed shard exists,
    has the promised size, a readable Parquet footer with the promised schema and row count;
    no split is empty; no .parquet file under the root is missing from the manifest.
    ``deep`` adds the sha256 of every shard and scans the values: labels within range,
    no NaN/inf in float modalities, no nulls, unique sample ids per split.
    """
    return _check(root, deep)[1]


def verify_dataset(root: str, deep: bool = False) -> Manifest:
    """check_dataset, raising DataError that lists every problem (one per line)."""
    manifest, problems = _check(root, deep)
    if problems or manifest is None:
        raise DataError(
            f"dataset {root} failed its check ({len(problems)} problem(s)):\n" + "\n".join(problems)
        )
    return manifest
