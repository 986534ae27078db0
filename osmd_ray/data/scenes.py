"""The scene physics shared by the synthetic generators (:mod:`osmd_ray.data.synth`,
:mod:`osmd_ray.data.synth_seg`, and the lab scenes of benchmarks/shapes_seg.py).

Both RGB-D generators paint fully saturated random hues, blend them towards a grey fog by
atmospheric haze with transmission ``t = exp(-beta * (d - 1))`` (so depth reaches RGB only
through colour relative to the fog), put a far background behind everything, and scale the
image by a smooth random illumination field. Changing any constant here changes both
benchmarks; docs/headroom.md records what was measured with them.
"""

from __future__ import annotations

import numpy as np

BACKGROUND_DEPTH = 8.0
"""Depth of the background behind every disc."""

HAZE_BETA = 0.5
"""Haze extinction: transmission t = exp(-HAZE_BETA * (d - 1))."""

GAIN_RANGE = (0.5, 1.0)
"""Illumination gain at each image corner, log-uniform (see :func:`illumination`)."""


def hue_to_rgb(hue: np.ndarray) -> np.ndarray:
    """Fully saturated, full-value colours for hues in [0, 1): max channel 1, min channel 0."""
    k = (np.array([5.0, 3.0, 1.0]) + hue[..., None] * 6.0) % 6.0
    return 1.0 - np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def transmission(depth: float | np.ndarray) -> float | np.ndarray:
    """Haze transmission ``exp(-HAZE_BETA * (depth - 1))`` of a surface at ``depth`` (a
    number or an array): the share of its own colour that reaches the camera, the rest
    being fog."""
    return np.exp(-HAZE_BETA * (depth - 1.0))


def illumination(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Smooth random illumination (N, 1, S, S): bilinear between four random corner gains.

    It scales a disc's chroma and the background around it alike, so the most saturated disc
    is not always the nearest; the ratio to the local background still ranks them exactly.
    """
    gains = np.exp(rng.uniform(*np.log(GAIN_RANGE), size=(n, 2, 2)))
    w = (np.arange(size) + 0.5) / size
    wy = np.stack([1 - w, w])  # (2, S)
    return np.einsum("nab,ay,bx->nyx", gains, wy, wy)[:, None]
