"""wandb tracking from rank 0 (DESIGN §5, issue 2 item 6).

Offline into the run folder by default, so nothing leaves the machine; online when
WANDB_API_KEY is set; WANDB_MODE (offline, online, disabled), when set, wins over both. The key
is read by wandb from the environment and never passed through a config, a log or the run
folder.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

from osmd_ray.config import Config


def wandb_settings(cfg: Config, run_dir: str, run_name: str) -> dict[str, Any] | None:
    """What rank 0 needs to start wandb, or None when tracking is off."""
    if not cfg.tracking.wandb:
        return None
    local_dir = run_dir if "://" not in run_dir else os.path.join(os.getcwd(), "wandb-offline")
    return {
        "project": cfg.tracking.project,
        "group": cfg.tracking.group or None,
        "name": run_name,
        "dir": local_dir,
        "mode": wandb_mode(),
    }


def wandb_mode() -> str:
    """WANDB_MODE when set, else online with an API key and offline without.

    wandb.init(mode=...) overrides the environment, so the mode handed to it must already
    honour WANDB_MODE: a key in the environment must not send a run online against an
    explicit WANDB_MODE=offline (CI, air-gapped clusters, tests).
    """
    explicit = os.environ.get("WANDB_MODE", "").strip()
    if explicit:
        return explicit
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def start_wandb(settings: dict[str, Any], cfg: Config) -> Any:
    """Start (or resume) the wandb run of a training run; returns the wandb Run."""
    import wandb

    os.makedirs(settings["dir"], exist_ok=True)
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(
        project=settings["project"],
        group=settings["group"],
        name=settings["name"],
        # A stable id per run folder name, so a resumed run continues the same wandb run.
        id=_run_id(settings["dir"], settings["name"]),
        resume="allow",
        dir=settings["dir"],
        mode=settings["mode"],
        config=asdict(cfg),
        settings=wandb.Settings(console="off", x_disable_stats=True),
    )


def _run_id(run_dir: str, name: str) -> str:
    import hashlib

    return hashlib.sha1(f"{os.path.abspath(run_dir)}|{name}".encode()).hexdigest()[:16]
