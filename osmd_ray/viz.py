"""Pictures of segmentation predictions: RGB | depth | ground truth | prediction per image.

Drawn with matplotlib's object API on an Agg canvas (no pyplot), so importing this module
never changes the backend of a user's session.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from osmd_ray.figures import save_png


def _check(name: str, array: np.ndarray | None, ndim: int, rows: int, hw: tuple[int, int]):
    if array is None:
        return
    if array.ndim != ndim or array.shape[0] != rows or tuple(array.shape[-2:]) != hw:
        raise ValueError(
            f"{name} has shape {array.shape}; expected {ndim} dimensions, {rows} rows and "
            f"images of {hw[0]}x{hw[1]}"
        )


def _rgb_image(rgb: np.ndarray) -> np.ndarray:
    image = np.moveaxis(rgb, 0, -1).astype(np.float32)
    if rgb.dtype == np.uint8:
        image /= 255.0
    return np.clip(image, 0.0, 1.0)


def _depth_image(depth: np.ndarray) -> np.ndarray:
    """Min-max normalised per image, for display only."""
    d = depth[0].astype(np.float32)
    low, high = float(np.nanmin(d)), float(np.nanmax(d))
    return (d - low) / (high - low) if high > low else np.zeros_like(d)


def _label_image(labels: np.ndarray, colours: np.ndarray, ignore_index: int) -> np.ndarray:
    """Class colours; ignored (and out-of-range) pixels black."""
    out = np.zeros((*labels.shape, 3), dtype=np.float32)
    valid = (labels != ignore_index) & (labels >= 0) & (labels < len(colours))
    out[valid] = colours[labels[valid]]
    return out


def write_segmentation_pictures(
    out_dir: str | Path,
    rgb: np.ndarray,
    labels: np.ndarray | None,
    predictions: np.ndarray,
    num_classes: int,
    ignore_index: int = -100,
    depth: np.ndarray | None = None,
    limit: int = 8,
    class_names: Sequence[str] | None = None,
) -> list[Path]:
    """One PNG per image for the first ``limit`` images (``0000.png``, ...) in ``out_dir``.

    ``rgb`` (N, 3, H, W) uint8 or floats in [0, 1]; ``depth`` (N, 1, H, W) or None;
    ``labels`` (N, H, W) with ``ignore_index`` pixels (drawn black) or None; ``predictions``
    (N, H, W). Panels whose array is None are left out. Returns the written paths.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if predictions.ndim != 3:
        raise ValueError(f"predictions has shape {predictions.shape}; expected (N, H, W)")
    rows, hw = predictions.shape[0], tuple(predictions.shape[1:])
    _check("rgb", rgb, 4, rows, hw)
    _check("depth", depth, 4, rows, hw)
    _check("labels", labels, 3, rows, hw)
    if rgb.shape[1] != 3:
        raise ValueError(f"rgb has {rgb.shape[1]} channels; expected 3")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    cmap = colormaps["tab20"] if num_classes > 10 else colormaps["tab10"]
    colours = np.array([cmap(i % cmap.N)[:3] for i in range(num_classes)], dtype=np.float32)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(min(limit, rows)):
        panels = [("RGB", _rgb_image(rgb[i]), None)]
        if depth is not None:
            panels.append(("depth", _depth_image(depth[i]), "viridis"))
        if labels is not None:
            panels.append(("ground truth", _label_image(labels[i], colours, ignore_index), None))
        panels.append(("prediction", _label_image(predictions[i], colours, ignore_index), None))
        fig = Figure(figsize=(2.6 * len(panels), 2.6 * hw[0] / hw[1] + 0.9))
        for j, (title, image, map_name) in enumerate(panels):
            ax = fig.add_subplot(1, len(panels), j + 1)
            ax.imshow(image, cmap=map_name, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        if class_names:
            handles = [
                Patch(color=colours[c], label=str(name))
                for c, name in enumerate(class_names[:num_classes])
            ]
            fig.legend(handles=handles, loc="lower center", ncol=min(7, len(handles)), fontsize=6)
        path = out / f"{i:04d}.png"
        save_png(fig, str(path), dpi=80)
        written.append(path)
    return written
