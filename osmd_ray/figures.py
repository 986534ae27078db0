"""Writing matplotlib figures as PNG files, locally or to object storage.

Figures are built with matplotlib's object API (``matplotlib.figure.Figure``), never pyplot,
so no global figure registry or interactive backend is involved: a worker, a driver thread
or a test can draw at the same time.
"""

from __future__ import annotations

import io
from typing import Any

from osmd_ray import storage


def save_png(fig: Any, path: str, dpi: int = 100) -> None:
    """Render ``fig`` (a matplotlib Figure) to PNG and write it whole to ``path`` (a local
    path or a URI; :func:`osmd_ray.storage.write_bytes`)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    storage.write_bytes(path, buffer.getvalue())
