"""Import NYU Depth V2 as a segmentation dataset of the §4 contract (``osmd data import-nyuv2``).

Two source layouts, told apart by what ``src`` holds:

``png``: folders ``rgb/``, ``depth/`` and ``label13/`` (or ``label40/``) of PNG files named by
    the 1-based NYU index (``0001.png``), as in ``shared/data/nyuv2-mini``: rgb 8-bit RGB,
    depth 16-bit millimetres, labels 8-bit grey (mode L) with 0 = unlabelled. The folders
    must hold the same file names. This layout carries no official split, so frames are split
    by their position ``i`` in the index-sorted list: ``i % 4`` in {0, 1} train, 2 val, 3 test
    (8 frames give 4/2/2). Splits left empty (fewer than 4 frames) are left out.
``mat``: the official ``nyu_depth_v2_labeled.mat`` (MATLAB v7.3, i.e. HDF5, read with h5py)
    beside the official ``splits.mat`` (MATLAB v5: ``trainNdxs``, ``testNdxs``, 1-based). In
    HDF5 the MATLAB arrays appear transposed: ``images`` (N, 3, W, H) uint8, ``depths``
    (N, W, H) metres, ``labels`` (N, W, H) with 894 raw classes (0 = unlabelled). The raw
    classes are mapped to 13 or 40 by a mapping file (.npy or .json: 895 integers, index = raw
    class, value = target class 0..K with 0 = unlabelled), which NYU does not ship in this
    file. The test split is ``testNdxs``; val is the last 10% (``len // 10``, at least 1) of
    ``trainNdxs`` in their order, train the rest.

What is written, for K = 13 or 40 classes:

- ``rgb``: image (3, H, W) uint8, resized bilinearly.
- ``depth``: image (1, H, W) float32, millimetres / 10000 clipped to [0, 1] (0 to 10 m);
  zero depth (no reading) stays 0. Resized nearest-neighbour, so no value is blended with a
  missing one.
- ``label``: (H, W), classes 1..K become 0..K-1, unlabelled pixels (0) become IGNORE_INDEX
  (-100, the contract's default and the value the training loss ignores). Resized
  nearest-neighbour.
- ``sample_id``: ``nyu-NNNN``, the 1-based NYU index.

All frames are read and checked before anything is written; write_dataset then writes
atomically, so bad input leaves nothing behind.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from osmd_ray.data.schema import IGNORE_INDEX, Manifest
from osmd_ray.data.writer import DEFAULT_SHARD_MB, check_target, write_dataset
from osmd_ray.errors import DataError

DEFAULT_SIZE = (240, 320)
"""Default (H, W) of the written images: half the sensor's 480 x 640."""
DEPTH_SCALE_MM = 10000.0
"""Depth in millimetres is divided by this (and clipped to [0, 1])."""
NUM_RAW_CLASSES = 894
"""Raw label classes of the official .mat file (0 = unlabelled comes on top)."""
MAT_NAME = "nyu_depth_v2_labeled.mat"
SPLITS_NAME = "splits.mat"

CLASS_NAMES_13 = [
    "bed",
    "books",
    "ceiling",
    "chair",
    "floor",
    "furniture",
    "objects",
    "picture",
    "sofa",
    "table",
    "tv",
    "wall",
    "window",
]
"""The 13 classes of Couprie et al. (2013), label13 values 1..13 in this order."""
CLASS_NAMES_40 = [
    "wall",
    "floor",
    "cabinet",
    "bed",
    "chair",
    "sofa",
    "table",
    "door",
    "window",
    "bookshelf",
    "picture",
    "counter",
    "blinds",
    "desk",
    "shelves",
    "curtain",
    "dresser",
    "pillow",
    "mirror",
    "floor mat",
    "clothes",
    "ceiling",
    "books",
    "refrigerator",
    "television",
    "paper",
    "towel",
    "shower curtain",
    "box",
    "whiteboard",
    "person",
    "night stand",
    "toilet",
    "sink",
    "lamp",
    "bathtub",
    "bag",
    "otherstructure",
    "otherfurniture",
    "otherprop",
]
"""The 40 classes of Gupta et al. (2013), label40 values 1..40 in this order."""
CLASS_NAMES = {13: CLASS_NAMES_13, 40: CLASS_NAMES_40}

_RGB_MODES = ("RGB",)
_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I")
_LABEL_MODES = ("L",)


