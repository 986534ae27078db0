"""Driver side of a training run: Ray, the TorchTrainer, and the run folder (DESIGN §5, §6).

    <out>/config.yaml      the fully resolved config
    <out>/metrics.json     final metrics per split and path, e.g. test.deploy.accuracy
    <out>/history.json     one record per epoch
    <out>/checkpoint_*/    Ray-managed checkpoints (DeepSpeed shards of every rank)
    <out>/deploy/          the deployment model (safetensors + meta.json)
    <out>/plots/           training curves

Rerunning with the same ``out`` resumes from the last checkpoint. ``out`` may be an
``s3://bucket/prefix/run`` URI: the files above go through fsspec and the checkpoints through
Ray Train's ``storage_filesystem`` to the same store (osmd_ray.storage).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from osmd_ray import cluster, storage
from osmd_ray.config import (
    Config,
    check_against_manifest,
    config_to_dict,
    dump_yaml,
    save_config,
    saved_config_matches,
    saved_text_matches,
    validate,
)
from osmd_ray.data.checker import verify_dataset
from osmd_ray.data.reading import read_split, read_split_table
from osmd_ray.data.schema import SPLITS, Manifest
from osmd_ray.deploy import export_deploy
from osmd_ray.errors import ConfigError, DataError, RunError
from osmd_ray.figures import save_png
from osmd_ray.methods import build_model, check_config
from osmd_ray.train.loop import STATE_FILE, WEIGHTS_FILE, train_loop_per_worker
from osmd_ray.train.tracking import wandb_settings

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.json"


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


def prepare_run_dir(cfg: Config, out: str) -> str:
    """Create the run folder, or check that an existing one holds the same run (to resume)."""
    if storage.is_remote(out):
        return _prepare_remote_run_dir(cfg, out)
    run_dir = os.path.abspath(out)
    os.makedirs(run_dir, exist_ok=True)
    config_path = os.path.join(run_dir, CONFIG_FILE)
    same = saved_config_matches(config_path, cfg)
    if same is False:
        raise RunError(
            f"{run_dir} already holds a run with another configuration ({config_path}). "
            "Rerun with the same config and overrides to resume it, or choose another --out."
        )
    if same is None:
        save_config(cfg, config_path)
    return run_dir


def _prepare_remote_run_dir(cfg: Config, out: str) -> str:
    """prepare_run_dir for an object-store URI: an object store has no folders to create."""
    run_dir = storage.normalize(out)
    storage.check_bucket(run_dir, "the run folder, --out")
    config_path = storage.join(run_dir, CONFIG_FILE)
    saved = storage.read_text(config_path)
    if saved is not None and not saved_text_matches(saved, cfg):
        raise RunError(
            f"{run_dir} already holds a run with another configuration ({config_path}). "
            "Rerun with the same config and overrides to resume it, or choose another --out."
        )
    if saved is None:
        validate(cfg)
        storage.write_bytes(config_path, dump_yaml(cfg).encode("utf-8"))
    return run_dir


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
    # Deterministic assignment of blocks to workers, so a seed makes a run repeatable.
    data_context.execution_options.preserve_order = True
    columns = ["label", *cfg.data.ordinary, *cfg.data.privileged]
    columns += [f"has_{m}" for m in cfg.data.privileged if m in manifest.optional_modalities]
    in_memory = (
        sum(shard.bytes for shards in manifest.splits.values() for shard in shards)
        <= cfg.data.in_memory_mb * 2**20
    )
    datasets = {
        split: (in_memory_dataset if in_memory else streamed_dataset)(cfg, manifest, split, columns)
        for split in ("train", "val", "test")
    }
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
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=list(callbacks),
        ),
        # Every split is divided evenly across workers (equal row counts, so equal step
        # counts); val/test metrics are summed across ranks.
        datasets=datasets,
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


def streamed_dataset(cfg: Config, manifest: Manifest, split: str, columns: list[str]) -> Any:
    """A split streamed from storage by Ray Data read tasks, shards in seeded random order."""

    return read_split(
        cfg.data.root,
        split,
        columns,
        manifest=manifest,
        shuffle_files=split == "train",
        seed=cfg.seed,
    )


def in_memory_dataset(cfg: Config, manifest: Manifest, split: str, columns: list[str]) -> Any:
    """A small split read once by the driver into Ray's object store.

    Ray Data's read tasks cost seconds of start-up per read, more than a small dataset takes
    to train on. Rows are put in a seeded random order once and cut into blocks, so the even
    split across workers mixes the classes; workers shuffle within a window every epoch.
    """
    import numpy as np
    import ray.data

    table = read_split_table(cfg.data.root, split, columns, manifest=manifest)
    if split == "train":
        order = np.random.default_rng(cfg.seed).permutation(table.num_rows)
        table = table.take(order)
    rows_per_block = max(1, -(-table.num_rows // (8 * cfg.scaling.num_workers)))
    blocks = [table.slice(i, rows_per_block) for i in range(0, table.num_rows, rows_per_block)]
    # from_blocks computes each block's metadata here; from_arrow would run a Ray task per
    # block for it, which on a fresh instance starts worker processes (seconds per split).
    return ray.data.from_blocks(blocks)


def train(
    cfg: Config,
    out: str,
    stop_after_epoch: int | None = None,
    callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """Train (or resume) one run into ``out`` and write its artifacts; returns metrics.json.

    ``stop_after_epoch`` makes the workers fail right after that epoch's checkpoint (for
    tests of resuming); rerunning without it continues from there. ``callbacks`` go to Ray
    Train (see build_trainer).
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
    # The full check (checksums, labels in range, no NaN or inf, no nulls) before anything
    # starts: bad values would otherwise surface mid-run as a NaN loss, a torch IndexError or
    # labels silently ignored. It reads every shard once (1.7 s for the 20 MB synthetic set).
    manifest = verify_dataset(cfg.data.root, deep=True)
    missing = [split for split in SPLITS if split not in manifest.splits]
    if missing:
        raise DataError(
            f"dataset {cfg.data.root}: training needs the splits {', '.join(SPLITS)}; "
            f"manifest.json has no {', '.join(missing)}"
        )
    check_against_manifest(cfg, manifest)
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
        if state.get("test") is None or state["epoch"] + 1 != cfg.train.epochs:
            raise RunError(f"training in {run_dir} stopped before its last epoch: {result.error}")
        export_from_checkpoint(cfg, manifest, os.path.join(checkpoint_dir, WEIGHTS_FILE), run_dir)
    history = state["history"]
    metrics = {
        "method": cfg.method,
        "seed": cfg.seed,
        "test": state["test"],
        "val": history[-1]["val"],
        "train_time_s": state["train_time_s"],
        "epochs": len(history),
        "wall_time_s": wall,
        "privileged_at_test": method.deploy.reads_privileged,
    }
    _write_json(storage.join(run_dir, HISTORY_FILE), history)
    _write_json(storage.join(run_dir, METRICS_FILE), metrics)
    plot_history(history, storage.join(run_dir, "plots", "history.png"))
    return metrics


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


