"""Prediction pictures: files, sizes, optional panels and argument checks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from osmd_ray.viz import write_segmentation_pictures


def arrays(n: int = 3, h: int = 12, w: int = 16):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (n, 3, h, w), dtype=np.uint8)
    depth = rng.random((n, 1, h, w), dtype=np.float32)
    labels = rng.integers(0, 4, (n, h, w))
    labels[:, 0] = -100
    return rgb, depth, labels, rng.integers(0, 4, (n, h, w))


def test_one_readable_png_per_image_up_to_the_limit(tmp_path):
    rgb, depth, labels, pred = arrays()
    paths = write_segmentation_pictures(
        tmp_path / "v", rgb, labels, pred, 4, depth=depth, limit=2, class_names="abcd"
    )
    assert [p.name for p in paths] == ["0000.png", "0001.png"]
    with Image.open(paths[0]) as image:
        width, height = image.size
    assert width > 3 * height  # four panels side by side
    assert len(write_segmentation_pictures(tmp_path / "all", rgb, labels, pred, 4)) == 3


def test_panels_without_labels_or_depth(tmp_path):
    rgb, _, _, pred = arrays(n=1)
    (with_all,) = write_segmentation_pictures(tmp_path / "a", rgb, *arrays(n=1)[2:], 4)
    (bare,) = write_segmentation_pictures(tmp_path / "b", rgb, None, pred, 4)
    with Image.open(with_all) as a, Image.open(bare) as b:
        assert b.size[0] < a.size[0]  # RGB | prediction only


def test_shape_errors_name_the_argument(tmp_path):
    rgb, depth, labels, pred = arrays()
    with pytest.raises(ValueError, match="labels"):
        write_segmentation_pictures(tmp_path, rgb, labels[:2], pred, 4)
    with pytest.raises(ValueError, match="depth"):
        write_segmentation_pictures(tmp_path, rgb, labels, pred, 4, depth=depth[:, :, :5])
    with pytest.raises(ValueError, match="rgb"):
        write_segmentation_pictures(tmp_path, rgb[:, :2], labels, pred, 4)
