"""Batch prediction with a deployment model over one split of a dataset."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any

import numpy as np

from osmd_ray import storage
from osmd_ray.blocks.metrics import confusion_matrix, segmentation_scores
from osmd_ray.data.reading import read_split_numpy
from osmd_ray.data.schema import read_manifest
from osmd_ray.deploy import load_deploy
from osmd_ray.errors import DataError
from osmd_ray.viz import write_segmentation_pictures


def predict_split(
    model_dir: str,
    data_root: str,
    split: str,
    out: str,
    batch_size: int = 256,
    viz_dir: str | None = None,
    viz_count: int = 8,
) -> str:
    """Predict every row of ``split`` from the ordinary modalities; returns a one-line summary.

    Writes sample_id, prediction, probabilities and (when present) label to ``out`` as
    Parquet, through a temporary file beside it, so a failure leaves the previous ``out`` (if
    any) and no half-written file. ``model_dir``, ``data_root`` and ``out`` may be ``s3://``
    URIs. Segmentation: ``prediction`` (and ``label``) are (H, W) int16 label maps per row, no
    probabilities (K x H x W floats a row), and the summary gives pixel accuracy and mIoU;
    ``viz_dir`` (a local folder) receives pictures RGB | depth | ground truth | prediction of
    the first ``viz_count`` rows.
    """
    import pyarrow as pa

    model = load_deploy(model_dir)
    manifest = read_manifest(data_root)
    if split not in manifest.splits:
        raise DataError(
            f"{data_root}: no split {split!r} in manifest.json (splits: {sorted(manifest.splits)})"
        )
    inputs = [spec.name for spec in model.input_modalities]
    missing = [m for m in inputs if m not in manifest.modalities]
    if missing:
        raise DataError(
            f"{data_root}: the model needs modalities {missing} that the dataset lacks "
            f"(it has {sorted(manifest.modalities)})"
        )
    if model.task != manifest.task:
        raise DataError(
            f"{data_root} is a {manifest.task} dataset, the model at {model_dir} predicts "
            f"{model.task}"
        )
    if viz_dir is not None and manifest.task != "segmentation":
        raise DataError("--viz draws label maps: it needs a segmentation model and dataset")
    if manifest.task == "segmentation":
        arrays = read_split_numpy(
            data_root, split, [*_viz_modalities(manifest, inputs), "sample_id", "label"], manifest
        )
        columns, summary = _segmentation_columns(model, manifest, arrays, inputs, batch_size)
        if viz_dir is not None:
            rgb, depth = _viz_images(manifest, inputs, arrays)
            written = write_segmentation_pictures(
                viz_dir,
                rgb,
                arrays.get("label"),
                columns["prediction"].to_numpy_ndarray(),
                model.num_classes,
                ignore_index=manifest.ignore_index,
                depth=depth,
                limit=viz_count,
                class_names=model.class_names,
            )
            summary += f"  pictures: {len(written)} in {viz_dir}"
        return _write_table(
            columns, out, f"{len(arrays['sample_id'])} rows of {split} -> {out}" + summary
        )
    arrays = read_split_numpy(data_root, split, [*inputs, "sample_id", "label"], manifest=manifest)
    proba = model.predict_proba({m: arrays[m] for m in inputs}, batch_size=batch_size)
    prediction = proba.argmax(axis=1).astype(np.int64)
    columns = {
        "sample_id": pa.array(arrays["sample_id"].astype(str)),
        "prediction": pa.array(prediction),
        "proba": pa.FixedShapeTensorArray.from_numpy_ndarray(proba.astype(np.float32)),
    }
    summary = f"{len(prediction)} rows of {split} -> {out}"
    if "label" in arrays and manifest.task == "classification":
        labels = arrays["label"].astype(np.int64)
        columns["label"] = pa.array(labels)
        summary += f"  accuracy={float((prediction == labels).mean()):.4f}"
    return _write_table(columns, out, summary)


def _viz_modalities(manifest: Any, inputs: list[str]) -> list[str]:
    """The model's inputs plus, for the pictures, a one-channel image (depth) if any."""
    extra = [
        name
        for name, spec in manifest.modalities.items()
        if spec.kind == "image" and spec.shape[0] == 1 and name not in inputs
    ]
    return [*inputs, *extra[:1]]


def _viz_images(
    manifest: Any, inputs: list[str], arrays: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray | None]:
    """(the first 3-channel input image, a one-channel image of the dataset or None)."""
    images = [n for n in inputs if manifest.modalities[n].kind == "image"]
    colour = [n for n in images if manifest.modalities[n].shape[0] == 3]
    if not colour:
        raise DataError(f"--viz needs a 3-channel image input; the model reads {inputs}")
    ones = [
        n
        for n in arrays
        if n in manifest.modalities
        and manifest.modalities[n].kind == "image"
        and manifest.modalities[n].shape[0] == 1
    ]
    return arrays[colour[0]], (arrays[ones[0]] if ones else None)


def _segmentation_columns(
    model: Any,
    manifest: Any,
    arrays: dict[str, np.ndarray],
    inputs: list[str],
    batch_size: int,
) -> tuple[dict[str, Any], str]:
    """Columns (label maps as fixed-shape int16 tensors) and the pixel accuracy / mIoU text."""
    import pyarrow as pa
    import torch

    prediction = model.predict({m: arrays[m] for m in inputs}, batch_size=batch_size)
    columns: dict[str, Any] = {
        "sample_id": pa.array(arrays["sample_id"].astype(str)),
        "prediction": pa.FixedShapeTensorArray.from_numpy_ndarray(prediction.astype(np.int16)),
    }
    summary = ""
    if "label" in arrays and len(prediction):
        labels = arrays["label"].astype(np.int64)
        columns["label"] = pa.FixedShapeTensorArray.from_numpy_ndarray(labels.astype(np.int16))
        counts = confusion_matrix(
            torch.from_numpy(prediction),
            torch.from_numpy(labels),
            manifest.num_classes,
            manifest.ignore_index,
        )
        if int(counts.sum()):
            scores = segmentation_scores(counts)
            summary = f"  pixel_accuracy={scores['accuracy']:.4f}  miou={scores['miou']:.4f}"
    return columns, summary


def _write_table(columns: dict[str, Any], out: str, summary: str) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Streamed into a temporary file (or object) moved into place: a full disk or a crash
    # leaves the previous file and no half-written one.
    with storage.atomic_writer(out) as f:
        pq.write_table(pa.table(columns), f)
    return summary
    folder, name = os.path.split(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(pa.table(columns), tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; predictions are meant to be read
        os.replace(tmp, out)
    except BaseException:
        # A full disk or a crash leaves the previous file and no half-written temporary.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return summary