def finished_run_metrics(cfg: Config, out: str) -> dict[str, Any] | None:
    """metrics.json of ``out`` when it holds this very run, finished; else None.

    A run is finished once metrics.json exists: it is written after the deployment model.
    A folder with another configuration is not this run (prepare_run_dir refuses it).
    """
    run_dir = storage.normalize(out)
    saved = storage.read_text(storage.join(run_dir, CONFIG_FILE))
    if saved is None or not saved_text_matches(saved, cfg):
        return None
    metrics = storage.read_text(storage.join(run_dir, METRICS_FILE))
    return None if metrics is None else json.loads(metrics)


def export_from_checkpoint(cfg: Config, manifest: Manifest, weights: str, run_dir: str) -> None:
    """Rebuild the model from a checkpoint's consolidated weights and export deploy/."""
    from safetensors.torch import load_file

    model = build_model(cfg, manifest)
    model.load_state_dict(load_file(weights), strict=True)
    model.eval()
    if storage.is_remote(run_dir):
        # Export beside a temporary folder, then upload meta.json last: a reader that finds
        # meta.json finds the weights it describes (load_deploy checks their sha256 anyway).
        with tempfile.TemporaryDirectory(prefix="osmd-deploy-") as tmp:
            _export_model(cfg, manifest, model, os.path.join(tmp, "deploy"), run_dir)
            storage.upload_dir(
                os.path.join(tmp, "deploy"), storage.join(run_dir, "deploy"), last=("meta.json",)
            )
        return
    _export_model(cfg, manifest, model, os.path.join(run_dir, "deploy"), run_dir)


def _export_model(
    cfg: Config, manifest: Manifest, model: Any, deploy_dir: str, run_dir: str
) -> None:
    """Export ``model`` (built by build_model, weights loaded) to the local ``deploy_dir``."""

    roles = {
        "ordinary": [manifest.modalities[m] for m in cfg.data.ordinary],
        "privileged": [manifest.modalities[m] for m in cfg.data.privileged],
    }
    export_deploy(
        model,
        deploy_dir,
        method=cfg.method,
        ordinary=roles["ordinary"],
        privileged=roles["privileged"],
        num_classes=manifest.num_classes,
        model_cfg=cfg.model,
        normalization=manifest.normalization,
        task=manifest.task,
        class_names=manifest.class_names,
        extra_meta={"run": storage.split(run_dir)[1], "dataset": manifest.description},
    )


def plot_history(history: list[dict[str, Any]], path: str) -> None:
    """Training loss and validation accuracy per epoch."""
    from matplotlib.figure import Figure

    if not history:
        return
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(9, 3.5))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for term in history[0]["train"]["loss"]:
        ax_loss.plot(epochs, [h["train"]["loss"].get(term) for h in history], label=term)
    ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log")
    ax_loss.legend(fontsize=7)
    for path_name in history[0]["val"]:
        values = [h["val"][path_name]["accuracy"] for h in history]
        ax_acc.plot(epochs, values, marker="o", label=f"val {path_name}")
    ax_acc.set(xlabel="epoch", ylabel="accuracy")
    ax_acc.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)


def _write_json(path: str, payload: Any) -> None:
    """Write JSON so that an exception or a full disk leaves the previous file, never half of
    one, and no temporary file behind (storage.write_bytes: one PUT on an object store)."""
    storage.write_bytes(path, json.dumps(payload, indent=2).encode("utf-8"))
