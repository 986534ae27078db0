"""The data contract of DESIGN §4: what a dataset holds and what its manifest promises.

A dataset is a folder or an object-store prefix::

    <root>/manifest.json
    <root>/<split>/part-00000.parquet ...      split in {train, val, test}

Every shard holds the columns ``sample_id`` (string), one column per modality in Arrow's
``arrow.fixed_shape_tensor`` type, ``label`` (int64, or an int64 ``H x W`` tensor for
segmentation) and, for modalities missing on some rows, a boolean ``has_<modality>``.
``manifest.json`` promises what the shards hold (shapes, dtypes, row counts, byte sizes,
sha256) and carries the training split's per-channel normalisation statistics.

This module holds the contract itself (its constants, :class:`Manifest` and its parser, the
content rules a label and a value must follow); :mod:`osmd_ray.data.writer` writes datasets
and :mod:`osmd_ray.data.checker` checks them. Every file operation goes through fsspec, so
``s3://...`` roots work like local folders.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa

from osmd_ray import storage
from osmd_ray.errors import DataError

SCHEMA_VERSION = 1


KINDS = ("image", "sequence", "vector")


TASKS = ("classification", "segmentation")


SPLITS = ("train", "val", "test")


MANIFEST_NAME = "manifest.json"


IGNORE_INDEX = -100
"""The label of a pixel without a class (segmentation), and what the training loss and the
metrics leave out: PyTorch's cross-entropy default."""

# Number of per-sample dimensions of each kind: C x H x W, C x T, D.
KIND_NDIM = {"image": 3, "sequence": 2, "vector": 1}


# A list of numbers that json.dumps spread over lines; JSON strings hold no raw newline, so
# this never matches inside a string.
_NUMBER_LIST = re.compile(r"\[\n[-+0-9.eE,\s]*\]")


