"""Training stages: which parts each epoch updates, and with which loss terms.

OS-MD and the single-model baselines train in one stage. The baselines of DESIGN §3 that are
pipelines train in stages that split the same epoch budget (``baselines.*`` in the config):

- ``two_stage_hallucination`` (Hoffman 2016, Garcia 2018): ``teacher`` trains the
  full_multimodal path and H_p (E_o, E_p, F, H, H_p); ``hallucination`` trains E_h to mimic
  the frozen E_p's features; ``fusion`` trains E_o, F and H on (z_o, frozen z_h);
- ``logit_kd`` (Hinton 2015): ``teacher`` trains the full_multimodal teacher (T_o, E_p, F_t,
  H_t); ``student`` trains E_o and H on the labels and the teacher's softened logits;
- ``imputation``: ``generator`` trains G (L1 to the privileged input); ``task`` trains E_o,
  E_p, F and H on (ordinary, reconstructed) with G frozen.

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

from osmd_ray.config import Config
from osmd_ray.method.losses import osmd_weights


@dataclass(frozen=True)
class Stage:
    name: str
    epochs: int
    trains: tuple[str, ...] | None
    """Top-level parts updated in this stage; None: every part."""
    terms: Mapping[str, float]
    """Loss term -> weight (names of osmd_ray.method.losses.TERMS)."""
    lr_scale: Mapping[str, float] = field(default_factory=dict)
    """Top-level part -> learning-rate multiplier in this stage (1 for parts not named)."""

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


def method_stages(cfg: Config) -> list[Stage]:
    """The stages of ``cfg.method``, in order; their epochs sum to ``cfg.train.epochs``."""
    epochs, base = cfg.train.epochs, cfg.baselines
    if cfg.method == "osmd":
        scale = cfg.model.hallucination_lr_scale
        lr_scale = {"E_h": scale, "D_h": scale} if scale != 1.0 else {}
        return [Stage("joint", epochs, None, osmd_weights(cfg.loss), lr_scale)]
    if cfg.method in ("ordinary_only", "full_multimodal"):
        return [Stage("joint", epochs, None, {"deploy": 1.0})]
    if cfg.method == "two_stage_hallucination":
        shares = [base.two_stage_teacher, base.two_stage_hallucination, base.two_stage_fusion]
        e = split_epochs(epochs, shares)
        return [
            Stage("teacher", e[0], ("E_o", "E_p", "F", "H", "H_p"), {"teacher": 1.0, "priv": 1.0}),
            Stage("hallucination", e[1], ("E_h",), {"mimic": 1.0}),
            Stage("fusion", e[2], ("E_o", "F", "H"), {"deploy": 1.0}),
        ]
    if cfg.method == "logit_kd":
        e = split_epochs(epochs, [base.kd_teacher_fraction, 1 - base.kd_teacher_fraction])
        return [
            Stage("teacher", e[0], ("T_o", "E_p", "F_t", "H_t"), {"teacher": 1.0}),
            Stage(
                "student",
                e[1],
                ("E_o", "H"),
                {"deploy": 1.0 - base.kd_weight, "kd": base.kd_weight},
            ),
        ]
    if cfg.method == "imputation":
        e = split_epochs(epochs, [base.imputation_fraction, 1 - base.imputation_fraction])
        return [
            Stage("generator", e[0], ("G",), {"impute": 1.0}),
            Stage("task", e[1], ("E_o", "E_p", "F", "H"), {"deploy": 1.0}),
        ]
    raise ValueError(f"no stages defined for method {cfg.method!r}")


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
    chance (full_multimodal, 5 epochs: 0.36 with them, 0.90 recomputed; docs/results.md).
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
