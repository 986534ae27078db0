"""Checking a dataset against its manifest (:func:`check_dataset`, :func:`verify_dataset`):
each shard's presence, size, checksum, schema, row count and, deeply, its values; every
problem names the file and what is wrong.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from osmd_ray.data.schema import (
    MANIFEST_NAME,
    Manifest,
    ShardInfo,
    column_to_numpy,
    dataset_fs,
    join_path,
    label_problem,
    load_manifest,
    nonfinite_rows,
)
from osmd_ray.errors import DataError

# Reading and hashing stream in blocks of this size, so big shards never sit in memory twice.
_BLOCK = 8 * 2**20


def _sha256_file(fs: fsspec.AbstractFileSystem, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


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
            problem = label_problem(label, m.num_classes, ignore)
            if problem:
                bad_labels.append(f"{problem} (counting from row {offset})")
        for col in floats:
            if t.column(col).null_count:
                continue
            rows = nonfinite_rows(column_to_numpy(t.column(col)))
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


def _check_shard(
    fs: fsspec.AbstractFileSystem,
    base: str,
    m: Manifest,
    shard: ShardInfo,
    deep: bool,
    seen_ids: set[str],
) -> list[str]:
    rel, full = shard.path, join_path(base, shard.path)
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
    fs, base = dataset_fs(root)
    try:
        manifest = load_manifest(fs, base, root)
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
