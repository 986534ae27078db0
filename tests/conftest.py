"""Shared fixtures: a local Ray instance (two CPU workers fit) and tiny datasets."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session, sized like `osmd train` sizes its own."""
    import ray

    from osmd_ray import cluster

    os.environ.pop("RAY_ADDRESS", None)
    cluster.ensure_ray(worker_cpus=2, use_gpu=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory) -> str:
    """A small synthetic RGB-D classification set (the real generator, tiny sizes)."""
    from osmd_ray.data.synth import write_synth_dataset

    root = str(tmp_path_factory.mktemp("data") / "tiny_synth")
    write_synth_dataset(root, n_train=256, n_val=64, n_test=64, size=16, seed=0, progress=False)
    return root


@dataclass(frozen=True)
class PlainRun:
    """An uninterrupted training run, shared by the tests that compare against one."""

    cfg: object  # its Config
    run_dir: str
    metrics: dict
    history: list


@pytest.fixture(scope="session")
def plain_run(ray_local, tiny_synth, tmp_path_factory) -> PlainRun:
    """Two workers, two epochs, ZeRO-2, no interruption: the reference that a resumed run
    (test_train_end_to_end) and a run whose worker was killed (test_reliability_runs) must
    equal. Trained once per session, not once per test (a 2-worker run costs a minute on 2
    cores); each user asserts that its own config is this one."""
    from osmd_ray.config import load_config
    from osmd_ray.train.runner import train

    cfg = load_config(
        CONFIGS / "osmd_synth.yaml",
        [*FAST, f"data.root={tiny_synth}", "train.epochs=2", "scaling.num_workers=2"],
    )
    run_dir = str(tmp_path_factory.mktemp("plain_run") / "run")
    metrics = train(cfg, run_dir)
    with open(os.path.join(run_dir, "history.json")) as f:
        history = json.load(f)
    return PlainRun(cfg, run_dir, metrics, history)


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


@pytest.fixture
def rgbd_batch():
    """A factory of random RGB-D batches of 8x8 images and their modality specs:
    ``rgbd_batch(rows, label_shape=())`` -> (rgb spec, depth spec, batch)."""
    import torch

    from osmd_ray.data.schema import ModalitySpec

    def make(rows: int, label_shape: tuple[int, ...] = ()) -> tuple:
        rgb = ModalitySpec("rgb", "image", (3, 8, 8), "uint8")
        depth = ModalitySpec("depth", "image", (1, 8, 8), "float32")
        gen = torch.Generator().manual_seed(0)
        batch = {
            "rgb": torch.randint(0, 256, (rows, 3, 8, 8), generator=gen).to(torch.uint8),
            "depth": torch.rand(rows, 1, 8, 8, generator=gen) * 4 + 1,
            "label": torch.randint(0, 3, (rows, *label_shape), generator=gen),
        }
        return rgb, depth, batch

    return make
