"""Segmentation metrics against a direct per-class count."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from osmd_ray.blocks.metrics import confusion_matrix, per_class_iou, segmentation_scores


def direct_scores(pred: np.ndarray, label: np.ndarray, k: int, ignore: int) -> tuple[float, float]:
    """Pixel accuracy and mIoU counted class by class, pixel by pixel."""
    keep = label != ignore
    ious = []
    for c in range(k):
        tp = int(np.sum((pred == c) & (label == c) & keep))
        fp = int(np.sum((pred == c) & (label != c) & keep))
        fn = int(np.sum((pred != c) & (label == c) & keep))
        if tp + fp + fn:
            ious.append(tp / (tp + fp + fn))
    accuracy = float(np.sum((pred == label) & keep) / np.sum(keep))
    return accuracy, float(np.mean(ious))


@pytest.mark.parametrize("seed", range(5))
def test_scores_match_a_direct_count(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 8))
    label = rng.integers(0, k, size=(3, 9, 11))
    label[rng.random(label.shape) < 0.2] = -100
    pred = np.where(rng.random(label.shape) < 0.6, label, rng.integers(0, k, size=label.shape))
    pred = np.clip(pred, 0, k - 1)
    scores = segmentation_scores(
        confusion_matrix(torch.from_numpy(pred), torch.from_numpy(label), k, -100)
    )
    accuracy, miou = direct_scores(pred, label, k, -100)
    assert scores["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert scores["miou"] == pytest.approx(miou, abs=1e-12)
    assert scores["pixels"] == int(np.sum(label != -100))


def test_confusion_matrix_rows_are_true_classes_and_ignored_pixels_count_nowhere():
    label = torch.tensor([[0, 0, 1, 255]])
    pred = torch.tensor([[0, 1, 1, 0]])
    counts = confusion_matrix(pred, label, 3, ignore_index=255)
    assert counts.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 0]]


def test_a_class_absent_from_labels_and_predictions_is_left_out_of_the_mean():
    counts = torch.tensor([[2, 0, 0], [1, 3, 0], [0, 0, 0]])
    iou = per_class_iou(counts)
    assert iou[0] == pytest.approx(2 / 3) and iou[1] == pytest.approx(3 / 4)
    assert math.isnan(float(iou[2]))
    assert segmentation_scores(counts)["miou"] == pytest.approx((2 / 3 + 3 / 4) / 2)


def test_no_labelled_pixel_is_an_error_and_shapes_must_match():
    with pytest.raises(ValueError, match="no labelled pixel"):
        segmentation_scores(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="differ"):
        confusion_matrix(torch.zeros(2, 3), torch.zeros(3, 2), 2)