def parse_size(text: str) -> tuple[int, int]:
    """``HxW`` (e.g. 240x320) as (H, W); ValueError otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ValueError(f"expected HxW with positive integers, e.g. 240x320, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def detect_layout(src: str | Path) -> str:
    """``png`` or ``mat``: which NYU layout ``src`` holds; DataError when neither."""
    root = Path(src)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (expected the NYU Depth V2 source folder)")
    if (root / "rgb").is_dir():
        return "png"
    if (root / MAT_NAME).is_file():
        return "mat"
    raise DataError(
        f"{root}: holds neither rgb/, depth/, label13/|label40/ PNG folders nor {MAT_NAME} "
        f"(+ {SPLITS_NAME})"
    )


# --------------------------------------------------------------------------- one frame


def _resize(a: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    """Resize an (H, W, 3) uint8, (H, W) uint8 or (H, W) float32 array to ``size`` (H, W)
    with Pillow (which reads them as modes RGB, L and F)."""
    from PIL import Image  # lazy: every `osmd data` command imports this module

    h, w = size
    if a.shape[:2] == (h, w):
        return a
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(a).resize((w, h), resample))


def _frame(
    rgb: np.ndarray, depth_mm: np.ndarray, label: np.ndarray, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 rgb, (H, W) depth in mm, (H, W) labels 0..K -> the stored arrays:
    rgb (3, h, w) uint8, depth (1, h, w) float32 in [0, 1], label (h, w) int16."""
    rgb = _resize(np.ascontiguousarray(rgb, dtype=np.uint8), size, nearest=False)
    depth = _resize(np.ascontiguousarray(depth_mm, dtype=np.float32), size, nearest=True)
    label = _resize(np.ascontiguousarray(label, dtype=np.uint8), size, nearest=True)
    depth = np.clip(np.nan_to_num(depth, nan=0.0) / DEPTH_SCALE_MM, 0.0, 1.0).astype(np.float32)
    out = label.astype(np.int16) - 1
    out[label == 0] = IGNORE_INDEX
    return rgb.transpose(2, 0, 1), depth[None], out


# --------------------------------------------------------------------------- PNG layout


def _index_key(stem: str) -> tuple[int, int | str]:
    return (0, int(stem)) if stem.isdigit() else (1, stem)


