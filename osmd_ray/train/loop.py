"""The training loop every Ray Train worker runs: one DeepSpeed rank per worker (DESIGN §6).

This file is the only place where a training step, validation, checkpointing and resuming
happen. The driver side (building the trainer, writing the run folder) is in ``runner.py``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from osmd_ray.config import Config, config_from_dict, flatten_keys
from osmd_ray.data.schema import Manifest
from osmd_ray.errors import NonFiniteLossError
from osmd_ray.method.stages import (
    method_stages,
    part_parameter_groups,
    recalibrate_batchnorm,
    set_stage_modes,
    stage_at_epoch,
    stage_lr_factor,
)

CHECKPOINT_TAG = "ds"
STATE_FILE = "state.json"
WEIGHTS_FILE = "model.safetensors"
# Paths evaluated on val and test, per method; "deploy" is what the deployment model computes.
EVAL_PATHS = {
    "osmd": ("deploy", "teacher"),
    "full_multimodal": ("deploy",),
    "ordinary_only": ("deploy",),
    "two_stage_hallucination": ("deploy", "teacher"),
    "logit_kd": ("deploy", "teacher"),
    "imputation": ("deploy",),
}


def deepspeed_config(cfg: Config, use_bf16: bool) -> dict[str, Any]:
    """The DeepSpeed engine configuration for a run."""
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "gradient_clipping": cfg.train.grad_clip,
        "bf16": {"enabled": use_bf16},
        # DeepSpeed >= 0.18 casts parameters only and keeps buffers in fp32; BatchNorm's
        # running statistics must match its bf16 weights (CPU batch_norm refuses the mix).
        **({"data_types": {"buffer_dtype": "bf16"}} if use_bf16 else {}),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def set_cpu_threads(cfg: Config) -> int:
    """On CPU runs, give torch as many threads as the worker holds CPUs (at least 1).

    Ray sets OMP_NUM_THREADS from the worker's CPUs, but torch in a Ray Train worker was seen
    with one thread per core regardless (2 threads in each of 2 one-CPU workers on 2 cores):
    the workers then oversubscribe the cores, and OpenMP threads wait on each other
    (benchmarks/RESULTS.md, training throughput). GPU runs keep torch's default.
    """
    if not cfg.scaling.use_gpu:
        torch.set_num_threads(max(1, math.floor(cfg.scaling.cpus_per_worker)))
    return torch.get_num_threads()


def uses_bf16(cfg: Config) -> bool:
    """bf16 on GPU, fp32 on CPU, unless the config says otherwise."""
    if cfg.train.precision == "auto":
        return cfg.scaling.use_gpu
    return cfg.train.precision == "bf16"


def build_optimizer(groups: list[dict[str, Any]], cfg: Config) -> torch.optim.Optimizer:
    """The client optimiser DeepSpeed wraps: AdamW in its default (foreach) form. The fused
    kernel was not faster under ZeRO-2/3 on an H200 (benchmarks/RESULTS.md, "GPU check")."""
    return torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def batch_losses(
    outputs: dict[str, torch.Tensor],
    batch: Mapping[str, torch.Tensor],
    cfg: Config,
    terms: Mapping[str, float] | None = None,
    ignore_index: int = -100,
) -> dict[str, torch.Tensor]:
    """The run's loss terms for one batch (``terms``: the current stage's objective), as the
    workers compute them; the benchmarks call this too, so they time the same step.
    ``ignore_index``: the dataset's label of unlabelled pixels (segmentation)."""
    from osmd_ray.method.losses import compute_losses
    from osmd_ray.method.model import privileged_mask

    return compute_losses(
        outputs,
        batch["label"].long(),
        privileged_mask(batch, cfg.data.privileged),
        cfg.method,
        cfg.loss,
        ignore_index=ignore_index,
        terms=terms,
        kd_temperature=cfg.baselines.kd_temperature,
    )


