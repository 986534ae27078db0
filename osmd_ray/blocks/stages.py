"""Training stages: which parts each epoch updates, and with which loss terms.

A method (:mod:`osmd_ray.methods`) trains in one stage or in several that split the same
epoch budget (:func:`split_epochs`); this module holds the mechanics every method shares.

A part outside a stage's ``trains`` is frozen for that stage: its learning rate is 0 (so
neither AdamW's step nor its weight decay moves it; one optimiser, created once, serves every
stage and checkpoints as usual) and it runs in eval mode (BatchNorm statistics stay put).

At the end of every epoch :func:`recalibrate_batchnorm` recomputes the running statistics of
the BatchNorm layers the epoch trained, so evaluation, the next stage (which may freeze those
parts) and the exported model see statistics of the final weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Stage:
    name: str
    epochs: int
    trains: tuple[str, ...] | None
    """Top-level parts updated in this stage; None: every part."""
    terms: Mapping[str, float]
    """Loss term -> weight (names of osmd_ray.blocks.losses.TERMS)."""
    lr_scale: Mapping[str, float] = field(default_factory=dict)
    """Top-level part -> learning-rate multiplier in this stage (1 for parts not named)."""
    kd_source: str = "teacher_logits"
    """The output the ``kd`` term distils into the deployment path (if the stage has one)."""

    def updates(self, part: str) -> bool:
        return self.trains is None or part in self.trains


def split_epochs(total: int, shares: Sequence[float]) -> list[int]:
    """``total`` epochs in proportion to ``shares``, each stage at least one epoch.

    Largest-remainder rounding, so the parts always sum to ``total``.
    """
    if total < len(shares):
        raise ValueError(f"{total} epochs cannot cover {len(shares)} stages")
    scale = total / sum(shares)
    raw = [s * scale for s in shares]
    epochs = [max(1, math.floor(r)) for r in raw]
    while sum(epochs) > total:  # the max(1, ...) floors may overshoot
        i = max(range(len(epochs)), key=lambda k: (epochs[k] - raw[k], epochs[k]))
        epochs[i] -= 1
    while sum(epochs) < total:
        i = max(range(len(epochs)), key=lambda k: raw[k] - epochs[k])
        epochs[i] += 1
    return epochs


def stage_at_epoch(stages: Sequence[Stage], epoch: int) -> Stage:
    """The stage that trains 0-based ``epoch``."""
    end = 0
    for stage in stages:
        end += stage.epochs
        if epoch < end:
            return stage
    raise ValueError(f"epoch {epoch + 1} is past the last stage (total {end} epochs)")


def part_parameter_groups(model: nn.Module) -> tuple[list[str], list[dict]]:
    """One optimiser group per top-level part that owns parameters: (names, groups).

    A parameter shared by two parts (E_h sharing E_o's first stages) belongs to the first
    part that holds it, in registration order.
    """
    seen: set[int] = set()
    names, groups = [], []
    for name, child in model.named_children():
        params = [p for p in child.parameters() if id(p) not in seen]
        seen.update(id(p) for p in params)
        if params:
            names.append(name)
            groups.append({"params": params})
    return names, groups


def stage_lr_factor(
    stages: Sequence[Stage], part: str, steps_per_epoch: int, schedule: str
) -> Callable[[int], float]:
    """LambdaLR factor for one part's group: cosine (or constant) within each stage that
    updates the part, times the stage's ``lr_scale`` for the part; 0 in the stages that
    freeze it."""
    bounds, start = [], 0
    for stage in stages:
        bounds.append((start, start + stage.epochs * steps_per_epoch, stage))
        start += stage.epochs * steps_per_epoch

    def factor(step: int) -> float:
        for begin, end, stage in bounds:
            if step < end or stage is bounds[-1][2]:
                if not stage.updates(part):
                    return 0.0
                scale = float(stage.lr_scale.get(part, 1.0))
                if schedule == "constant":
                    return scale
                length = max(1, end - begin)
                progress = min(step - begin, length) / length
                return scale * 0.5 * (1.0 + math.cos(math.pi * progress))
        return 0.0

    return factor


def set_stage_modes(model: nn.Module, stage: Stage) -> None:
    """Train mode for the parts the stage updates, eval mode for the frozen ones."""
    model.train()
    for name, child in model.named_children():
        # Parameter-free children (dropout) keep their train-mode behaviour.
        if not stage.updates(name) and any(True for _ in child.parameters()):
            child.eval()


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, forward: Callable[[Any], object], batches: Iterable[Any]
) -> int:
    """Recompute the running statistics of ``model``'s BatchNorm layers that are in train
    mode (the parts the current stage trains) as the plain average over ``batches``, run
    through ``forward`` without gradients; layers in eval mode (frozen parts) keep theirs.
    Returns the number of layers recalibrated.

    Why: BatchNorm's running statistics are an exponential average (momentum 0.1) over the
    last ~10 steps, taken while the weights moved. After a short training (7 steps an epoch
    on the synthetic set) they describe an earlier network, and eval-mode accuracy fell to
    chance (the multimodal network, 5 epochs: 0.36 with them, 0.90 recomputed; docs/lab_log.md).
    """
    layers = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    batches = list(batches)
    if not layers or not batches:  # nothing to average: keep the statistics there are
        return 0
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    try:
        for batch in batches:
            forward(batch)
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
    return len(layers)
