"""The training loop every Ray Train worker runs: one DeepSpeed rank per worker (DESIGN §6).

The epoch itself is :func:`osmd_ray.train.epoch.run_epoch`, which the in-process engine runs
too; this module adds what only the workers do: the DeepSpeed engine, the data shards and
their prefetch, resuming from and writing checkpoints, the sums over ranks, progress and
wandb. The driver side (building the trainer, writing the run folder) is in ``runner.py``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from osmd_ray.blocks.stages import (
    Stage,
    part_parameter_groups,
    recalibrate_batchnorm,
    stage_at_epoch,
)
from osmd_ray.config import Config, config_from_dict, flatten_keys
from osmd_ray.data.schema import Manifest
from osmd_ray.deploy import nonfinite_tensors
from osmd_ray.errors import NonFiniteLossError, RunError
from osmd_ray.methods import build_model, get_method
from osmd_ray.train.deepspeed_setup import skip_cpu_shared_memory_op
from osmd_ray.train.epoch import (
    Batch,
    EpochTotals,
    ForwardOnly,
    all_reduce_max,
    all_reduce_sum,
    batch_to_device,
    build_optimizer,
    evaluate_with_rows,
    lr_schedule,
    peak_gpu_memory_gib,
    run_epoch,
    seed_everything,
    uses_bf16,
)
from osmd_ray.train.stopping import StoppingRule
from osmd_ray.train.tracking import start_wandb

CHECKPOINT_TAG = "ds"
STATE_FILE = "state.json"
WEIGHTS_FILE = "model.safetensors"


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


def training_rows(cfg: Config, manifest: Manifest) -> int:
    """The rows a run trains on: data.train_rows, or the whole training split."""
    return cfg.data.train_rows or manifest.num_rows("train")


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
            buffer.copy_(all_reduce_sum(buffer.detach().clone()) / world)


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
    bad = nonfinite_tensors(weights) if weights is not None else []
    flag = all_reduce_max(torch.tensor([1.0 if bad else 0.0], device=device))
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


def rank_share(batches: Iterable[Batch], rank: int, world: int) -> Iterator[Batch]:
    """This rank's batches of a split that every rank reads whole, in the same order (the
    driver's DataContext preserves the order: runner.build_trainer).

    Batch b goes to rank b % world: disjoint shares that cover the split, so every row
    counts once over the ranks whatever the split's size. Each rank runs ceil(batches /
    world) forwards (ZeRO-3's forward is a collective: equal counts on every rank): a rank
    left one short runs the last batch's first row as a :class:`ForwardOnly` batch, run but
    not scored. Whole batches, not a slice of every batch: a worker holds eval_batch_size
    rows at a time, however many workers there are.
    """
    count, last = 0, None
    for count, batch in enumerate(batches, start=1):
        if (count - 1) % world == rank:
            yield batch
        last = batch
    short = count % world  # the ranks from this one on got one batch fewer
    if last is not None and short and rank >= short:
        yield ForwardOnly({k: v[:1] for k, v in last.items()})


KEEP_SCORE = "keep_score"
"""The reported metric Ray Train scores checkpoints by (runner.build_trainer)."""


def keep_score(stopping: StoppingRule, history: list[dict[str, Any]], deployed: int) -> int:
    """A checkpoint's score for Ray Train's retention: its epoch number when it holds the
    weights the run would deploy so far (a new best under train.early_stopping.min_delta,
    or the finished run's deployed weights), else 0. The deployable checkpoint then always
    outscores every other, and Ray keeps it beside the latest (which it always keeps) for
    :func:`load_reported_weights`; Ray's own ordering of raw scores would keep a slightly
    higher one that min_delta does not count as a new best."""
    if deployed or stopping.deployed(history) == len(history):
        return len(history)
    return 0


def load_reported_weights(engine: Any, epoch: int, zero_stage: int) -> None:
    """Load into ``engine`` the full weights of the checkpoint this run reported for
    ``epoch`` (1-based), from Ray Train's list of reported checkpoints. A collective under
    ZeRO-3: call on every rank."""
    import deepspeed
    import ray.train
    from safetensors.torch import load_file

    reported = [
        c for c in ray.train.get_all_reported_checkpoints() if c.metrics.get("epoch") == epoch
    ]
    if not reported:
        raise RunError(
            f"the checkpoint of epoch {epoch}, the run's best, is not among those Ray Train "
            "kept; rerun with train.deploy_epoch=last, or in a new run folder"
        )
    module = engine.module
    with reported[-1].checkpoint.as_directory() as checkpoint_dir:
        weights = load_file(os.path.join(checkpoint_dir, WEIGHTS_FILE))
    gathered = (
        deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0)
        if zero_stage == 3
        else contextlib.nullcontext()
    )
    with gathered:
        module.load_state_dict(weights, strict=True)


def _load_state(checkpoint_dir: str) -> dict[str, Any]:
    with open(os.path.join(checkpoint_dir, STATE_FILE), encoding="utf-8") as f:
        return json.load(f)


@dataclass
class _WorkerRun:
    """A worker's training state: the engine, and where the run stands."""

    engine: Any
    start_epoch: int
    step: int
    history: list[dict[str, Any]]
    train_time: float
    pending: PrefetchedBatches | None
    """The next epoch's batches, their pipeline already started."""
    rows: dict[str, int] = field(default_factory=dict)
    """The rows the latest evaluation of each split scored, summed over ranks."""


def _epoch_batches(cfg: Config, train_shard: Any, epoch: int, rank: int) -> PrefetchedBatches:
    """Epoch ``epoch``'s training batches, their pipeline started now in the background."""
    return PrefetchedBatches(
        lambda: train_shard.iter_torch_batches(
            batch_size=cfg.data.batch_size,
            drop_last=True,  # equal step counts on every rank, or DeepSpeed collectives hang
            local_shuffle_buffer_size=4 * cfg.data.batch_size,
            local_shuffle_seed=cfg.seed * 7919 + epoch * 31 + rank,
        )
    )


def _start(
    cfg: Config, manifest: Manifest, train_shard: Any, rank: int, world: int, say: Any
) -> _WorkerRun:
    """Build the model and its DeepSpeed engine, resumed from Ray's checkpoint if there is
    one, with the first epoch's batches prefetching meanwhile."""
    import ray.train

    with contextlib.ExitStack() as stack:
        # The checkpoint's folder stays open until DeepSpeed has loaded it, so a remote
        # checkpoint is downloaded once; its state says which epoch to prefetch.
        checkpoint = ray.train.get_checkpoint()
        checkpoint_dir = stack.enter_context(checkpoint.as_directory()) if checkpoint else None
        state = _load_state(checkpoint_dir) if checkpoint_dir else None
        start_epoch = state["epoch"] + 1 if state else 0
        if state is not None and state.get("test") is not None:
            start_epoch = cfg.train.epochs  # a finished run (it may have stopped early)
        pending = (
            _epoch_batches(cfg, train_shard, start_epoch, rank)
            if start_epoch < cfg.train.epochs
            else None
        )
        import deepspeed  # after the prefetch started: importing DeepSpeed takes seconds

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        # Same seed on every rank for the initial weights (DeepSpeed also broadcasts rank 0's).
        seed_everything(cfg.seed)
        model = build_model(cfg, manifest)
        # One group per part, so a stage of a staged method can freeze parts (lr 0).
        parts, groups = part_parameter_groups(model)
        optimizer = build_optimizer(groups, cfg)
        skip_cpu_shared_memory_op()  # a 2-minute compile of an op training never calls
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lr_schedule(optimizer, cfg, training_rows(cfg, manifest) // world, parts),
            config=deepspeed_config(cfg, uses_bf16(cfg)),
        )
        run = _WorkerRun(engine, start_epoch, 0, [], 0.0, pending)
        if state is not None:
            engine.load_checkpoint(checkpoint_dir, tag=CHECKPOINT_TAG)
            run.step, run.history = state["step"], state["history"]
            run.train_time = state["train_time_s"]
            if rank == 0:
                say(f"resumed from the checkpoint of epoch {start_epoch} (step {run.step})")
    return run


def _epoch_means(
    totals: EpochTotals, timed: WaitTimer, epoch_time: float, world: int, device: Any
) -> tuple[dict[str, float], dict[str, float]]:
    """Mean of every loss term over all ranks' steps; data wait and span over ranks."""
    own = [float(totals.batches), timed.wait_s, timed.first_wait_s, epoch_time]
    summed = all_reduce_sum(
        torch.cat([totals.sums, torch.tensor(own, dtype=torch.float64)]).to(device)
    ).cpu()
    n_steps = max(float(summed[-4]), 1.0)
    train_losses = {n: float(summed[i]) / n_steps for i, n in enumerate(totals.names)}
    wait_s, first_wait_s, span_s = (float(v) for v in summed[-3:])
    data_wait = {
        "wait_s": wait_s / world,  # mean over ranks
        "first_batch_wait_s": first_wait_s / world,
        "span_s": span_s / world,  # the training part of the epoch, mean over ranks
        "share": wait_s / span_s if span_s > 0 else 0.0,
    }
    return train_losses, data_wait


def show_epoch(
    record: dict[str, Any],
    test: dict[str, Any] | None,
    cfg: Config,
    stage_count: int,
    say: Any,
    tracker: Any,
) -> None:
    """Rank 0: the epoch's progress line, and its metrics to wandb."""
    val, data_wait = record["val"], record["data_wait"]
    val_text = "  ".join(
        f"val.{p}.{k}={m[k]:.3f}" for p, m in val.items() for k in ("accuracy", "miou") if k in m
    )
    total = record["train"]["loss"].get("total", math.nan)
    stage_text = f" [{record['stage']}]" if stage_count > 1 else ""
    say(
        f"epoch {record['epoch']}/{cfg.train.epochs}{stage_text}  loss={total:.4f}  {val_text}  "
        f"({record['epoch_time_s']:.1f}s, data wait {100 * data_wait['share']:.0f}%)"
    )
    if tracker is None:
        return
    tracker.log(
        flatten_keys({"train": record["train"], "val": val, "data_wait": data_wait}, "/"),
        step=record["epoch"],
    )
    if test is not None:
        tracker.summary.update(flatten_keys({"test": test, "val": val}, "/"))


def _checkpoint(
    run: _WorkerRun,
    epoch: int,
    test: Any,
    deployed: int,
    score: int,
    cfg: Config,
    device: Any,
    rank: int,
    world: int,
) -> None:
    """Write this epoch's checkpoint (every rank its DeepSpeed shards, rank 0 the state and
    the full weights) and report it with the epoch's metrics to Ray Train.

    ``deployed``: the epoch (1-based) whose weights the engine holds when that is the
    finished run's deployed epoch, else 0 (test is then None too); ``score``: the
    checkpoint's :func:`keep_score`."""
    import ray.train
    from safetensors.torch import save_file

    weights = _full_state_dict(run.engine, cfg.train.zero_stage)
    check_finite_weights(weights, epoch, run.step, device)
    val = run.history[-1]["val"]
    with tempfile.TemporaryDirectory(prefix="osmd-ckpt-") as checkpoint_dir:
        # Every rank writes its own DeepSpeed shards; Ray merges the folders.
        run.engine.save_checkpoint(checkpoint_dir, tag=CHECKPOINT_TAG)
        if rank == 0:
            state = {
                "epoch": epoch,
                "step": run.step,
                "history": run.history,
                "train_time_s": run.train_time,
                "world_size": world,
                "test": test,
                "deployed_epoch": deployed or None,
                "rows": run.rows,
            }
            with open(os.path.join(checkpoint_dir, STATE_FILE), "w", encoding="utf-8") as f:
                json.dump(state, f, indent=1)
            save_file(weights, os.path.join(checkpoint_dir, WEIGHTS_FILE))
        # A barrier: every rank reports, equally often, never under a rank-0 guard.
        ray.train.report(
            {
                "epoch": epoch + 1,
                "epochs_s": epochs_seconds(run.history),
                KEEP_SCORE: score,
                **flatten_keys({"val": val, "test": test or {}}, "/"),
            },
            checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
        )


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
    shards = {split: ray.train.get_dataset_shard(split) for split in ("train", "val", "test")}
    method = get_method(cfg.method)
    stages = method.stages(cfg)
    run = _start(cfg, manifest, shards["train"], rank, world, say)
    stopping = StoppingRule.of(cfg, stages, manifest.task)
    wandb = loop_config.get("wandb") if rank == 0 else None
    tracker = start_wandb(wandb, cfg) if wandb else None

    def evaluate_split(split: str) -> dict[str, dict[str, float]]:
        # Every rank reads the whole split (runner.build_trainer) and scores its share.
        batches = shards[split].iter_torch_batches(batch_size=cfg.data.eval_batch_size)
        scores, run.rows[split] = evaluate_with_rows(
            run.engine, rank_share(batches, rank, world), method.evaluates, device, manifest
        )
        return scores

    for epoch in range(run.start_epoch, cfg.train.epochs):
        # Seeded per epoch and rank: a resumed run draws the same dropout and shuffles.
        seed_everything(cfg.seed * 100_003 + epoch * 1009 + rank)
        stage = stage_at_epoch(stages, epoch)
        started = time.perf_counter()
        timed = WaitTimer(run.pending)
        totals = run_epoch(
            run.engine,
            run.engine.module,
            stage,
            timed,
            _deepspeed_step(run.engine),
            cfg,
            device=device,
            ignore_index=manifest.ignore_index,
            epoch=epoch,
            global_step=run.step,
            say=say,
            rank=rank,
        )
        run.step = totals.step
        epoch_time = time.perf_counter() - started
        # The next epoch's pipeline starts while this one validates and checkpoints (left
        # unread if early stopping ends the run after this epoch).
        budget_spent = epoch + 1 == cfg.train.epochs
        run.pending = (
            None if budget_spent else _epoch_batches(cfg, shards["train"], epoch + 1, rank)
        )
        recalibrate_batchnorm(
            run.engine.module,
            lambda raw, engine=run.engine: engine(batch_to_device(raw, device)),
            totals.recent,
        )
        totals.recent.clear()
        average_buffers(run.engine.module, world)
        run.train_time += time.perf_counter() - started
        train_losses, data_wait = _epoch_means(totals, timed, epoch_time, world, device)
        record = epoch_record(
            epoch,
            run.step,
            epoch_time,
            stage,
            train_losses,
            data_wait,
            peak_gpu_memory_gib(device),
        )
        validating = time.perf_counter()
        record["val"] = evaluate_split("val")
        record["val_time_s"] = time.perf_counter() - validating
        run.history.append(record)
        # Every rank decides alike: the validation scores are sums over ranks.
        last = stopping.ends(run.history)
        deployed = stopping.deployed(run.history) if last else 0
        if deployed and deployed != epoch + 1:
            # A diverged last epoch stops the run, as it would without the swap below.
            weights = _full_state_dict(run.engine, cfg.train.zero_stage)
            check_finite_weights(weights, epoch, run.step, device)
            load_reported_weights(run.engine, deployed, cfg.train.zero_stage)
        # Test once, on the deployed weights, and keep it in the last checkpoint: Ray's
        # result carries the metrics of the latest checkpoint, and a rerun of a finished
        # run reads them back from there.
        test = evaluate_split("test") if last else None
        if rank == 0:
            show_epoch(record, test, cfg, len(stages), say, tracker)
        score = keep_score(stopping, run.history, deployed)
        _checkpoint(run, epoch, test, deployed, score, cfg, device, rank, world)
        if loop_config.get("stop_after_epoch") == epoch + 1:
            # Fault injection for resume tests: fail as a crash would, after the checkpoint.
            raise RuntimeError(f"stopped after epoch {epoch + 1} on request (stop_after_epoch)")
        if last:
            if rank == 0:
                say(stopping.end_message(run.history, deployed))
            break

    if tracker is not None:
        tracker.finish()


TIMING_KEYS = ("epoch_time_s", "val_time_s", "save_time_s", "data_wait", "gpu_peak_memory_gib")
"""The keys of a history.json entry that measure the machine (time, and memory on a GPU),
not the computation: they differ between two runs of the same config (a resumed run is
compared to an uninterrupted one without them)."""


def epoch_record(
    epoch: int,
    step: int,
    epoch_time: float,
    stage: Stage,
    train_losses: dict[str, float],
    data_wait: dict[str, float],
    gpu_peak_memory_gib: float | None = None,
) -> dict[str, Any]:
    """One entry of history.json (``val`` is added once the epoch is evaluated); on a GPU
    also the peak memory so far (:func:`~osmd_ray.train.epoch.peak_gpu_memory_gib`)."""
    record = {
        "epoch": epoch + 1,
        "step": step,
        "epoch_time_s": epoch_time,
        "stage": stage.name,
        "train": {"loss": train_losses},
        "data_wait": data_wait,
    }
    if gpu_peak_memory_gib is not None:
        record["gpu_peak_memory_gib"] = gpu_peak_memory_gib
    return record


def epochs_seconds(history: list[dict[str, Any]]) -> float:
    """The seconds a run's epochs took so far: their training steps and validation (what a
    sweep counts as a trial's work; the rest of its wall time is overhead)."""
    return sum(h["epoch_time_s"] + h.get("val_time_s", 0.0) for h in history)


def _deepspeed_step(engine: Any) -> Callable[[torch.Tensor], None]:
    """A training step under DeepSpeed: its backward, then its step (which clips the
    gradients, steps the optimiser and the schedule, and under ZeRO syncs the shards)."""

    def step(total: torch.Tensor) -> None:
        engine.backward(total)
        engine.step()

    return step


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
