"""Shared fixtures: a local Ray instance (two CPU workers fit) and tiny datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session, sized like `osmd train` sizes its own."""
    import ray

    from osmd_ray.config import Config
    from osmd_ray.train.runner import ensure_ray

    os.environ.pop("RAY_ADDRESS", None)
    ensure_ray(Config())
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory) -> str:
    """A small synthetic RGB-D classification set (the real generator, tiny sizes)."""
    from osmd_ray.data.cli import write_synth_dataset

    root = str(tmp_path_factory.mktemp("data") / "tiny_synth")
    write_synth_dataset(root, n_train=256, n_val=64, n_test=64, size=16, seed=0, progress=False)
    return root


@pytest.fixture
def configs_dir() -> Path:
    return CONFIGS


@pytest.fixture
def fast() -> list[str]:
    """Small, fast model settings for integration runs (the pipeline is what is tested)."""
    return FAST


FAST = [
    "model.width=8",
    "model.depth=2",
    "model.feature_dim=32",
    "data.batch_size=32",
    "data.eval_batch_size=64",
    "tracking.wandb=false",
]
