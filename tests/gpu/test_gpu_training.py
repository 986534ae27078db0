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


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_bf16_zero_training_on_one_gpu(
    ray_local, tiny_synth, tmp_path, configs_dir, fast, zero_stage
):
    from osmd_ray import load_deploy
    from osmd_ray.data.reading import read_split_numpy
    from osmd_ray.train.runner import train

    cfg = load_config(
        configs_dir / "osmd_synth.yaml",
        [
            *fast,
            f"data.root={tiny_synth}",
            "train.epochs=2",
            f"train.zero_stage={zero_stage}",
            "scaling.num_workers=1",
            "scaling.use_gpu=true",
        ],
    )
    run_dir = str(tmp_path / "run")
    metrics = train(cfg, run_dir)
    with open(os.path.join(run_dir, "history.json")) as f:
        assert [h["epoch"] for h in json.load(f)] == [1, 2]
    # The export is fp32 and reproduces the workers' bf16 accuracy closely on CPU.
    model = load_deploy(os.path.join(run_dir, "deploy"))
    test = read_split_numpy(tiny_synth, "test", ["rgb", "label"])
    accuracy = float((model.predict({"rgb": test["rgb"]}) == test["label"]).mean())
    assert abs(accuracy - metrics["test"]["deploy"]["accuracy"]) < 0.1
