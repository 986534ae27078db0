"""The run folder of one training run, and what goes into it (DESIGN §5).

    <out>/config.yaml      the fully resolved config
    <out>/metrics.json     final metrics per split and path, e.g. test.deploy.accuracy
    <out>/history.json     one record per epoch
    <out>/checkpoint_*/    Ray-managed checkpoints (DeepSpeed shards of every rank)
    <out>/deploy/          the deployment model (safetensors + meta.json)
    <out>/plots/           training curves

``out`` may be an ``s3://bucket/prefix/run`` URI: these files go through fsspec
(osmd_ray.storage), the checkpoints through Ray Train's ``storage_filesystem``.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from osmd_ray import storage
from osmd_ray.config import (
    Config,
    dump_yaml,
    save_config,
    saved_config_matches,
    saved_text_matches,
    validate,
)
from osmd_ray.data.schema import Manifest
from osmd_ray.deploy import export_deploy
from osmd_ray.errors import RunError
from osmd_ray.figures import save_png
from osmd_ray.methods import build_model

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.json"


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
    export_model(cfg, manifest, model, run_dir)


def export_model(cfg: Config, manifest: Manifest, model: Any, run_dir: str) -> None:
    """Export the trained ``model`` (a build_model network) to ``run_dir``/deploy/."""
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


def run_metrics(
    cfg: Config, history: list[dict[str, Any]], deployed: int, test: dict[str, Any]
) -> dict[str, Any]:
    """The part of metrics.json that says what the run trained and deployed: ``test`` and
    ``val`` of the deployed epoch, the epochs trained, the deployed one, and whether early
    stopping ended the run before train.epochs."""
    return {
        "test": test,
        "val": history[deployed - 1]["val"],
        "epochs": len(history),
        "deployed_epoch": deployed,
        "stopped_early": len(history) < cfg.train.epochs,
    }


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


def write_json(path: str, payload: Any) -> None:
    """Write JSON so that an exception or a full disk leaves the previous file, never half of
    one, and no temporary file behind (storage.write_bytes: one PUT on an object store)."""
    storage.write_bytes(path, json.dumps(payload, indent=2).encode("utf-8"))
