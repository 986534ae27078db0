"""The in-process engine: one run trained in the calling process, without Ray or DeepSpeed.

For method work at lab speed (DESIGN §10): the workers' own network (``build_model``), epoch
(:func:`~osmd_ray.train.epoch.run_epoch`), optimiser, per-part schedule and ``evaluate``,
with the whole dataset in memory and a plain AdamW step (gradient clipping as DeepSpeed
does it). One process with global batch ``data.batch_size x scaling.num_workers`` stands in
for the workers' data-parallel steps: the (J)MMD term then sees the whole global batch
instead of one rank's share, a small difference.

The data order is one ``torch.randperm`` per epoch from a generator seeded with ``seed``;
the initial weights come from ``torch.manual_seed(seed)``. Same config, same figures.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from osmd_ray.blocks.nets import TrainingNet
from osmd_ray.blocks.stages import part_parameter_groups, recalibrate_batchnorm, stage_at_epoch
from osmd_ray.config import Config
from osmd_ray.data.reading import read_split_numpy
from osmd_ray.data.schema import Manifest, read_manifest
from osmd_ray.methods import build_model, check_config
from osmd_ray.train.epoch import build_optimizer, evaluate, lr_schedule, run_epoch

EVAL_BATCH = 512
"""Rows per evaluation forward (scores do not depend on it)."""

Split = dict[str, Tensor]


def load_splits(cfg: Config, manifest: Manifest) -> dict[str, Split]:
    """Every split of ``cfg.data.root`` in memory, the columns the run reads as tensors."""
    names = list(dict.fromkeys(cfg.data.ordinary + cfg.data.privileged + ["label"]))
    splits = {}
    for split in ("train", "val", "test"):
        arrays = read_split_numpy(cfg.data.root, split, names, manifest=manifest)
        splits[split] = {n: torch.from_numpy(np.ascontiguousarray(arrays[n])) for n in names}
    return splits


def _rows(split: Split, index: Tensor) -> Split:
    return {k: v[index] for k, v in split.items()}


def _shuffled_batches(split: Split, order: Tensor, batch: int) -> Iterator[Split]:
    """The epoch's batches in ``order``; the last incomplete one dropped, as the workers do."""
    for i in range(order.shape[0] // batch):
        yield _rows(split, order[i * batch : (i + 1) * batch])


def score(net: TrainingNet, split: Split, paths: tuple[str, ...], manifest: Manifest) -> dict:
    """Every path's scores on one split (one pass; accuracy, or mIoU and pixel accuracy)."""
    n = split["label"].shape[0]
    chunks = ({k: v[i : i + EVAL_BATCH] for k, v in split.items()} for i in range(0, n, EVAL_BATCH))
    return evaluate(net, chunks, paths, torch.device("cpu"), manifest)


def _adamw_step(
    net: TrainingNet, optimizer: torch.optim.Optimizer, schedule: Any, grad_clip: float
) -> Callable[[Tensor], None]:
    """What DeepSpeed's backward and step do for one process: clip, step, advance the LR."""

    def step(total: Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
        optimizer.step()
        schedule.step()

    return step


def train_in_process(
    cfg: Config,
    splits: dict[str, Split] | None = None,
    say: Callable[[str], None] | None = None,
) -> tuple[TrainingNet, dict[str, Any]]:
    """Train ``cfg`` in this process; returns the trained network and its figures.

    The figures: ``method``, ``seed``, ``metric`` (accuracy, or miou for segmentation),
    ``test_deploy``, ``val_deploy``, ``train_deploy`` (the deployment path on the training
    split: tells under-fitting from over-fitting), ``test_teacher`` where the method
    evaluates a teacher path, and ``train_s``. ``splits``: the data already in memory
    (:func:`load_splits`), to share one read between runs.
    """
    method = check_config(cfg)
    manifest = read_manifest(cfg.data.root)
    splits = load_splits(cfg, manifest) if splits is None else splits
    torch.manual_seed(cfg.seed)
    net = build_model(cfg, manifest)
    parts, groups = part_parameter_groups(net)
    optimizer = build_optimizer(groups, cfg)
    batch = cfg.data.batch_size * cfg.scaling.num_workers
    n = splits["train"]["label"].shape[0]
    # The workers' own schedule: n // workers rows per worker gives the same steps per epoch.
    schedule = lr_schedule(optimizer, cfg, n // cfg.scaling.num_workers, parts)
    step = _adamw_step(net, optimizer, schedule, cfg.train.grad_clip)
    stages = method.stages(cfg)
    order_generator = torch.Generator().manual_seed(cfg.seed)
    started, global_step = time.perf_counter(), 0
    for epoch in range(cfg.train.epochs):
        stage = stage_at_epoch(stages, epoch)
        order = torch.randperm(n, generator=order_generator)
        totals = run_epoch(
            net,
            net,
            stage,
            _shuffled_batches(splits["train"], order, batch),
            step,
            cfg,
            device=torch.device("cpu"),
            ignore_index=manifest.ignore_index,
            epoch=epoch,
            global_step=global_step,
            say=say,
        )
        global_step = totals.step
        recalibrate_batchnorm(net, net, totals.recent)
        if say is not None and totals.names:
            mean = float(totals.sums[totals.names.index("total")]) / max(totals.batches, 1)
            say(f"epoch {epoch + 1}/{cfg.train.epochs} [{stage.name}]  loss={mean:.4f}")
    train_s = round(time.perf_counter() - started, 1)
    metric = "miou" if manifest.task == "segmentation" else "accuracy"
    test = score(net, splits["test"], method.evaluates, manifest)
    figures: dict[str, Any] = {
        "method": cfg.method,
        "seed": cfg.seed,
        "metric": metric,
        "test_deploy": test["deploy"][metric],
        "val_deploy": score(net, splits["val"], method.evaluates, manifest)["deploy"][metric],
        "train_s": train_s,
        "train_deploy": score(net, splits["train"], ("deploy",), manifest)["deploy"][metric],
    }
    if "teacher" in test:
        figures["test_teacher"] = test["teacher"][metric]
    return net, figures
