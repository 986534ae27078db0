"""Driver side of a training run: Ray, the TorchTrainer, fitting and the run's files (DESIGN §6).

Rerunning with the same ``out`` resumes from the last checkpoint; the folder's layout is
:mod:`osmd_ray.train.run_folder`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from osmd_ray import cluster, storage
from osmd_ray.config import (
    Config,
    check_against_manifest,
    config_to_dict,
)
from osmd_ray.data.checker import verify_dataset
from osmd_ray.data.schema import SPLITS, Manifest
from osmd_ray.errors import ConfigError, DataError, RunError
from osmd_ray.methods import check_config
from osmd_ray.train.datasets import in_memory_dataset, streamed_dataset
from osmd_ray.train.in_process import EpochHook, train_in_process_run
from osmd_ray.train.local import read_splits, split_columns
from osmd_ray.train.loop import (
    KEEP_SCORE,
    STATE_FILE,
    WEIGHTS_FILE,
    train_loop_per_worker,
    training_rows,
)
from osmd_ray.train.run_folder import (
    HISTORY_FILE,
    METRICS_FILE,
    export_from_checkpoint,
    finished_run_metrics,
    plot_history,
    prepare_run_dir,
    run_metrics,
    write_json,
)
from osmd_ray.train.tracking import wandb_settings


def check_resources(cfg: Config) -> None:
    """Refuse a GPU run that this machine's own Ray instance can never schedule.

    Ray would wait for the GPUs and end with a worker-group timeout from inside Ray Train; a
    local instance cannot grow, so say what is wrong at once. A cluster (RAY_ADDRESS) may
    autoscale, so it is left to Ray.
    """
    import ray

    if not cfg.scaling.use_gpu or os.environ.get("RAY_ADDRESS"):
        return
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus < cfg.scaling.num_workers:
        raise ConfigError(
            f"config key 'scaling.use_gpu' is true with scaling.num_workers="
            f"{cfg.scaling.num_workers}, but this machine's Ray instance has {gpus:g} GPU(s); "
            "set scaling.use_gpu=false, lower scaling.num_workers, or connect to a cluster "
            "with RAY_ADDRESS",
            "scaling.use_gpu",
        )


def build_trainer(
    cfg: Config,
    manifest: Manifest,
    run_dir: str,
    stop_after_epoch: int | None = None,
    progress: Any = None,
    callbacks: Sequence[Any] = (),
) -> Any:
    """The Ray Train V2 TorchTrainer of a run (rerunning with the same folder resumes).

    ``callbacks`` are Ray Train callbacks, e.g. Tune's TuneReportCallback in a sweep trial.
    """
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    if not os.environ.get("OSMD_VERBOSE"):
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = False
    # Deterministic assignment of blocks to workers, so a seed makes a run repeatable; and
    # every worker reads val/test in the same order, which loop.rank_share relies on.
    data_context.execution_options.preserve_order = True
    columns = ["label", *cfg.data.ordinary, *cfg.data.privileged]
    columns += [f"has_{m}" for m in cfg.data.privileged if m in manifest.optional_modalities]
    in_memory = (
        sum(shard.bytes for shards in manifest.splits.values() for shard in shards)
        <= cfg.data.in_memory_mb * 2**20
    )
    datasets = {
        split: (in_memory_dataset if in_memory else streamed_dataset)(cfg, manifest, split, columns)
        for split in ("val", "test")
    }
    # A data.train_rows subset is cut from the split read whole (in_memory_dataset).
    train_in_memory = in_memory or cfg.data.train_rows > 0
    datasets["train"] = (in_memory_dataset if train_in_memory else streamed_dataset)(
        cfg, manifest, "train", columns
    )
    loop_config = {
        "cfg": config_to_dict(cfg),
        "manifest_json": manifest.to_json(),
        # A compare run's folder is .../<dataset>/<variant>/seed<k>: name it by all three.
        "wandb": wandb_settings(cfg, run_dir, "/".join(Path(run_dir).parts[-3:])),
        "stop_after_epoch": stop_after_epoch,
        "progress": progress,
    }
    storage_fs, storage_path = storage.pyarrow_fs(storage.split(run_dir)[0])
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=storage.split(run_dir)[1],
            # None and a local folder, or a pyarrow S3 filesystem and bucket/prefix.
            storage_filesystem=storage_fs,
            storage_path=storage_path,
            # The deployable checkpoint outscores the rest (loop.keep_score): Ray keeps it
            # (with the runner-up) and the latest, whatever the run's length.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=KEEP_SCORE, checkpoint_score_order="max"
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=list(callbacks),
        ),
        datasets=datasets,
        # Only train is split (equally: equal step counts, a remainder of up to workers - 1
        # rows left out of each epoch). An equal split of val/test would drop their
        # remainder too, an unequal one gives ranks unequal forward counts (ZeRO-3 hangs):
        # so every worker reads val/test whole, in the same order, and scores every
        # world-th batch (loop.rank_share). That reads val/test once per worker, and in
        # return needs no coordination: every row counts exactly once.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


class ProgressPrinter:
    """Prints the lines rank 0 puts on a Ray queue while the trainer runs (any node)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.queue: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ProgressPrinter:
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # On the driver's node, not wherever Ray likes: a queue on a worker node dies with
        # that node, and the restarted workers' next put would then fail the whole run.
        driver_node = NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False
        )
        self.queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": driver_node})
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()
        return self

    def _drain(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                line = self.queue.get(timeout=0.5)
            except Empty:
                if self._stop.is_set():
                    return
                continue
            except Exception:  # the queue actor is gone: nothing more to print
                return
            print(f"{self.prefix}{line}", flush=True)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.queue.shutdown()


def train(
    cfg: Config,
    out: str,
    stop_after_epoch: int | None = None,
    callbacks: Sequence[Any] = (),
    data: InMemoryData | None = None,
    on_epoch: EpochHook | None = None,
) -> dict[str, Any]:
    """Train (or resume) one run into ``out`` and write its artifacts; returns metrics.json.

    ``scaling.num_workers: 0`` trains in this process (:mod:`osmd_ray.train.in_process`),
    any other count on that many Ray Train workers under DeepSpeed. ``stop_after_epoch``
    makes the run fail right after that epoch's checkpoint (for tests of resuming);
    rerunning without it continues from there. ``callbacks`` go to Ray Train (see
    build_trainer). In-process runs only: ``data``, the dataset's manifest and splits
    already read and checked (a sweep's or a compare's, shared by their runs), and
    ``on_epoch``, called after every epoch (a sweep trial's report to Tune).
    """
    method = check_config(cfg)
    storage.set_endpoint(cfg.storage.endpoint_url)
    # A missing bucket or refused credentials fail here in seconds, naming the bucket.
    storage.check_bucket(cfg.data.root, "the dataset, data.root")
    storage.check_bucket(out, "the run folder, --out")
    finished = finished_run_metrics(cfg, out)
    if finished is not None:
        # Rerunning a finished run (the same command again) trains nothing: neither the full
        # data check below nor Ray Train's controller, workers and DeepSpeed are needed.
        print(f"{out} already holds this finished run; nothing to train", flush=True)
        return finished
    manifest = data.manifest if data is not None else checked_dataset(cfg)
    check_against_manifest(cfg, manifest)
    if cfg.scaling.num_workers == 0:
        check_local_device(cfg)
        run_dir = prepare_run_dir(cfg, out)
        return train_in_process_run(
            cfg,
            run_dir,
            manifest,
            arrays=data.arrays if data is not None else None,
            on_epoch=on_epoch,
            say=None if on_epoch is not None else _printer(f"[osmd {cfg.method}] "),
            stop_after_epoch=stop_after_epoch,
        )
    cluster.ensure_ray(cfg.scaling.num_workers * cfg.scaling.cpus_per_worker, cfg.scaling.use_gpu)
    check_resources(cfg)
    run_dir = prepare_run_dir(cfg, out)
    started = time.perf_counter()
    with ProgressPrinter(prefix=f"[osmd {cfg.method}] ") as progress:
        result = fit_surviving_store_outages(
            lambda: build_trainer(
                cfg, manifest, run_dir, stop_after_epoch, progress.queue, callbacks=callbacks
            ),
            run_dir,
            cfg.train.max_failures,
        )
    wall = time.perf_counter() - started
    if result.checkpoint is None:
        raise RunError(f"training in {run_dir} ended without a checkpoint: {result.error}")
    with result.checkpoint.as_directory() as checkpoint_dir:
        with open(os.path.join(checkpoint_dir, STATE_FILE), encoding="utf-8") as f:
            state = json.load(f)
        if state.get("test") is None:
            raise RunError(f"training in {run_dir} stopped before its last epoch: {result.error}")
        # The final checkpoint holds the deployed epoch's weights (loop.train_loop_per_worker).
        export_from_checkpoint(cfg, manifest, os.path.join(checkpoint_dir, WEIGHTS_FILE), run_dir)
    history = state["history"]
    metrics = {
        "method": cfg.method,
        "seed": cfg.seed,
        **run_metrics(cfg, history, state.get("deployed_epoch") or len(history), state["test"]),
        # As counted by the evaluation (summed over ranks): every row of the split.
        # None: a checkpoint written before rows were counted.
        "rows": {"train": training_rows(cfg, manifest), **state["rows"]}
        if state.get("rows")
        else None,
        "train_time_s": state["train_time_s"],
        "wall_time_s": wall,
        "privileged_at_test": method.deploy.reads_privileged,
    }
    write_json(storage.join(run_dir, HISTORY_FILE), history)
    write_json(storage.join(run_dir, METRICS_FILE), metrics)
    plot_history(history, storage.join(run_dir, "plots", "history.png"))
    return metrics


@dataclass(frozen=True)
class InMemoryData:
    """A dataset read and checked once, for the in-process runs of a sweep or a compare."""

    manifest: Manifest
    arrays: dict[str, dict[str, np.ndarray]]
    """split -> column -> array (:func:`osmd_ray.train.local.read_splits`)."""


def checked_dataset(cfg: Config) -> Manifest:
    """The dataset's manifest after the full check (checksums, labels in range, no NaN or
    inf, no nulls): bad values would otherwise surface mid-run as a NaN loss, a torch
    IndexError or labels silently ignored. It reads every shard once (1.7 s for the 20 MB
    synthetic set)."""
    manifest = verify_dataset(cfg.data.root, deep=True)
    missing = [split for split in SPLITS if split not in manifest.splits]
    if missing:
        raise DataError(
            f"dataset {cfg.data.root}: training needs the splits {', '.join(SPLITS)}; "
            f"manifest.json has no {', '.join(missing)}"
        )
    return manifest


def read_in_memory(cfg: Config, also: Sequence[Config] = ()) -> InMemoryData:
    """The dataset of ``cfg``, checked and read into memory once: the columns ``cfg`` reads
    and those of the runs ``also`` (on the same dataset) that share the read."""
    manifest = checked_dataset(cfg)
    check_against_manifest(cfg, manifest)
    columns = list(dict.fromkeys(c for r in (cfg, *also) for c in split_columns(r, manifest)))
    return InMemoryData(manifest, read_splits(cfg, manifest, columns))


def check_local_device(cfg: Config) -> None:
    """An in-process run on a GPU needs one visible to this process."""
    import torch

    if cfg.scaling.use_gpu and not torch.cuda.is_available():
        raise ConfigError(
            "config key 'scaling.use_gpu' is true with scaling.num_workers=0 (in this "
            "process), but this process sees no CUDA GPU; set scaling.use_gpu=false or run "
            "where a GPU is visible",
            "scaling.use_gpu",
        )


def _printer(prefix: str) -> Callable[[str], None]:
    return lambda line: print(f"{prefix}{line}", flush=True)


def fit_surviving_store_outages(
    build: Callable[[], Any], run_dir: str, max_failures: int, wait_s: float = 300.0
) -> Any:
    """``build().fit()``, refitted after the object store failed under Ray Train's controller.

    Ray Train retries a worker's failed checkpoint upload (``train.max_failures``) but not
    its controller's own write of ``checkpoint_manager_snapshot.json``: a store outage at that
    moment ends the run with a ControllerError. Such an error (an OSError underneath, a remote
    run folder) counts against the same ``train.max_failures``: wait until the bucket answers
    again, then fit a new trainer on the same folder, which resumes from the last checkpoint
    in the snapshot (Ray writes the snapshot before it deletes old checkpoints).
    """
    import ray.train

    failures = 0
    while True:
        try:
            return build().fit()
        except ray.train.ControllerError as err:
            cause = getattr(err, "controller_failure", None)
            retry = max_failures == -1 or failures < max_failures
            if not (storage.is_remote(run_dir) and isinstance(cause, OSError) and retry):
                raise
            failures += 1
            limit = "unlimited" if max_failures == -1 else str(max_failures)
            print(
                f"the store under {run_dir} failed while Ray Train saved the run's state "
                f"({cause}); waiting up to {wait_s:.0f} s for it, then resuming from the last "
                f"checkpoint (store failure {failures} of {limit}, train.max_failures)",
                flush=True,
            )
            storage.wait_for_bucket(run_dir, "the run folder, --out", timeout_s=wait_s)
