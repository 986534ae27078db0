"""Segmentation metrics from a confusion matrix: pixel accuracy and mean IoU.

The confusion matrix is what workers accumulate and sum across ranks (a K x K count is
exact to add, unlike per-batch means), and what the scores are computed from once, at the
end of a split. Pixels whose label is the ignore index count nowhere.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.classification import multiclass_confusion_matrix


def confusion_matrix(
    predictions: Tensor, labels: Tensor, num_classes: int, ignore_index: int = -100
) -> Tensor:
    """(K, K) int64 counts, rows the true class and columns the predicted one, over every
    pixel (or row) whose label is not ``ignore_index``; any shapes that match."""
    if predictions.shape != labels.shape:
        raise ValueError(
            f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} differ"
        )
    return multiclass_confusion_matrix(
        predictions.reshape(-1).long(),
        labels.reshape(-1).long(),
        num_classes,
        ignore_index=ignore_index,
        validate_args=False,
    ).long()


def per_class_iou(confusion: Tensor) -> Tensor:
    """IoU per class, tp / (tp + fp + fn); NaN for a class that is neither in the labels
    nor in the predictions (it has no union, so no IoU)."""
    confusion = confusion.double()
    tp = confusion.diagonal()
    union = confusion.sum(dim=0) + confusion.sum(dim=1) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))


def segmentation_scores(confusion: Tensor) -> dict[str, float]:
    """``accuracy`` (labelled pixels predicted right), ``miou`` (the mean IoU over the classes
    that occur in the labels or the predictions) and ``pixels`` (labelled pixels counted)."""
    confusion = confusion.double()
    total = float(confusion.sum())
    if total == 0:
        raise ValueError("no labelled pixel: every label is the ignore index")
    iou = per_class_iou(confusion)
    return {
        "accuracy": float(confusion.diagonal().sum()) / total,
        "miou": float(iou[~iou.isnan()].mean()),
        "pixels": total,
    }
