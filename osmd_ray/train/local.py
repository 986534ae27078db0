"""The in-process engine: one run trained in the calling process, without a worker group.

For runs too small to pay for Ray Train's controller, workers and DeepSpeed (DESIGN §10):
sweep trials, compare grids and method work (``osmd lab``). It runs the workers' own network
(``build_model``), epoch (:func:`~osmd_ray.train.epoch.run_epoch`), optimiser, per-part
schedule and ``evaluate``, with the whole dataset in memory and a plain AdamW step (gradient
clipping as DeepSpeed does it). One process with global batch ``data.batch_size x
max(1, scaling.num_workers)`` stands in for the workers' data-parallel steps: the (J)MMD term
then sees the whole global batch instead of one rank's share, a small difference.

The data order is one ``torch.randperm`` per epoch from a generator seeded with ``seed``;
the initial weights come from ``torch.manual_seed(seed)`` and each epoch reseeds the global
generators (dropout) from the seed and the epoch, so a run resumed from its state
(:meth:`LocalRun.state_dict`) continues exactly as an uninterrupted one. Same config, same
figures.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from osmd_ray.blocks.nets import TrainingNet
from osmd_ray.blocks.stages import (
    Stage,
    part_parameter_groups,
    recalibrate_batchnorm,
    stage_at_epoch,
)
from osmd_ray.config import Config
from osmd_ray.data.reading import read_split_numpy, subset_rows
from osmd_ray.data.schema import Manifest, read_manifest
from osmd_ray.methods import build_model, check_config
from osmd_ray.train.epoch import (
    EpochTotals,
    batch_to_device,
    build_optimizer,
    evaluate,
    lr_schedule,
    run_epoch,
    seed_everything,
    uses_bf16,
)
from osmd_ray.train.loop import check_finite_weights
from osmd_ray.train.stopping import StoppingRule

EVAL_BATCH = 512
"""Rows per evaluation forward (scores do not depend on it)."""

Split = dict[str, Tensor]


def split_columns(cfg: Config, manifest: Manifest) -> list[str]:
    """The columns a run reads: its modalities, the label and the presence flags of its
    optional privileged modalities."""
    names = [*cfg.data.ordinary, *cfg.data.privileged, "label"]
    names += [f"has_{m}" for m in cfg.data.privileged if m in manifest.optional_modalities]
    return list(dict.fromkeys(names))


def read_splits(
    cfg: Config, manifest: Manifest, columns: list[str] | None = None
) -> dict[str, dict[str, np.ndarray]]:
    """Every split of ``cfg.data.root`` in memory as NumPy arrays (what a sweep or a compare
    puts in Ray's object store once, for every run to share): the run's columns, or
    ``columns`` (those of several runs)."""
    names = split_columns(cfg, manifest) if columns is None else columns
    return {
        split: read_split_numpy(cfg.data.root, split, names, manifest=manifest)
        for split in ("train", "val", "test")
    }


def _as_tensor(array: np.ndarray) -> Tensor:
    """One column as a tensor of its own (arrays from the object store are read-only);
    images (N, C, H, W) channels-last, the layout the network's convolutions run fastest in
    on CPU (1.18x an epoch, 1.31x an evaluation on the synthetic set: benchmarks/RESULTS.md)."""
    tensor = torch.from_numpy(np.array(array, copy=True))
    return tensor.contiguous(memory_format=torch.channels_last) if tensor.dim() == 4 else tensor


def as_tensors(arrays: dict[str, dict[str, np.ndarray]]) -> dict[str, Split]:
    """Splits of NumPy arrays as tensors, images channels-last (:func:`_as_tensor`)."""
    return {
        split: {n: _as_tensor(a) for n, a in columns.items()} for split, columns in arrays.items()
    }


def load_splits(cfg: Config, manifest: Manifest) -> dict[str, Split]:
    """Every split of ``cfg.data.root`` in memory, the columns the run reads as tensors."""
    return as_tensors(read_splits(cfg, manifest))


def train_subset(split: Split, rows: int) -> Split:
    """The ``data.train_rows`` subset of a training split (the whole split for 0)."""
    total = split["label"].shape[0]
    if rows <= 0 or rows >= total:
        return split
    return _rows(split, torch.from_numpy(subset_rows(total, rows)))


def _rows(split: Split, index: Tensor) -> Split:
    return {k: v[index] for k, v in split.items()}


def _shuffled_batches(split: Split, order: Tensor, batch: int) -> Iterator[Split]:
    """The epoch's batches in ``order``; the last incomplete one dropped, as the workers do."""
    for i in range(order.shape[0] // batch):
        yield _rows(split, order[i * batch : (i + 1) * batch])


def score(
    net: Any,
    split: Split,
    paths: tuple[str, ...],
    manifest: Manifest,
    device: torch.device | None = None,
) -> dict:
    """Every path's scores on one split, every row once (accuracy, or mIoU and pixel
    accuracy, and the mean loss)."""
    n = split["label"].shape[0]
    chunks = ({k: v[i : i + EVAL_BATCH] for k, v in split.items()} for i in range(0, n, EVAL_BATCH))
    return evaluate(net, chunks, paths, device or torch.device("cpu"), manifest)


def run_device(cfg: Config) -> torch.device:
    """The run's device: the (first visible) GPU when the config asks for one."""
    return torch.device("cuda") if cfg.scaling.use_gpu else torch.device("cpu")


class LocalRun:
    """One run's training state in this process: network, optimiser, schedule, data order
    and where the run stands (``epoch`` epochs done, ``global_step`` steps)."""

    def __init__(self, cfg: Config, manifest: Manifest, splits: dict[str, Split]) -> None:
        self.cfg, self.manifest = cfg, manifest
        self.splits = {**splits, "train": train_subset(splits["train"], cfg.data.train_rows)}
        self.method = check_config(cfg)
        self.device = run_device(cfg)
        torch.manual_seed(cfg.seed)
        # Channels-last weights to match the images (:func:`_as_tensor`).
        self.net: TrainingNet = build_model(cfg, manifest).to(
            self.device, memory_format=torch.channels_last
        )
        parts, groups = part_parameter_groups(self.net)
        self.optimizer = build_optimizer(groups, cfg)
        workers = max(1, cfg.scaling.num_workers)
        self.batch = cfg.data.batch_size * workers
        self.rows = self.splits["train"]["label"].shape[0]
        # The workers' own schedule: rows // workers per worker gives the same steps per epoch.
        self.schedule = lr_schedule(self.optimizer, cfg, self.rows // workers, parts)
        self.stages = self.method.stages(cfg)
        self.order = torch.Generator().manual_seed(cfg.seed)
        self.epoch = 0
        self.global_step = 0
        # bf16 on a GPU as a plain PyTorch script does it: fp32 weights and optimiser,
        # forwards under autocast (the DeepSpeed workers keep bf16 weights instead).
        self.bf16 = uses_bf16(cfg)
        self.stopping = StoppingRule.of(cfg, self.stages, manifest.task)
        self.metric = self.stopping.metric
        self.deployed_state: dict[str, Tensor] | None = None
        """A copy of the weights of the epoch the run would deploy so far, when that is not
        simply the latest (train.deploy_epoch: best)."""

    def _step(self, total: Tensor) -> None:
        """What DeepSpeed's backward and step do for one process: clip, step, advance the LR."""
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        self.schedule.step()

    def _autocast(self) -> torch.autocast:
        """The precision the network's forwards run in (:attr:`bf16`)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _net_forward(self, batch: Any) -> Any:
        with self._autocast():
            return self.net(batch)

    def _forward(self, raw: Any) -> Any:
        return self._net_forward(batch_to_device(raw, self.device))

    def train_epoch(self, say: Callable[[str], None] | None = None) -> tuple[Stage, EpochTotals]:
        """Train the next epoch; returns its stage and what it added up."""
        epoch, cfg = self.epoch, self.cfg
        if epoch:
            # Not before the first epoch: the initial weights' seed is the run's own.
            seed_everything(cfg.seed * 100_003 + epoch * 1009)
        stage = stage_at_epoch(self.stages, epoch)
        order = torch.randperm(self.rows, generator=self.order)
        totals = run_epoch(
            self._net_forward,
            self.net,
            stage,
            _shuffled_batches(self.splits["train"], order, self.batch),
            self._step,
            cfg,
            device=self.device,
            ignore_index=self.manifest.ignore_index,
            epoch=epoch,
            global_step=self.global_step,
            say=say,
        )
        self.global_step = totals.step
        recalibrate_batchnorm(self.net, self._forward, totals.recent)
        totals.recent.clear()
        self.epoch += 1
        return stage, totals

    def score(self, split: str, paths: tuple[str, ...] | None = None) -> dict:
        paths = self.method.evaluates if paths is None else paths
        with self._autocast():
            return score(self.net, self.splits[split], paths, self.manifest, self.device)

    def keep_if_deployed(self, history: list[dict[str, Any]]) -> None:
        """After an epoch's validation (the last record of ``history``): copy the weights
        when this epoch is, so far, the one the run deploys."""
        if not self.stopping.deploy_last and self.stopping.deployed(history) == len(history):
            self.deployed_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}

    def load_deployed(self, history: list[dict[str, Any]]) -> int:
        """Put the weights of the epoch the run deploys into the network (its best or its
        last, train.deploy_epoch); returns that epoch (1-based)."""
        epoch = self.stopping.deployed(history)
        if epoch != len(history):
            assert self.deployed_state is not None  # kept by keep_if_deployed at that epoch
            # A diverged last epoch stops the run, as it would without the swap.
            check_finite_weights(
                self.net.state_dict(), self.epoch - 1, self.global_step, self.device
            )
            self.net.load_state_dict(self.deployed_state)
        return epoch

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly where this one stands."""
        return {
            "net": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "order": self.order.get_state(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "deployed": self.deployed_state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.order.set_state(state["order"])
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.deployed_state = state.get("deployed")


def train_in_process(
    cfg: Config,
    splits: dict[str, Split] | None = None,
    say: Callable[[str], None] | None = None,
) -> tuple[TrainingNet, dict[str, Any]]:
    """Train ``cfg`` in this process; returns the trained network and its figures.

    It validates every epoch, stops as ``train.early_stopping`` says and ends with the
    weights of the epoch ``train.deploy_epoch`` names, as a run of ``osmd train`` does. The
    figures: ``method``, ``seed``, ``metric`` (accuracy, or miou for segmentation),
    ``test_deploy``, ``val_deploy``, ``train_deploy`` (the deployment path on the training
    split: tells under-fitting from over-fitting), ``test_teacher`` where the method
    evaluates a teacher path, ``train_s`` (validation included), ``epochs`` (trained) and
    ``deployed_epoch``. ``splits``: the data already in memory
    (:func:`load_splits`), to share one read between runs.
    """
    manifest = read_manifest(cfg.data.root)
    splits = load_splits(cfg, manifest) if splits is None else splits
    run = LocalRun(cfg, manifest, splits)
    started = time.perf_counter()
    history: list[dict[str, Any]] = []
    while not history or not run.stopping.ends(history):
        stage, totals = run.train_epoch(say)
        history.append({"val": run.score("val")})
        run.keep_if_deployed(history)
        if say is not None and totals.names:
            mean = float(totals.sums[totals.names.index("total")]) / max(totals.batches, 1)
            say(f"epoch {run.epoch}/{cfg.train.epochs} [{stage.name}]  loss={mean:.4f}")
    deployed = run.load_deployed(history)
    train_s = round(time.perf_counter() - started, 1)
    metric = run.metric
    test = run.score("test")
    figures: dict[str, Any] = {
        "method": cfg.method,
        "seed": cfg.seed,
        "metric": metric,
        "test_deploy": test["deploy"][metric],
        "val_deploy": history[deployed - 1]["val"]["deploy"][metric],
        "train_s": train_s,
        "train_deploy": run.score("train", ("deploy",))["deploy"][metric],
        "epochs": len(history),
        "deployed_epoch": deployed,
    }
    if "teacher" in test:
        figures["test_teacher"] = test["teacher"][metric]
    return run.net, figures
