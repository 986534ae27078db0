"""The synthetic segmentation scenes: shapes, determinism, and the depth-band labelling rule."""

from __future__ import annotations

import numpy as np
import pytest

from osmd_ray.data.schema import IGNORE_INDEX
from osmd_ray.data.synth_seg import generate_segmentation, label_from_depth


@pytest.fixture(scope="module")
def scenes():
    return generate_segmentation(n_train=40, n_val=10, n_test=20, size=24, seed=3)


def test_shapes_dtypes_and_classes(scenes):
    splits, info = scenes
    assert info["num_classes"] == 4 and len(info["class_names"]) == 4
    for name, n in (("train", 40), ("val", 10), ("test", 20)):
        s = splits[name]
        assert s["rgb"].shape == (n, 3, 24, 24) and s["rgb"].dtype == np.uint8
        assert s["depth"].shape == (n, 1, 24, 24) and s["depth"].dtype == np.float32
        assert s["label"].shape == (n, 24, 24) and s["label"].dtype == np.int64
        assert set(np.unique(s["label"])) <= {IGNORE_INDEX, 0, 1, 2, 3}


def test_every_class_occurs_and_few_pixels_are_unlabelled(scenes):
    label = scenes[0]["train"]["label"]
    counts = np.bincount(label[label >= 0].ravel(), minlength=4)
    assert np.all(counts > 0.03 * counts.sum())
    assert 0 < np.mean(label == IGNORE_INDEX) < 0.15


def test_labels_follow_depth_on_labelled_pixels(scenes):
    s = scenes[0]["test"]
    keep = s["label"] != IGNORE_INDEX
    # Sensor noise (std 0.02) can cross a band edge only within a few of its std.
    agree = label_from_depth(s["depth"])[keep] == s["label"][keep]
    assert agree.mean() > 0.97


def test_same_seed_same_arrays_and_splits_differ():
    a, _ = generate_segmentation(4, 4, 4, 16, seed=1)
    b, _ = generate_segmentation(4, 4, 4, 16, seed=1)
    for name in a:
        for key in a[name]:
            assert np.array_equal(a[name][key], b[name][key])
    assert not np.array_equal(a["train"]["rgb"], a["test"]["rgb"])
    c, _ = generate_segmentation(4, 4, 4, 16, seed=2)
    assert not np.array_equal(a["train"]["rgb"], c["train"]["rgb"])


def test_size_is_validated_and_empty_splits_work():
    with pytest.raises(ValueError, match=">= 16"):
        generate_segmentation(2, 2, 2, 8, seed=0)
    splits, _ = generate_segmentation(0, 1, 1, 16, seed=0)
    assert splits["train"]["label"].shape == (0, 16, 16)
