"""Import NPZ files (``np.savez``) into a dataset of the §4 contract.

Each file holds one split: one array per modality (first axis = samples), ``label`` and,
optionally, ``has_<modality>`` bool masks and ``sample_id`` strings. The per-sample shape of
each modality decides its kind (C x H x W image, C x T sequence, D vector). Files are loaded
with ``allow_pickle=False``: object arrays are refused rather than unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from osmd_ray import storage
from osmd_ray.data.schema import IGNORE_INDEX, TASKS, Manifest, infer_kind
from osmd_ray.data.writer import DEFAULT_SHARD_MB, write_dataset
from osmd_ray.errors import DataError


@dataclass
class _NpzSplit:
    """The validated content of one NPZ file."""

    path: str
    """Where it came from (for messages)."""
    modalities: dict[str, np.ndarray]
    """Modality name -> (N, *shape) array."""
    label: np.ndarray
    """(N,) or (N, H, W) integers."""
    present: dict[str, np.ndarray]
    """Modality name -> (N,) bool, for the has_<m> arrays the file holds."""
    sample_id: np.ndarray
    """(N,) str; generated from the file's role (e.g. train-0000042) when the file has none."""


def _load_npz(path: str, role: str, task: str) -> _NpzSplit:
    """Load and validate one NPZ file; every DataError names the file and the key."""
    arrays = _read_npz(path)
    label = _pop_label(path, arrays, task)
    n = len(label)
    for key, arr in arrays.items():
        if arr.ndim == 0 or arr.shape[0] != n:
            raise DataError(
                f"{path}: key {key!r} has shape {arr.shape}, but 'label' has {n} rows "
                "(the first axis must be the samples)"
            )
    sample_id = _pop_sample_id(path, arrays, role, n)
    present = _pop_masks(path, arrays)
    _check_modalities(path, arrays)
    return _NpzSplit(path, arrays, label, present, sample_id)


def _read_npz(path: str) -> dict[str, np.ndarray]:
    """Every array of the NPZ file at ``path`` (local or a URI), without unpickling."""
    fs, fpath = storage.url_to_fs(path)
    if not fs.isfile(fpath):
        raise DataError(f"{path}: file not found")
    arrays: dict[str, np.ndarray] = {}
    with fs.open(fpath, "rb") as f:
        try:
            npz = np.load(f, allow_pickle=False)
        except Exception as e:
            raise DataError(f"{path}: not a readable NPZ file ({type(e).__name__}: {e})") from None
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: holds a single array; expected named arrays (np.savez)")
        with npz:
            for key in npz.files:
                try:
                    arrays[key] = npz[key]
                except ValueError as e:
                    raise DataError(
                        f"{path}: key {key!r} holds an object array, which would need pickle to "
                        f"load; store numeric arrays ({e})"
                    ) from None
    return arrays


def _pop_label(path: str, arrays: dict[str, np.ndarray], task: str) -> np.ndarray:
    """Take ``label`` out of ``arrays``: integers of the task's shape, at least one row,
    nothing negative but (segmentation) the ignore index."""
    if "label" not in arrays:
        raise DataError(f"{path}: no 'label' array (keys: {', '.join(sorted(arrays)) or 'none'})")
    label = arrays.pop("label")
    if label.dtype.kind not in "iu":
        raise DataError(f"{path}: key 'label' has dtype {label.dtype}; labels must be integers")
    want_ndim = 1 if task == "classification" else 3
    if label.ndim != want_ndim:
        raise DataError(
            f"{path}: key 'label' has shape {label.shape}; {task} expects "
            + ("(N,)" if task == "classification" else "(N, H, W)")
        )
    if len(label) == 0:
        raise DataError(f"{path}: key 'label' holds no rows")
    negative = label < 0
    if task == "segmentation":
        negative &= label != IGNORE_INDEX
    if negative.any():
        allowed = "" if task == "classification" else f" (other than {IGNORE_INDEX})"
        raise DataError(
            f"{path}: key 'label' holds negative labels{allowed}, e.g. {int(label[negative][0])}"
        )
    return label


def _pop_sample_id(path: str, arrays: dict[str, np.ndarray], role: str, n: int) -> np.ndarray:
    """Take ``sample_id`` out of ``arrays`` as (n,) str, or make <role>-<row> ids."""
    sample_id = arrays.pop("sample_id", None)
    if sample_id is None:
        return np.array([f"{role}-{i:07d}" for i in range(n)])
    if sample_id.ndim != 1 or sample_id.dtype.kind not in "USiu":
        raise DataError(
            f"{path}: key 'sample_id' must be a 1-D array of strings or integers, got "
            f"{sample_id.dtype} {sample_id.shape}"
        )
    return np.array([s.decode() if isinstance(s, bytes) else str(s) for s in sample_id])


