"""Batch prediction with a deployment model over one split of a dataset."""

from __future__ import annotations

import contextlib
import os
import tempfile

import numpy as np

from osmd_ray import storage
from osmd_ray.data.contract import DataError, read_manifest


def predict_split(
    model_dir: str, data_root: str, split: str, out: str, batch_size: int = 256
) -> str:
    """Predict every row of ``split`` from the ordinary modalities; returns a one-line summary.

    Writes sample_id, prediction, probabilities and (when present) label to ``out`` as
    Parquet, through a temporary file beside it, so a failure leaves the previous ``out`` (if
    any) and no half-written file. ``model_dir``, ``data_root`` and ``out`` may be ``s3://``
    URIs.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from osmd_ray import load_deploy
    from osmd_ray.data.reading import read_split_numpy

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
    if storage.is_remote(out):
        # One PUT: the object appears whole or not at all.
        buffer = pa.BufferOutputStream()
        pq.write_table(pa.table(columns), buffer)
        storage.write_bytes(out, buffer.getvalue().to_pybytes())
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