def _png_names(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found (the PNG layout needs it)")
    names = {p.stem: p for p in folder.iterdir() if p.suffix.lower() == ".png" and p.is_file()}
    if not names:
        raise DataError(f"{folder}: holds no .png files")
    return names


def _load_png(path: Path, modes: Sequence[str], what: str) -> np.ndarray:
    from PIL import Image  # lazy: every `osmd data` command imports this module

    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode not in modes:
                raise DataError(f"{path}: PNG mode {mode}, expected {' or '.join(modes)} ({what})")
            return np.asarray(im)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: not a readable PNG ({type(e).__name__}: {e})") from None


def png_split(position: int) -> str:
    """Split of the frame at ``position`` in the sorted index list (PNG layout)."""
    return ("train", "train", "val", "test")[position % 4]


def _read_png_layout(
    src: Path, classes: int, size: tuple[int, int], progress: bool
) -> tuple[dict[str, list[tuple[str, tuple]]], str]:
    label_dir = f"label{classes}"
    folders = {"rgb": src / "rgb", "depth": src / "depth", "label": src / label_dir}
    names = {key: _png_names(folder) for key, folder in folders.items()}
    reference = set(names["rgb"])
    for key in ("depth", "label"):
        other = set(names[key])
        if other != reference:
            lacking = sorted(reference - other, key=_index_key)
            extra = sorted(other - reference, key=_index_key)
            parts = []
            if lacking:
                parts.append(f"lacks {', '.join(n + '.png' for n in lacking[:5])} of rgb/")
            if extra:
                parts.append(f"has {', '.join(n + '.png' for n in extra[:5])}, missing in rgb/")
            raise DataError(
                f"{folders[key]}: file names differ from {folders['rgb']}: " + "; ".join(parts)
            )
    stems = sorted(reference, key=_index_key)

    frames: dict[str, list[tuple[str, tuple]]] = {"train": [], "val": [], "test": []}
    for i, stem in enumerate(_bar(stems, "reading NYU PNG frames", progress)):
        rgb = _load_png(names["rgb"][stem], _RGB_MODES, "8-bit colour")
        depth = _load_png(names["depth"][stem], _DEPTH_MODES, "16-bit depth in millimetres")
        label = _load_png(names["label"][stem], _LABEL_MODES, f"8-bit labels 0..{classes}")
        for key, arr in (("depth", depth), ("label", label)):
            if arr.shape[:2] != rgb.shape[:2]:
                raise DataError(
                    f"{names[key][stem]}: {arr.shape[1]}x{arr.shape[0]} pixels, but "
                    f"{names['rgb'][stem]} has {rgb.shape[1]}x{rgb.shape[0]}"
                )
        if int(label.max()) > classes:
            raise DataError(
                f"{names['label'][stem]}: label value {int(label.max())} outside 0..{classes}"
            )
        sid = f"nyu-{int(stem):04d}" if stem.isdigit() else f"nyu-{stem}"
        frames[png_split(i)].append((sid, _frame(rgb, depth, label, size)))
    description = (
        f"NYU Depth V2 from PNG folders {src} (rgb, depth, {label_dir}); split by position "
        "in the sorted index list: i%4 in {0,1} train, 2 val, 3 test"
    )
    return frames, description


# --------------------------------------------------------------------------- official .mat


def load_mapping(path: str | Path, classes: int) -> np.ndarray:
    """The raw-class -> K-class table (895 ints in 0..K) from .npy or .json; DataError else."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: mapping file not found")
    try:
        if path.suffix.lower() == ".json":
            table = np.asarray(json.loads(path.read_text()))
        else:
            table = np.load(path, allow_pickle=False)
    except Exception as e:
        raise DataError(
            f"{path}: not a readable .npy/.json mapping ({type(e).__name__}: {e})"
        ) from None
    n = NUM_RAW_CLASSES + 1
    if table.shape != (n,) or table.dtype.kind not in "iu":
        raise DataError(
            f"{path}: mapping must be {n} integers (index = raw class 0..{NUM_RAW_CLASSES}), "
            f"found {table.dtype} array of shape {table.shape}"
        )
    if table.min() < 0 or table.max() > classes:
        raise DataError(
            f"{path}: mapping values must lie in 0..{classes} (0 = unlabelled) for --classes "
            f"{classes}, found {int(table.min())}..{int(table.max())}"
        )
    if table[0] != 0:
        raise DataError(f"{path}: raw class 0 (unlabelled) must map to 0, found {int(table[0])}")
    return table.astype(np.uint8)


def _load_splits(path: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    """0-based train and test indices of the official splits.mat."""
    if not path.is_file():
        raise DataError(f"{path}: not found (the official splits.mat belongs beside {MAT_NAME})")
    try:
        from scipy.io import loadmat  # lazy: heavy, and only the .mat layout needs it
    except ImportError:
        raise DataError("reading splits.mat needs scipy (pip install scipy)") from None
    try:
        mat = loadmat(str(path))
    except Exception as e:
        raise DataError(f"{path}: not a readable MATLAB file ({type(e).__name__}: {e})") from None
    out = []
    for key in ("trainNdxs", "testNdxs"):
        if key not in mat:
            found = ", ".join(k for k in mat if not k.startswith("__")) or "none"
            raise DataError(f"{path}: no {key!r} array (found: {found})")
        idx = np.asarray(mat[key]).reshape(-1)
        if idx.size == 0 or idx.dtype.kind not in "iuf" or not np.all(idx == np.round(idx)):
            raise DataError(f"{path}: {key} must be a non-empty list of integer indices")
        idx = idx.astype(np.int64)
        if idx.min() < 1 or idx.max() > n:
            raise DataError(
                f"{path}: {key} holds indices {idx.min()}..{idx.max()}, outside 1..{n} "
                f"(the 1-based frames of {MAT_NAME})"
            )
        if len(np.unique(idx)) != len(idx):
            raise DataError(f"{path}: {key} repeats an index")
        out.append(idx - 1)
    train, test = out
    if np.intersect1d(train, test).size:
        raise DataError(f"{path}: trainNdxs and testNdxs share indices")
    if len(train) < 2:
        raise DataError(f"{path}: trainNdxs needs at least 2 frames to carve a val split")
    return train, test


def val_count(n_train: int) -> int:
    """Official-layout val size: the last 10% (at least 1) of trainNdxs."""
    return max(1, n_train // 10)


def _read_mat_layout(
    src: Path, classes: int, size: tuple[int, int], mapping: str | Path | None, progress: bool
) -> tuple[dict[str, list[tuple[str, tuple]]], str]:
    import h5py  # lazy: only the official .mat layout needs it

    mat_path = src / MAT_NAME
    if mapping is None:
        raise DataError(
            f"{mat_path} holds {NUM_RAW_CLASSES} raw classes; mapping them to {classes} needs "
            f"--mapping FILE: a .npy or .json array of {NUM_RAW_CLASSES + 1} integers (index = "
            f"raw class, value = class 0..{classes}, 0 = unlabelled), e.g. the class{classes} "
            "mapping of the NYUv2 meta-data that papers use"
        )
    table = load_mapping(mapping, classes)
    try:
        f = h5py.File(mat_path, "r")
    except Exception as e:
        raise DataError(
            f"{mat_path}: not a MATLAB v7.3 (HDF5) file ({type(e).__name__}: {e})"
        ) from None
    with f:
        arrays = {}
        for key, ndim in (("images", 4), ("depths", 3), ("labels", 3)):
            ds = f.get(key)
            if not isinstance(ds, h5py.Dataset) or ds.ndim != ndim:
                raise DataError(
                    f"{mat_path}: expected a {ndim}-d dataset {key!r}, found "
                    + ("none" if ds is None else f"{type(ds).__name__} {getattr(ds, 'shape', '')}")
                )
            arrays[key] = ds
        images, depths, labels = arrays["images"], arrays["depths"], arrays["labels"]
        n, c, w, h = images.shape
        if c != 3 or depths.shape != (n, w, h) or labels.shape != (n, w, h):
            raise DataError(
                f"{mat_path}: shapes do not fit (N, 3, W, H) images, (N, W, H) depths and "
                f"labels: images {images.shape}, depths {depths.shape}, labels {labels.shape}"
            )
        train, test = _load_splits(src / SPLITS_NAME, n)
        n_val = val_count(len(train))
        order = {"train": train[:-n_val], "val": train[-n_val:], "test": test}
        todo = [(split, int(i)) for split, idx in order.items() for i in idx]

        frames: dict[str, list[tuple[str, tuple]]] = {"train": [], "val": [], "test": []}
        for split, i in _bar(todo, f"reading {MAT_NAME}", progress):
            raw = np.asarray(labels[i]).T
            if raw.min() < 0 or raw.max() > NUM_RAW_CLASSES:
                raise DataError(
                    f"{mat_path}: labels of frame {i + 1} hold {int(raw.max())}, outside "
                    f"0..{NUM_RAW_CLASSES}"
                )
            rgb = np.asarray(images[i]).transpose(2, 1, 0)  # (3, W, H) -> (H, W, 3)
            depth_mm = np.asarray(depths[i], dtype=np.float32).T * 1000.0
            label = table[raw.astype(np.int64)]
            frames[split].append((f"nyu-{i + 1:04d}", _frame(rgb, depth_mm, label, size)))
    description = (
        f"NYU Depth V2 from {mat_path} with {SPLITS_NAME}, raw classes mapped by {mapping}; "
        f"test = testNdxs, val = the last {n_val} of trainNdxs"
    )
    return frames, description


# --------------------------------------------------------------------------- entry point


def _bar(items: Sequence[Any], desc: str, enabled: bool) -> Iterable[Any]:
    if not enabled:
        return items
    from tqdm.auto import tqdm  # lazy: only when a progress bar is shown

    return tqdm(items, desc=desc, unit="frame")


def import_nyuv2(
    src: str | Path,
    out: str,
    *,
    classes: int = 13,
    size: tuple[int, int] = DEFAULT_SIZE,
    mapping: str | Path | None = None,
    target_shard_bytes: int = DEFAULT_SHARD_MB * 2**20,
    overwrite: bool = False,
    progress: bool = True,
) -> Manifest:
    """Import NYU Depth V2 from ``src`` (either layout, see the module docstring) into a
    segmentation dataset at ``out`` with ``classes`` (13 or 40) classes and images of
    ``size`` (H, W). ``mapping`` is required for the official .mat layout."""
    if classes not in CLASS_NAMES:
        raise DataError(f"classes must be 13 or 40, got {classes}")
    h, w = size
    if h < 1 or w < 1:
        raise DataError(f"size must be positive, got {h}x{w}")
    src = Path(src)
    layout = detect_layout(src)
    check_target(out, overwrite)  # an occupied --out fails before the reading
    if layout == "png":
        frames, description = _read_png_layout(src, classes, size, progress)
    else:
        frames, description = _read_mat_layout(src, classes, size, mapping, progress)

    splits = {}
    for split, items in frames.items():
        if not items:
            continue
        ids, arrays = zip(*items, strict=True)
        rgb, depth, label = (np.stack(a) for a in zip(*arrays, strict=True))
        splits[split] = {
            "rgb": rgb,
            "depth": depth,
            "label": label,
            "sample_id": np.asarray(ids),
        }
    if "train" not in splits:
        raise DataError(f"{src}: no frame falls in the train split")
    return write_dataset(
        out,
        splits,
        task="segmentation",
        num_classes=classes,
        ignore_index=IGNORE_INDEX,
        kinds={"rgb": "image", "depth": "image"},
        class_names=list(CLASS_NAMES[classes]),
        description=description + f"; {h}x{w}; depth = mm/{DEPTH_SCALE_MM:g} clipped to [0, 1]",
        target_shard_bytes=target_shard_bytes,
        overwrite=overwrite,
        progress=progress,
    )