_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


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
        if is_int(version) and version > SCHEMA_VERSION:
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
        return [join_path(root, s.path) for s in self._shards(split)]

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
    for kind, ndim in KIND_NDIM.items():
        if len(shape) == ndim:
            return kind
    raise DataError(
        f"per-sample shape {tuple(shape)} fits no modality kind: expected C x H x W (image), "
        "C x T (sequence) or D (vector)"
    )


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_shape(x: Any) -> bool:
    return isinstance(x, list) and all(is_int(d) and d > 0 for d in x)


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
    if not is_int(d["schema_version"]) or d["schema_version"] < 1:
        p.append(f"schema_version must be a positive integer, found {d['schema_version']!r}")
    task = d["task"]
    if task not in TASKS:
        p.append(f"task must be one of {', '.join(TASKS)}, found {task!r}")
    num_classes = d["num_classes"]
    if not is_int(num_classes) or num_classes < 1:
        p.append(f"num_classes must be a positive integer, found {num_classes!r}")
    if not is_int(d["ignore_index"]):
        p.append(f"ignore_index must be an integer, found {d['ignore_index']!r}")
    label_shape = _parse_label_shape(d["label_shape"], task, p)
    modalities = _parse_modalities(d["modalities"], p)
    splits = _parse_splits(d["splits"], p)

    optional = d["optional_modalities"]
    if not isinstance(optional, list) or not all(isinstance(m, str) for m in optional):
        p.append("optional_modalities must be a list of modality names")
        optional = []
    for m in optional:
        if modalities and m not in modalities:
            p.append(f"optional_modalities names {m!r}, which is not a modality")

    normalization = _parse_normalization(d["normalization"], modalities, p)
    class_names = d["class_names"]
    if class_names is not None and not (
        isinstance(class_names, list)
        and all(isinstance(c, str) for c in class_names)
        and (not is_int(num_classes) or len(class_names) == num_classes)
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


def _parse_label_shape(label_shape: Any, task: str, p: list[str]) -> list[int]:
    """``label_shape`` as found when it is a shape, else [] (with the problem in ``p``)."""
    if not _is_shape(label_shape):
        p.append(f"label_shape must be a list of positive integers, found {label_shape!r}")
        return []
    if task == "classification" and label_shape:
        p.append(f"label_shape must be [] for classification, found {label_shape}")
    elif task == "segmentation" and len(label_shape) != 2:
        p.append(f"label_shape must be [H, W] for segmentation, found {label_shape}")
    return label_shape


def _parse_modalities(raw: Any, p: list[str]) -> dict[str, ModalitySpec]:
    """The ``modalities`` object; an entry without a valid shape is left out."""
    modalities: dict[str, ModalitySpec] = {}
    if not isinstance(raw, dict) or not raw:
        p.append("modalities must be a non-empty object")
        return modalities
    for name, spec in raw.items():
        if not isinstance(spec, dict):
            p.append(f"modalities.{name} must be an object with kind, shape and dtype")
            continue
        kind, shape, dtype = spec.get("kind"), spec.get("shape"), spec.get("dtype")
        if kind not in KINDS:
            p.append(f"modalities.{name}.kind must be one of {KINDS}, found {kind!r}")
        if not _is_shape(shape):
            p.append(f"modalities.{name}.shape must be a list of positive integers")
            continue
        if kind in KINDS and len(shape) != KIND_NDIM[kind]:
            p.append(f"modalities.{name}.shape {shape} does not fit kind {kind}")
        if not _valid_dtype(dtype):
            p.append(f"modalities.{name}.dtype must be a numeric numpy dtype, found {dtype!r}")
        if name in ("sample_id", "label") or name.startswith("has_"):
            p.append(f"modality name {name!r} is reserved for another column")
        modalities[name] = ModalitySpec(name, kind, tuple(shape), dtype)
    return modalities


def _parse_splits(raw: Any, p: list[str]) -> dict[str, list[ShardInfo]]:
    """The ``splits`` object: the valid shards of each split that is a list."""
    splits: dict[str, list[ShardInfo]] = {}
    if not isinstance(raw, dict) or not raw:
        p.append("splits must be a non-empty object")
        return splits
    for split, shards in raw.items():
        if split not in SPLITS:
            p.append(f"split {split!r} is not one of {', '.join(SPLITS)}")
        if not isinstance(shards, list):
            p.append(f"splits.{split} must be a list of shards")
            continue
        parsed = [
            _parse_shard(entry, f"splits.{split}[{i}]", split, p) for i, entry in enumerate(shards)
        ]
        splits[split] = [s for s in parsed if s is not None]
    return splits


def _parse_normalization(
    raw: Any, modalities: dict[str, ModalitySpec], p: list[str]
) -> dict[str, Any]:
    """The ``normalization`` object ({} when it is not one), checking that every modality
    has one finite mean and std per channel."""
    normalization = raw
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
    return normalization


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
    if not is_int(rows) or rows < 0:
        p.append(f"{where}.rows must be a non-negative integer, found {rows!r}")
        ok = False
    if not is_int(nbytes) or nbytes < 0:
        p.append(f"{where}.bytes must be a non-negative integer, found {nbytes!r}")
        ok = False
    if not isinstance(sha, str) or not _SHA256_RE.match(sha):
        p.append(f"{where}.sha256 must be 64 lowercase hex digits, found {sha!r}")
        ok = False
    return ShardInfo(path, rows, nbytes, sha) if ok else None


def join_path(root: str, rel: str) -> str:
    """root + "/" + rel for local paths and URIs alike."""
    return root.rstrip("/") + "/" + rel


def dataset_fs(root: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec filesystem and the protocol-less path of ``root`` (s3:// with the endpoint,
    timeouts and retries of osmd_ray.storage)."""
    fs, path = storage.url_to_fs(root)
    return fs, path.rstrip("/") or path


def load_manifest(fs: fsspec.AbstractFileSystem, base: str, root: str) -> Manifest:
    """The manifest of the dataset at ``root`` (``base``: its path inside ``fs``)."""
    source = join_path(root, MANIFEST_NAME)
    path = join_path(base, MANIFEST_NAME)
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
    fs, base = dataset_fs(root)
    return load_manifest(fs, base, root)


def label_problem(label: np.ndarray, num_classes: int, ignore_index: int | None) -> str | None:
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


def nonfinite_rows(x: np.ndarray) -> np.ndarray:
    """Indices of rows holding NaN or inf."""
    return np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))


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
