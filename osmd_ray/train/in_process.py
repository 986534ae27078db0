"""A training run in the calling process (``scaling.num_workers: 0``): the run folder of
``osmd train`` from the in-process engine, without Ray Train's controller, workers or
DeepSpeed.

Ray Train V2 calls ``num_workers=0`` its local mode. In Ray 2.60 that mode keeps only the last
``report`` in memory: it persists no checkpoint, calls no Train callbacks (Tune's
``TuneReportCallback`` among them) and so cannot resume or feed a sweep. This module keeps
the convention and does those parts itself: one checkpoint per epoch in the run folder (the
latest only: all that resuming needs), the same history.json, metrics.json, deploy/ and
plots as a worker run, and an ``on_epoch`` hook through which a sweep trial reports to Tune.
The data can come in memory (``arrays``), read once by a sweep or a compare for all its runs.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from osmd_ray import storage
from osmd_ray.config import Config
from osmd_ray.data.schema import Manifest
from osmd_ray.train.epoch import peak_gpu_memory_gib
from osmd_ray.train.local import LocalRun, as_tensors, read_splits
from osmd_ray.train.loop import check_finite_weights, epoch_record, set_cpu_threads, show_epoch
from osmd_ray.train.run_folder import (
    HISTORY_FILE,
    METRICS_FILE,
    export_model,
    plot_history,
    run_metrics,
    write_json,
)
from osmd_ray.train.tracking import start_wandb, wandb_settings

CHECKPOINT_FILE = "checkpoint/state.pt"
"""The latest epoch's state, overwritten every epoch; a resumed run starts from it."""

EpochHook = Callable[[dict[str, Any], dict[str, Any] | None], None]
"""Called after every epoch with its history record and, after the last, metrics.json."""


def train_in_process_run(
    cfg: Config,
    run_dir: str,
    manifest: Manifest,
    *,
    arrays: dict[str, dict[str, np.ndarray]] | None = None,
    on_epoch: EpochHook | None = None,
    say: Callable[[str], None] | None = None,
    stop_after_epoch: int | None = None,
) -> dict[str, Any]:
    """Train (or resume) ``cfg`` into the prepared ``run_dir``; returns metrics.json.

    ``arrays``: every split in memory (:func:`~osmd_ray.train.local.read_splits`), else read
    here. ``stop_after_epoch`` fails the run after that epoch's checkpoint, as a crash
    would (for tests of resuming).
    """
    threads = torch.get_num_threads()
    set_cpu_threads(cfg)
    try:
        return _train(cfg, run_dir, manifest, arrays, on_epoch, say, stop_after_epoch)
    finally:
        torch.set_num_threads(threads)  # the calling process's own setting, back


def _train(
    cfg: Config,
    run_dir: str,
    manifest: Manifest,
    arrays: dict[str, dict[str, np.ndarray]] | None,
    on_epoch: EpochHook | None,
    say: Callable[[str], None] | None,
    stop_after_epoch: int | None,
) -> dict[str, Any]:
    started = time.perf_counter()
    run = LocalRun(cfg, manifest, as_tensors(arrays or read_splits(cfg, manifest)))
    history: list[dict[str, Any]] = []
    train_time = 0.0
    saved = storage.read_bytes(storage.join(run_dir, CHECKPOINT_FILE))
    if saved is not None:
        state = torch.load(io.BytesIO(saved), map_location=run.device, weights_only=False)
        run.load_state_dict(state["run"])
        history, train_time = state["history"], state["train_time_s"]
        if say is not None:
            say(f"resumed from the checkpoint of epoch {run.epoch} (step {run.global_step})")
    tracker = _tracker(cfg, run_dir)
    metrics = None
    while metrics is None:
        epoch_started = time.perf_counter()
        stage, totals = run.train_epoch(say)
        epoch_time = time.perf_counter() - epoch_started
        train_time += epoch_time
        steps = max(totals.batches, 1)
        losses = {n: float(totals.sums[i]) / steps for i, n in enumerate(totals.names)}
        # The data are in memory: no wait worth measuring, so the record says none.
        data_wait = {"wait_s": 0.0, "first_batch_wait_s": 0.0, "span_s": epoch_time, "share": 0.0}
        record = epoch_record(
            run.epoch - 1,
            run.global_step,
            epoch_time,
            stage,
            losses,
            data_wait,
            peak_gpu_memory_gib(run.device),
        )
        record["val"] = run.score("val")
        record["val_time_s"] = time.perf_counter() - epoch_started - epoch_time
        history.append(record)
        run.keep_if_deployed(history)
        last = run.stopping.ends(history)
        saving = time.perf_counter()  # the test pass counts as saving: once, after the last
        deployed = run.load_deployed(history) if last else 0
        test = run.score("test") if last else None
        if say is not None:
            show_epoch(record, test, cfg, len(run.stages), say, tracker)
        elif tracker is not None:
            show_epoch(record, test, cfg, len(run.stages), lambda line: None, tracker)
        if last:
            if say is not None:
                say(run.stopping.end_message(history, deployed))
            metrics = _finish(run, history, deployed, test, train_time, started, run_dir)
        else:
            _save_checkpoint(run, history, train_time, run_dir)
        record["save_time_s"] = time.perf_counter() - saving
        if on_epoch is not None:
            on_epoch(record, metrics)
        if stop_after_epoch == run.epoch:
            raise RuntimeError(f"stopped after epoch {run.epoch} on request (stop_after_epoch)")
    if tracker is not None:
        tracker.finish()
    return metrics


def _tracker(cfg: Config, run_dir: str) -> Any:
    settings = wandb_settings(cfg, run_dir, "/".join(Path(run_dir).parts[-3:]))
    return start_wandb(settings, cfg) if settings else None


def _save_checkpoint(
    run: LocalRun, history: list[dict[str, Any]], train_time: float, run_dir: str
) -> None:
    """The epoch's state, written whole or not at all (a diverged model never is)."""
    check_finite_weights(run.net.state_dict(), run.epoch - 1, run.global_step, run.device)
    buffer = io.BytesIO()
    torch.save({"run": run.state_dict(), "history": history, "train_time_s": train_time}, buffer)
    storage.write_bytes(storage.join(run_dir, CHECKPOINT_FILE), buffer.getvalue())


def _finish(
    run: LocalRun,
    history: list[dict[str, Any]],
    deployed: int,
    test: dict[str, Any],
    train_time: float,
    started: float,
    run_dir: str,
) -> dict[str, Any]:
    """The finished run's files: deploy/ (the weights of epoch ``deployed``, already in the
    network), history.json, plots, then metrics.json (which marks the run finished, so it
    comes last)."""
    cfg = run.cfg
    check_finite_weights(run.net.state_dict(), run.epoch - 1, run.global_step, run.device)
    export_model(cfg, run.manifest, run.net.cpu(), run_dir)
    metrics = {
        "method": cfg.method,
        "seed": cfg.seed,
        **run_metrics(cfg, history, deployed, test),
        "rows": {
            "train": run.rows,
            **{split: int(run.splits[split]["label"].shape[0]) for split in ("val", "test")},
        },
        "train_time_s": train_time,
        "wall_time_s": time.perf_counter() - started,
        "privileged_at_test": run.method.deploy.reads_privileged,
        "engine": "in_process",
    }
    write_json(storage.join(run_dir, HISTORY_FILE), history)
    plot_history(history, storage.join(run_dir, "plots", "history.png"))
    write_json(storage.join(run_dir, METRICS_FILE), metrics)
    return metrics