def _pop_masks(path: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Take the has_<m> arrays out of ``arrays``: modality name -> (N,) bool."""
    masks = {k: arrays.pop(k) for k in [k for k in arrays if k.startswith("has_")]}
    present: dict[str, np.ndarray] = {}
    for key, mask in masks.items():
        if key[4:] not in arrays:
            raise DataError(f"{path}: key {key!r} is a mask for {key[4:]!r}, which is not a key")
        if mask.dtype != np.bool_ or mask.ndim != 1:
            raise DataError(f"{path}: key {key!r} must be a 1-D bool array, got {mask.dtype}")
        present[key[4:]] = mask
    return present


def _check_modalities(path: str, arrays: dict[str, np.ndarray]) -> None:
    """What is left are the modalities: at least one, numeric, of a shape that has a kind."""
    if not arrays:
        raise DataError(f"{path}: holds no modality arrays, only label/sample_id/has_*")
    for key, arr in arrays.items():
        if arr.dtype.kind not in "iuf":
            raise DataError(
                f"{path}: key {key!r} has dtype {arr.dtype}; modalities must be integer or float"
            )
        try:
            infer_kind(arr.shape[1:])
        except DataError as e:
            raise DataError(f"{path}: key {key!r}: {e}") from None


def _check_consistent(parts: dict[str, _NpzSplit]) -> None:
    """Same modality keys, per-sample shapes and dtypes (and label maps) in every file."""
    ref = parts["train"]
    for other in parts.values():
        if other is ref:
            continue
        a, b = set(ref.modalities), set(other.modalities)
        if a != b:
            raise DataError(
                f"{ref.path} and {other.path} hold different modality keys: only in "
                f"{ref.path}: {sorted(a - b)}; only in {other.path}: {sorted(b - a)}"
            )
        for key, arr in ref.modalities.items():
            o = other.modalities[key]
            if arr.shape[1:] != o.shape[1:]:
                raise DataError(
                    f"key {key!r}: per-sample shape {arr.shape[1:]} in {ref.path} but "
                    f"{o.shape[1:]} in {other.path}"
                )
            if arr.dtype != o.dtype:
                raise DataError(
                    f"key {key!r}: dtype {arr.dtype} in {ref.path} but {o.dtype} in {other.path}"
                )
        if ref.label.shape[1:] != other.label.shape[1:]:
            raise DataError(
                f"key 'label': per-sample shape {ref.label.shape[1:]} in {ref.path} but "
                f"{other.label.shape[1:]} in {other.path}"
            )


def stratified_val_indices(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded, stratified validation slice of ``labels`` (N,).

    Each class gives round(fraction * its count) samples, at least one when it has two or
    more, and always keeps at least one for training.
    """
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        k = int(round(fraction * len(idx)))
        if len(idx) >= 2:
            k = max(k, 1)
        picked.append(idx[: min(k, len(idx) - 1)])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def _random_val_indices(n: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random slice (for segmentation, where there is no class
    per sample to stratify on)."""
    k = min(max(int(round(fraction * n)), 1), n - 1)
    return np.sort(np.random.default_rng(seed).permutation(n)[:k])


def _take(part: _NpzSplit, idx: np.ndarray) -> _NpzSplit:
    return _NpzSplit(
        part.path,
        {k: v[idx] for k, v in part.modalities.items()},
        part.label[idx],
        {k: v[idx] for k, v in part.present.items()},
        part.sample_id[idx],
    )


def import_npz(
    out: str,
    train: str,
    test: str,
    val: str | None = None,
    *,
    task: str = "classification",
    val_fraction: float = 0.1,
    seed: int = 0,
    target_shard_bytes: int = DEFAULT_SHARD_MB * 2**20,
    overwrite: bool = False,
    progress: bool = True,
) -> Manifest:
    """Import train/test (and optionally val) NPZ files into a dataset at ``out``.

    num_classes is the largest label + 1 over all files (segmentation: ignoring -100).
    Without ``val``, a seeded slice of train (``val_fraction``; stratified by class for
    classification) becomes val. Sample ids default to <file role>-<row>, e.g.
    train-0000042, also for the rows moved to val, so each row can be traced to its file.
    Shards hold about ``target_shard_bytes`` of uncompressed rows each (write_dataset).
    """
    if task not in TASKS:
        raise DataError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    parts = {"train": _load_npz(train, "train", task), "test": _load_npz(test, "test", task)}
    if val is not None:
        parts["val"] = _load_npz(val, "val", task)
    _check_consistent(parts)

    labelled = [p.label[p.label != IGNORE_INDEX] for p in parts.values()]
    num_classes = max((int(x.max()) for x in labelled if x.size), default=-1) + 1
    if num_classes < 1:
        raise DataError(f"{train}: every label is the ignore index {IGNORE_INDEX}")

    if val is None:
        if not 0 < val_fraction < 1:
            raise DataError(f"val_fraction must lie in (0, 1), got {val_fraction}")
        tr = parts["train"]
        n = len(tr.label)
        if n < 2:
            raise DataError(f"{train}: one row cannot be split into train and val; pass a val file")
        if task == "classification":
            val_idx = stratified_val_indices(tr.label, val_fraction, seed)
        else:
            val_idx = _random_val_indices(n, val_fraction, seed)
        if len(val_idx) == 0:
            raise DataError(
                f"{train}: no class has two samples, so no validation slice can be carved "
                "from it; pass a val file"
            )
        parts["val"] = _take(tr, val_idx)
        parts["train"] = _take(tr, np.setdiff1d(np.arange(n), val_idx))
        val_source = f"a {val_fraction:g} slice of {train} (seed {seed})"
    else:
        val_source = val

    parts = {split: parts[split] for split in ("train", "val", "test")}
    splits = {
        split: {**p.modalities, "label": p.label, "sample_id": p.sample_id}
        for split, p in parts.items()
    }
    present = {split: p.present for split, p in parts.items() if p.present}
    return write_dataset(
        out,
        splits,
        task=task,
        num_classes=num_classes,
        ignore_index=IGNORE_INDEX,
        present=present or None,
        description=f"imported from NPZ: train {train}, val {val_source}, test {test}",
        target_shard_bytes=target_shard_bytes,
        overwrite=overwrite,
        progress=progress,
    )
