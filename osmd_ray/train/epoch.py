"""One training epoch and one evaluation pass: the loop body both engines run.

Nothing here knows Ray or DeepSpeed. The Ray Train workers (:mod:`osmd_ray.train.loop`) run
:func:`run_epoch` on a DeepSpeed engine, one rank each; the in-process engine
(:mod:`osmd_ray.train.local`) runs it on the bare network with a plain AdamW step. What
differs between them, how a loss becomes a weight update, is the ``step`` they pass in. The
sums over ranks go through ``torch.distributed`` when a process group is up (the workers)
and are the local values otherwise.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as functional
from torch import Tensor, nn

from osmd_ray.blocks.losses import compute_losses, warmed_up_terms
from osmd_ray.blocks.metrics import confusion_matrix, segmentation_scores
from osmd_ray.blocks.nets import privileged_mask
from osmd_ray.blocks.stages import Stage, set_stage_modes, stage_lr_factor
from osmd_ray.config import Config
from osmd_ray.data.schema import Manifest
from osmd_ray.errors import NonFiniteLossError
from osmd_ray.methods import get_method

Batch = Mapping[str, Tensor]


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's global generators from one seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def uses_bf16(cfg: Config) -> bool:
    """bf16 on GPU, fp32 on CPU, unless the config says otherwise (train.precision)."""
    if cfg.train.precision == "auto":
        return cfg.scaling.use_gpu
    return cfg.train.precision == "bf16"


def build_optimizer(groups: list[dict[str, Any]], cfg: Config) -> torch.optim.Optimizer:
    """AdamW in its default (foreach) form, over one group per part. The fused kernel was
    not faster under ZeRO-2/3 on an H200 (benchmarks/RESULTS.md, "GPU check")."""
    return torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def lr_schedule(
    optimizer: torch.optim.Optimizer, cfg: Config, rows_per_worker: int, parts: list[str]
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per part (one optimiser group each): cosine decay to zero within every stage that
    trains the part (or constant), 0 while a stage freezes it; stepped once per step.

    Its state is part of the DeepSpeed checkpoint, so a resumed run continues the curve.
    """
    steps_per_epoch = max(1, rows_per_worker // cfg.data.batch_size)
    stages = get_method(cfg.method).stages(cfg)
    factors = [stage_lr_factor(stages, part, steps_per_epoch, cfg.train.schedule) for part in parts]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def batch_losses(
    outputs: dict[str, Tensor],
    batch: Batch,
    cfg: Config,
    stage: Stage | None = None,
    ignore_index: int = -100,
    epoch: int | None = None,
) -> dict[str, Tensor]:
    """The loss terms of ``stage`` for one batch, as every engine computes them (the
    benchmarks call this too, so they time the same step). ``stage`` defaults to the
    method's last (the one that trains its deployment path). ``ignore_index``: the dataset's
    label of unlabelled pixels (segmentation). ``epoch`` (0-based): the alignment weight as
    ``loss.jan_warmup_epochs`` ramps it at that epoch; None: its full weight."""
    if stage is None:
        stage = get_method(cfg.method).stages(cfg)[-1]
    terms = stage.terms
    if epoch is not None:
        terms = warmed_up_terms(terms, cfg.loss.jan_warmup_epochs, epoch)
    return compute_losses(
        outputs,
        batch["label"].long(),
        privileged_mask(batch, cfg.data.privileged),
        cfg.loss,
        terms,
        ignore_index=ignore_index,
        kd_temperature=cfg.baselines.kd_temperature,
        kd_source=stage.kd_source,
    )


def batch_to_device(batch: Batch, device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def all_reduce_max(values: Tensor) -> Tensor:
    """The element-wise maximum over ranks (the values themselves in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def all_reduce_sum(values: Tensor) -> Tensor:
    """The element-wise sum over ranks (the values themselves in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def step_loss_values(
    losses: Mapping[str, Tensor], device: torch.device
) -> tuple[list[str], Tensor, list[str]]:
    """The step's loss terms on the host: their names (sorted), their values (float64, in
    that order) and the names of those that are non-finite on any rank. A collective: call
    on all ranks.

    One device-to-host copy for all terms: a ``float()`` or ``bool()`` per term would make
    the host wait for the GPU once per term, every step."""
    names = sorted(losses)
    values = torch.stack([losses[n].detach().float().reshape(()) for n in names])
    flags = all_reduce_max((~torch.isfinite(values)).to(values.dtype).to(device))
    host = torch.cat([values.to(flags.device), flags]).cpu().double()
    bad = [n for n, flag in zip(names, host[len(names) :].tolist(), strict=True) if flag > 0]
    return names, host[: len(names)], bad


def peak_gpu_memory_gib(device: torch.device) -> float | None:
    """The most GPU memory any rank's tensors have held so far (GiB), None off a GPU.
    A collective on GPU ranks: call on all."""
    if device.type != "cuda":
        return None
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30], device=device)
    return float(all_reduce_max(peak)[0])


def nonfinite_terms(losses: Mapping[str, Tensor], device: torch.device) -> list[str]:
    """Names of the loss terms that are non-finite on any rank (a collective: call on all)."""
    return step_loss_values(losses, device)[2]


@dataclass
class EpochTotals:
    """What one rank's epoch added up: each loss term summed over its steps (``names`` in
    ``sums``' order), the steps taken, the global step after the epoch, and the epoch's last
    batches (host memory) for the BatchNorm statistics after it."""

    names: list[str] = field(default_factory=list)
    sums: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    batches: int = 0
    step: int = 0
    recent: collections.deque[Any] = field(default_factory=collections.deque)


def run_epoch(
    forward: Callable[[Batch], dict[str, Tensor]],
    net: nn.Module,
    stage: Stage,
    batches: Iterable[Batch],
    step: Callable[[Tensor], None],
    cfg: Config,
    *,
    device: torch.device,
    ignore_index: int,
    epoch: int,
    global_step: int,
    say: Callable[[str], None] | None = None,
    rank: int = 0,
) -> EpochTotals:
    """Train ``net`` for one epoch of ``stage`` over ``batches``.

    ``forward`` runs the network (the DeepSpeed engine, or ``net`` itself); ``step(total)``
    turns the batch's total loss into a weight update. A batch whose loss is non-finite on
    any rank raises NonFiniteLossError, or is skipped (``train.nonfinite=skip``, reported
    through ``say`` on rank 0). Every batch, skipped ones too, counts for the BatchNorm
    recalibration, so that all ranks run equally many forwards.
    """
    set_stage_modes(net, stage)
    totals = EpochTotals(
        step=global_step, recent=collections.deque(maxlen=cfg.train.bn_recalibration_batches)
    )
    for raw in batches:
        totals.recent.append(raw)
        batch = batch_to_device(raw, device)
        losses = batch_losses(
            forward(batch), batch, cfg, stage, ignore_index=ignore_index, epoch=epoch
        )
        names, values, bad = step_loss_values(losses, device)
        totals.step += 1
        if bad:
            message = (
                f"non-finite loss at epoch {epoch + 1}, step {totals.step}: term(s) "
                f"{', '.join(bad)} (values on rank {rank}: "
                + ", ".join(f"{n}={float(values[names.index(n)]):.4g}" for n in bad)
                + "). Lower train.lr, check the data with `osmd data check`, or set "
                "train.nonfinite=skip to drop such steps."
            )
            if cfg.train.nonfinite != "skip":
                raise NonFiniteLossError(message)
            if rank == 0 and say is not None:
                say(f"skipped: {message}")
            continue
        step(losses["total"])
        if not totals.names:
            totals.names = names
            totals.sums = torch.zeros(len(names), dtype=torch.float64)
        totals.sums += values  # a stage computes the same terms every step
        totals.batches += 1
    return totals


class ForwardOnly(dict):
    """A batch that evaluation runs through the network but does not score.

    ZeRO-3 gathers the parameters inside every forward, a collective: each rank must run
    equally many forwards, and a rank with no rows of its own left runs one of these.
    """


@torch.no_grad()
def evaluate(
    forward: Any,
    batches: Iterable[Batch],
    paths: tuple[str, ...],
    device: torch.device,
    manifest: Manifest | None = None,
) -> dict[str, dict[str, float]]:
    """The scores of :func:`evaluate_with_rows`, without the row count."""
    return evaluate_with_rows(forward, batches, paths, device, manifest)[0]


@torch.no_grad()
def evaluate_with_rows(
    forward: Any,
    batches: Iterable[Batch],
    paths: tuple[str, ...],
    device: torch.device,
    manifest: Manifest | None = None,
) -> tuple[dict[str, dict[str, float]], int]:
    """Accuracy and mean loss per path (``<path>_logits``) over a split, summed across ranks;
    for segmentation (``manifest.task``) pixel accuracy, mIoU and the loss per labelled
    pixel, from confusion matrices summed across ranks (the ignore index counts nowhere).
    Also the rows scored, summed across ranks.

    ``forward`` is the network or its DeepSpeed engine (put in eval mode here). Every rank
    scores its own rows; :class:`ForwardOnly` batches are run but not scored (they keep the
    forward counts equal across ranks, see :func:`osmd_ray.train.loop.rank_share`). A
    collective: call on all ranks.
    """
    forward.eval()
    if manifest is not None and manifest.task == "segmentation":
        return _evaluate_segmentation(forward, batches, paths, device, manifest)
    # Per path: correct predictions and summed loss; last entry: rows seen.
    sums = torch.zeros(2 * len(paths) + 1, dtype=torch.float64)
    for labels, path_logits in _path_logits(forward, batches, paths, device):
        for i, logits in enumerate(path_logits):
            sums[2 * i] += float((logits.argmax(dim=1) == labels).sum())
            sums[2 * i + 1] += float(functional.cross_entropy(logits, labels, reduction="sum"))
        sums[-1] += labels.shape[0]
    sums = all_reduce_sum(sums.to(device)).cpu()
    count = float(sums[-1])
    if count == 0:
        raise RuntimeError("evaluation split is empty")
    scores = {
        path: {"accuracy": float(sums[2 * i]) / count, "loss": float(sums[2 * i + 1]) / count}
        for i, path in enumerate(paths)
    }
    return scores, int(count)


def _path_logits(
    forward: Any, batches: Iterable[Batch], paths: tuple[str, ...], device: torch.device
) -> Iterator[tuple[Tensor, list[Tensor]]]:
    """Per scored batch: its labels and each path's logits (fp32). ForwardOnly batches are
    run through ``forward`` and dropped."""
    for raw in batches:
        batch = batch_to_device(raw, device)
        outputs = forward(batch)
        if isinstance(raw, ForwardOnly):
            continue
        yield batch["label"].long(), [outputs[f"{path}_logits"].float() for path in paths]


def _evaluate_segmentation(
    forward: Any,
    batches: Iterable[Batch],
    paths: tuple[str, ...],
    device: torch.device,
    manifest: Manifest,
) -> tuple[dict[str, dict[str, float]], int]:
    k, ignore = manifest.num_classes, manifest.ignore_index
    confusions = torch.zeros((len(paths), k, k), dtype=torch.float64)
    losses = torch.zeros(len(paths), dtype=torch.float64)
    rows = torch.zeros(1, dtype=torch.float64)
    for labels, path_logits in _path_logits(forward, batches, paths, device):
        for i, logits in enumerate(path_logits):
            confusions[i] += confusion_matrix(logits.argmax(dim=1), labels, k, ignore).cpu()
            losses[i] += float(
                functional.cross_entropy(logits, labels, ignore_index=ignore, reduction="sum")
            )
        rows += labels.shape[0]
    sums = all_reduce_sum(torch.cat([confusions.flatten(), losses, rows]).to(device)).cpu()
    confusions = sums[: confusions.numel()].reshape(confusions.shape)
    results = {}
    for i, path in enumerate(paths):
        try:
            scores = segmentation_scores(confusions[i])
        except ValueError:
            raise RuntimeError("evaluation split has no labelled pixel") from None
        pixels = scores.pop("pixels")
        results[path] = {**scores, "loss": float(sums[confusions.numel() + i]) / pixels}
    return results, int(sums[-1])
