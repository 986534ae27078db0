"""bf16 DeepSpeed training on a GPU worker; skipped without CUDA (run on a GPU node)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from osmd_ray.config import load_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.integration,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _gpu_run(configs_dir, fast, tiny_synth, run_dir, *overrides):
    """A 2-epoch GPU run of osmd_synth.yaml on the tiny set: its metrics and history."""
    from osmd_ray.train.runner import train

    cfg = load_config(
        configs_dir / "osmd_synth.yaml",
        [*fast, f"data.root={tiny_synth}", "train.epochs=2", "scaling.use_gpu=true", *overrides],
    )
    metrics = train(cfg, run_dir)
    with open(os.path.join(run_dir, "history.json")) as f:
        return metrics, json.load(f)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_bf16_zero_training_on_one_gpu(
    ray_local, tiny_synth, tmp_path, configs_dir, fast, zero_stage
):
    from osmd_ray import load_deploy
    from osmd_ray.data.reading import read_split_numpy

    run_dir = str(tmp_path / "run")
    metrics, history = _gpu_run(
        configs_dir,
        fast,
        tiny_synth,
        run_dir,
        f"train.zero_stage={zero_stage}",
        "scaling.num_workers=1",
    )
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(h["gpu_peak_memory_gib"] > 0 for h in history)
    # The export is fp32 and reproduces the workers' bf16 accuracy closely on CPU.
    model = load_deploy(os.path.join(run_dir, "deploy"))
    test = read_split_numpy(tiny_synth, "test", ["rgb", "label"])
    accuracy = float((model.predict({"rgb": test["rgb"]}) == test["label"]).mean())
    assert abs(accuracy - metrics["test"]["deploy"]["accuracy"]) < 0.1


def test_in_process_bf16_run_on_the_gpu(tiny_synth, tmp_path, configs_dir, fast):
    # The engine of sweep trials and compare runs (scaling.num_workers=0): bf16 autocast,
    # fp32 weights, its peak memory in the history.
    run_dir = str(tmp_path / "run")
    metrics, history = _gpu_run(configs_dir, fast, tiny_synth, run_dir, "scaling.num_workers=0")
    assert all(h["gpu_peak_memory_gib"] > 0 for h in history)
    assert 0.0 <= metrics["test"]["deploy"]["accuracy"] <= 1.0