def lr_schedule(
    optimizer: torch.optim.Optimizer, cfg: Config, rows_per_worker: int, parts: list[str]
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per part (one optimiser group each): cosine decay to zero within every stage that
    trains the part (or constant), 0 while a stage freezes it; stepped by DeepSpeed.

    Its state is part of the DeepSpeed checkpoint, so a resumed run continues the curve.
    """
    steps_per_epoch = max(1, rows_per_worker // cfg.data.batch_size)
    stages = method_stages(cfg)
    factors = [stage_lr_factor(stages, part, steps_per_epoch, cfg.train.schedule) for part in parts]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def batch_to_device(
    batch: Mapping[str, torch.Tensor], device: torch.device
) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def nonfinite_terms(losses: Mapping[str, torch.Tensor], device: torch.device) -> list[str]:
    """Names of the loss terms that are non-finite on any rank (a collective: call on all)."""
    names = sorted(losses)
    flags = torch.tensor(
        [0.0 if bool(torch.isfinite(losses[n].detach()).all()) else 1.0 for n in names],
        device=device,
    )
    flags = _all_reduce_max(flags)
    return [n for n, f in zip(names, flags.tolist(), strict=True) if f > 0]


@torch.no_grad()
def evaluate(
    engine: Any,
    batches: Iterable[Mapping[str, torch.Tensor]],
    method: str,
    device: torch.device,
    manifest: Manifest | None = None,
) -> dict[str, dict[str, float]]:
    """Accuracy and mean loss per path over a split, summed across ranks; for segmentation
    (``manifest.task``) pixel accuracy, mIoU and the loss per labelled pixel, from confusion
    matrices summed across ranks (:mod:`osmd_ray.metrics`; the ignore index counts nowhere).

    Ray Data splits val/test into equal parts (up to workers - 1 rows of a split whose size
    is not a multiple of the worker count are left out), so every rank runs the same number
    of forward passes, which ZeRO-3's collective forward needs. A collective: call on all.
    """
    import torch.nn.functional as functional

    engine.eval()
    paths = EVAL_PATHS[method]
    if manifest is not None and manifest.task == "segmentation":
        return _evaluate_segmentation(engine, batches, paths, device, manifest)
    # Per path: correct predictions and summed loss; last entry: rows seen.
    sums = torch.zeros(2 * len(paths) + 1, dtype=torch.float64)
    for raw in batches:
        batch = batch_to_device(raw, device)
        labels = batch["label"].long()
        outputs = engine(batch)
        for i, path in enumerate(paths):
            logits = outputs[f"{path}_logits"].float()
            sums[2 * i] += float((logits.argmax(dim=1) == labels).sum())
            sums[2 * i + 1] += float(functional.cross_entropy(logits, labels, reduction="sum"))
        sums[-1] += labels.shape[0]
    sums = _all_reduce_sum(sums.to(device)).cpu()
    count = float(sums[-1])
    if count == 0:
        raise RuntimeError("evaluation split is empty")
    return {
        path: {"accuracy": float(sums[2 * i]) / count, "loss": float(sums[2 * i + 1]) / count}
        for i, path in enumerate(paths)
    }


def _evaluate_segmentation(
    engine: Any,
    batches: Iterable[Mapping[str, torch.Tensor]],
    paths: tuple[str, ...],
    device: torch.device,
    manifest: Manifest,
) -> dict[str, dict[str, float]]:
    import torch.nn.functional as functional

    from osmd_ray.metrics import confusion_matrix, segmentation_scores

    k, ignore = manifest.num_classes, manifest.ignore_index
    confusions = torch.zeros((len(paths), k, k), dtype=torch.float64)
    losses = torch.zeros(len(paths), dtype=torch.float64)
    for raw in batches:
        batch = batch_to_device(raw, device)
        labels = batch["label"].long()
        outputs = engine(batch)
        for i, path in enumerate(paths):
            logits = outputs[f"{path}_logits"].float()
            confusions[i] += confusion_matrix(logits.argmax(dim=1), labels, k, ignore).cpu()
            losses[i] += float(
                functional.cross_entropy(logits, labels, ignore_index=ignore, reduction="sum")
            )
    sums = _all_reduce_sum(torch.cat([confusions.flatten(), losses]).to(device)).cpu()
    confusions = sums[: confusions.numel()].reshape(confusions.shape)
    results = {}
    for i, path in enumerate(paths):
        try:
            scores = segmentation_scores(confusions[i])
        except ValueError:
            raise RuntimeError("evaluation split has no labelled pixel") from None
        pixels = scores.pop("pixels")
        results[path] = {**scores, "loss": float(sums[confusions.numel() + i]) / pixels}
    return results


@torch.no_grad()
def average_buffers(module: torch.nn.Module, world: int) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over ranks.

    DeepSpeed keeps gradients in sync but not buffers: each rank's BatchNorm tracks its own
    batches. Averaging them after every epoch makes every rank, the checkpoint and the
    exported deployment model evaluate identically. A collective: call on every rank.
    """
    if world == 1:
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            buffer.copy_(_all_reduce_sum(buffer.detach().clone()) / world)


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _full_state_dict(engine: Any, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0 (a collective under ZeRO-3: call on every rank)."""
    import deepspeed

    module = engine.module
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if zero_stage == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            state = (
                {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
                if rank == 0
                else None
            )
        return state
    if rank != 0:
        return None
    # clone: shared stages appear under two keys, and safetensors refuses shared memory.
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


def check_finite_weights(
    weights: Mapping[str, torch.Tensor] | None, epoch: int, step: int, device: torch.device
) -> None:
    """Raise on every rank when rank 0's gathered weights hold NaN or inf (a collective).

    Called before a checkpoint is written, so a diverged model is never reported: a finite
    loss can still come with non-finite gradients that reach the weights.
    """
    from osmd_ray.deploy import nonfinite_tensors

    bad = nonfinite_tensors(weights) if weights is not None else []
    flag = _all_reduce_max(torch.tensor([1.0 if bad else 0.0], device=device))
    if float(flag[0]) > 0:
        where = f": {', '.join(bad[:5])}" if bad else ""
        kept = f"the last checkpoint holds epoch {epoch}" if epoch else "none was written"
        raise NonFiniteLossError(
            f"non-finite weights after epoch {epoch + 1}, step {step}{where}. They were not "
            f"checkpointed ({kept}). Start a new run folder with a lower train.lr or "
            "train.grad_clip."
        )


_END = object()
"""Marks an exhausted batch iterator (``next(iterator, _END)``)."""


class PrefetchedBatches:
    """An epoch's batch iterator, started (and its first batch fetched) in a background thread.

    Ray Data starts a streaming split's execution when an epoch's first batch is requested;
    on a small machine that took seconds per epoch, most of the data wait in training
    (benchmarks/RESULTS.md, "Data wait in training"). Started while the worker builds the
    model and DeepSpeed (epoch 1) or validates and checkpoints (the next epochs), that
    start-up overlaps work the training steps do not wait for. The thread only pulls from
    the iterator; the training loop consumes it after :meth:`__iter__` joins the thread. An
    error in the thread is raised there, in the training loop.
    """

    def __init__(self, make_batches: Callable[[], Iterable[Any]]) -> None:
        self._iterator: Iterator[Any] | None = None
        self._first: Any = _END
        self._error: BaseException | None = None
        # Daemon: a worker that fails mid-epoch must not wait for a prefetch to finish.
        self._thread = threading.Thread(
            target=self._start, args=(make_batches,), name="osmd-prefetch", daemon=True
        )
        self._thread.start()

    def _start(self, make_batches: Callable[[], Iterable[Any]]) -> None:
        try:
            self._iterator = iter(make_batches())
            self._first = next(self._iterator, _END)
        except BaseException as err:  # re-raised in the consuming thread
            self._error = err

    def __iter__(self) -> Iterator[Any]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._first is _END:
            return
        yield self._first
        self._first = _END
        yield from self._iterator


class WaitTimer:
    """Iterates ``batches`` and adds up the time spent waiting for each next batch."""

    def __init__(self, batches: Iterable[Any]) -> None:
        self._batches = batches
        self.wait_s = 0.0
        self.first_wait_s = 0.0

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self._batches)
        first = True
        while True:
            started = time.perf_counter()
            batch = next(iterator, _END)
            waited = time.perf_counter() - started
            self.wait_s += waited
            if first:
                self.first_wait_s, first = waited, False
            if batch is _END:
                return
            yield batch


def _load_state(checkpoint_dir: str) -> dict[str, Any]:
    with open(os.path.join(checkpoint_dir, STATE_FILE), encoding="utf-8") as f:
        return json.load(f)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker.

    ``loop_config`` holds the resolved run config (``cfg``, a plain dict), the dataset
    manifest (``manifest_json``), the wandb settings (``wandb``, or None) and, for resume
    tests, ``stop_after_epoch``. The train/val/test datasets come from
    ``ray.train.get_dataset_shard``.
    """
    import ray.train
    import ray.train.torch

    cfg = config_from_dict(loop_config["cfg"])
    set_cpu_threads(cfg)
    manifest = Manifest.from_json(loop_config["manifest_json"], source="manifest")
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    say = _progress_reporter(loop_config.get("progress"))
    device = ray.train.torch.get_device()
    bf16 = uses_bf16(cfg)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    test_shard = ray.train.get_dataset_shard("test")
    eval_size = cfg.data.eval_batch_size

    def epoch_batches(epoch: int) -> PrefetchedBatches:
        """Epoch ``epoch``'s training batches, their pipeline started now in the background."""
        return PrefetchedBatches(
            lambda: train_shard.iter_torch_batches(
                batch_size=cfg.data.batch_size,
                drop_last=True,  # equal step counts on every rank, or DeepSpeed collectives hang
                local_shuffle_buffer_size=4 * cfg.data.batch_size,
                local_shuffle_seed=cfg.seed * 7919 + epoch * 31 + rank,
            )
        )

    with contextlib.ExitStack() as stack:
        # The checkpoint's folder stays open until DeepSpeed has loaded it, so a remote
        # checkpoint is downloaded once; its state says which epoch to prefetch.
        checkpoint = ray.train.get_checkpoint()
        checkpoint_dir = stack.enter_context(checkpoint.as_directory()) if checkpoint else None
        state = _load_state(checkpoint_dir) if checkpoint_dir else None
        start_epoch = state["epoch"] + 1 if state else 0
        pending = epoch_batches(start_epoch) if start_epoch < cfg.train.epochs else None

        # Imported after the prefetch started: importing DeepSpeed takes seconds.
        import deepspeed
        from safetensors.torch import save_file

        from osmd_ray.method.model import build_model
        from osmd_ray.train.deepspeed_setup import skip_cpu_shared_memory_op

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        # Same seed on every rank for the initial weights (DeepSpeed also broadcasts rank 0's).
        _seed_everything(cfg.seed)
        model = build_model(cfg, manifest)
        # One group per part, so a stage of a staged baseline can freeze parts (lr 0).
        parts, groups = part_parameter_groups(model)
        optimizer = build_optimizer(groups, cfg)
        stages = method_stages(cfg)
        skip_cpu_shared_memory_op()  # a 2-minute compile of an op training never calls
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lr_schedule(optimizer, cfg, manifest.num_rows("train") // world, parts),
            config=deepspeed_config(cfg, bf16),
        )
        step, history, train_time = 0, [], 0.0
        if state is not None:
            engine.load_checkpoint(checkpoint_dir, tag=CHECKPOINT_TAG)
            step, history, train_time = state["step"], state["history"], state["train_time_s"]
            if rank == 0:
                say(f"resumed from the checkpoint of epoch {start_epoch} (step {step})")

    tracker = None
    if rank == 0 and loop_config.get("wandb"):
        from osmd_ray.tracking import start_wandb

        tracker = start_wandb(loop_config["wandb"], cfg)

    for epoch in range(start_epoch, cfg.train.epochs):
        # Seeded per epoch and rank: a resumed run draws the same dropout and shuffles.
        _seed_everything(cfg.seed * 100_003 + epoch * 1009 + rank)
        stage = stage_at_epoch(stages, epoch)
        set_stage_modes(engine.module, stage)
        started = time.perf_counter()
        sums = torch.zeros(0)
        names: list[str] = []
        batches = 0
        timed = WaitTimer(pending)
        # The epoch's last batches (host memory), for the BatchNorm statistics after it;
        # every batch counts, skipped ones too, so all ranks run equally many forwards.
        recent: collections.deque[Any] = collections.deque(
            maxlen=cfg.train.bn_recalibration_batches
        )
        for raw in timed:
            recent.append(raw)
            batch = batch_to_device(raw, device)
            outputs = engine(batch)
            losses = batch_losses(
                outputs, batch, cfg, terms=stage.terms, ignore_index=manifest.ignore_index
            )
            bad = nonfinite_terms(losses, device)
            step += 1
            if bad:
                message = (
                    f"non-finite loss at epoch {epoch + 1}, step {step}: term(s) "
                    f"{', '.join(bad)} (values on rank {rank}: "
                    + ", ".join(f"{n}={float(losses[n]):.4g}" for n in bad)
                    + "). Lower train.lr, check the data with `osmd data check`, or set "
                    "train.nonfinite=skip to drop such steps."
                )
                if cfg.train.nonfinite == "skip":
                    if rank == 0:
                        say(f"skipped: {message}")
                    continue
                raise NonFiniteLossError(message)
            engine.backward(losses["total"])
            engine.step()
            if not names:
                names = sorted(losses)
                sums = torch.zeros(len(names), dtype=torch.float64)
            sums += torch.tensor([float(losses[n].detach()) for n in names], dtype=torch.float64)
            batches += 1
        epoch_time = time.perf_counter() - started
        # The next epoch's pipeline starts while this one validates and checkpoints.
        pending = epoch_batches(epoch + 1) if epoch + 1 < cfg.train.epochs else None
        recalibrate_batchnorm(
            engine.module, lambda raw: engine(batch_to_device(raw, device)), recent
        )
        recent.clear()
        average_buffers(engine.module, world)
        train_time += time.perf_counter() - started

        # Mean of every loss term over all ranks' steps; data wait and span summed.
        own = [float(batches), timed.wait_s, timed.first_wait_s, epoch_time]
        totals = _all_reduce_sum(
            torch.cat([sums, torch.tensor(own, dtype=torch.float64)]).to(device)
        ).cpu()
        n_steps = max(float(totals[-4]), 1.0)
        train_losses = {n: float(totals[i]) / n_steps for i, n in enumerate(names)}
        wait_s, first_wait_s, span_s = (float(v) for v in totals[-3:])
        data_wait = {
            "wait_s": wait_s / world,  # mean over ranks
            "first_batch_wait_s": first_wait_s / world,
            "span_s": span_s / world,  # the training part of the epoch, mean over ranks
            "share": wait_s / span_s if span_s > 0 else 0.0,
        }

        val = evaluate(
            engine, val_shard.iter_torch_batches(batch_size=eval_size), cfg.method, device, manifest
        )
        last = epoch + 1 == cfg.train.epochs
        # Test once, after the last epoch, and keep it in that epoch's checkpoint: Ray's
        # result carries the metrics of the latest checkpoint, and a rerun of a finished
        # run reads them back from there.
        test = (
            evaluate(
                engine,
                test_shard.iter_torch_batches(batch_size=eval_size),
                cfg.method,
                device,
                manifest,
            )
            if last
            else None
        )
        record = {
            "epoch": epoch + 1,
            "step": step,
            "epoch_time_s": epoch_time,
            "stage": stage.name,
            "train": {"loss": train_losses},
            "data_wait": data_wait,
            "val": val,
        }
        history.append(record)
        if rank == 0:
            val_text = "  ".join(
                f"val.{p}.{k}={m[k]:.3f}"
                for p, m in val.items()
                for k in ("accuracy", "miou")
                if k in m
            )
            total = train_losses.get("total", math.nan)
            stage_text = f" [{stage.name}]" if len(stages) > 1 else ""
            say(
                f"epoch {epoch + 1}/{cfg.train.epochs}{stage_text}  loss={total:.4f}  {val_text}  "
                f"({epoch_time:.1f}s, data wait {100 * data_wait['share']:.0f}%)"
            )
            if tracker is not None:
                tracker.log(
                    flatten_keys(
                        {"train": record["train"], "val": val, "data_wait": data_wait}, "/"
                    ),
                    step=epoch + 1,
                )
                if test is not None:
                    tracker.summary.update(flatten_keys({"test": test, "val": val}, "/"))

        weights = _full_state_dict(engine, cfg.train.zero_stage)
        check_finite_weights(weights, epoch, step, device)
        with tempfile.TemporaryDirectory(prefix="osmd-ckpt-") as checkpoint_dir:
            # Every rank writes its own DeepSpeed shards; Ray merges the folders.
            engine.save_checkpoint(checkpoint_dir, tag=CHECKPOINT_TAG)
            if rank == 0:
                state = {
                    "epoch": epoch,
                    "step": step,
                    "history": history,
                    "train_time_s": train_time,
                    "world_size": world,
                    "test": test,
                }
                with open(os.path.join(checkpoint_dir, STATE_FILE), "w", encoding="utf-8") as f:
                    json.dump(state, f, indent=1)
                save_file(weights, os.path.join(checkpoint_dir, WEIGHTS_FILE))
            # A barrier: every rank reports, equally often, never under a rank-0 guard.
            ray.train.report(
                {"epoch": epoch + 1, **flatten_keys({"val": val, "test": test or {}}, "/")},
                checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
            )
        if loop_config.get("stop_after_epoch") == epoch + 1:
            # Fault injection for resume tests: fail as a crash would, after the checkpoint.
            raise RuntimeError(f"stopped after epoch {epoch + 1} on request (stop_after_epoch)")

    if tracker is not None:
        tracker.finish()


def _progress_reporter(queue: Any) -> Any:
    """Progress lines go to the driver's queue (clean console), or to stdout without one."""

    from ray.exceptions import RayActorError

    def say(line: str) -> None:
        nonlocal queue
        if queue is not None:
            try:
                queue.put(line)
                return
            except RayActorError:
                # The queue went with its node or its driver: progress is not worth a
                # failed worker, so the lines go to the worker's log from here on.
                queue = None
        print(f"[osmd] {line}", flush=True)

    return say
