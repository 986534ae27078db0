"""When a run stops and which epoch it deploys (``train.early_stopping``, ``train.deploy_epoch``).

Both engines decide from the run's history alone (one record per epoch, with its ``val``
scores), so a resumed run decides exactly as an uninterrupted one, and every Ray Train rank
decides the same (their validation scores are summed over ranks). A staged method trains
its deployment network in its last stage only: the earlier stages' epochs neither count as
a best nor use up the patience.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from osmd_ray.blocks.stages import Stage
from osmd_ray.config import Config


def task_metric(task: str) -> str:
    """The metric a run is judged by: mIoU for segmentation, accuracy otherwise."""
    return "miou" if task == "segmentation" else "accuracy"


def val_score(record: dict[str, Any], metric: str) -> float:
    """An epoch's validation metric of the deployment path (NaN where it has none)."""
    return float(record.get("val", {}).get("deploy", {}).get(metric, math.nan))


@dataclass(frozen=True)
class Progress:
    """Where a run stands against its best epoch so far."""

    best_epoch: int
    """The best epoch (1-based): the first whose score beat every earlier best by more
    than min_delta; 0 before any counted epoch."""
    best_score: float
    since_best: int
    """Epochs trained after the best one."""


@dataclass(frozen=True)
class StoppingRule:
    """A run's ``train.early_stopping`` and ``train.deploy_epoch``, with its metric and the
    first epoch that counts (0-based: the start of the method's last stage)."""

    epochs: int
    patience: int
    min_delta: float
    deploy_last: bool
    metric: str
    first_counted: int = 0

    @classmethod
    def of(cls, cfg: Config, stages: Sequence[Stage], task: str) -> StoppingRule:
        stopping = cfg.train.early_stopping
        return cls(
            epochs=cfg.train.epochs,
            patience=stopping.patience,
            min_delta=stopping.min_delta,
            deploy_last=cfg.train.deploy_epoch == "last",
            metric=task_metric(task),
            first_counted=cfg.train.epochs - stages[-1].epochs,
        )

    def progress(self, history: Sequence[dict[str, Any]]) -> Progress:
        """The best counted epoch of ``history`` and the epochs since. A NaN score is never
        a rise; with no finite score the last epoch stands in."""
        best_epoch, best = 0, -math.inf
        for number in range(self.first_counted + 1, len(history) + 1):
            score = val_score(history[number - 1], self.metric)
            if score > best + self.min_delta:
                best_epoch, best = number, score
        if best_epoch == 0 and len(history) > self.first_counted:
            best_epoch = len(history)
        return Progress(best_epoch, best, len(history) - best_epoch if best_epoch else 0)

    def ends(self, history: Sequence[dict[str, Any]]) -> bool:
        """Whether the run stops after the last epoch of ``history``: its epoch budget
        spent, or ``patience`` counted epochs in a row without a new best (0: never)."""
        if len(history) >= self.epochs:
            return True
        return self.patience > 0 and self.progress(history).since_best >= self.patience

    def deployed(self, history: Sequence[dict[str, Any]]) -> int:
        """The epoch (1-based) whose weights the run would deploy after ``history``: its
        best counted one, or its last (train.deploy_epoch: last, or none counted yet)."""
        if self.deploy_last:
            return len(history)
        return self.progress(history).best_epoch or len(history)

    def end_message(self, history: Sequence[dict[str, Any]], deployed: int) -> str:
        """The progress line of a run that ends after ``history``."""
        if len(history) < self.epochs:
            return (
                f"early stopping after epoch {len(history)}: no new best validation "
                f"{self.metric} for {self.patience} epochs; deploying epoch {deployed}"
            )
        return f"trained all {self.epochs} epochs; deploying epoch {deployed}"
