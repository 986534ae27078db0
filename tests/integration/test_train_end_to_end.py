"""A real training run on a local Ray instance: two CPU workers, gloo, DeepSpeed ZeRO-2."""

from __future__ import annotations

import json
import os

import pytest

from osmd_ray.config import load_config

pytestmark = pytest.mark.integration


def test_stopped_after_first_epoch_resumes_and_deploys(
    ray_local, tiny_synth, tmp_path, configs_dir, fast
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
            "train.zero_stage=2",
            "scaling.num_workers=2",
            "tracking.wandb=true",
        ],
    )
    run_dir = str(tmp_path / "run")

    with pytest.raises(Exception, match="stopped after epoch 1"):
        train(cfg, run_dir, stop_after_epoch=1)
    checkpoints = [d for d in os.listdir(run_dir) if d.startswith("checkpoint_")]
    assert checkpoints, "the first epoch left no checkpoint"
    assert not os.path.exists(os.path.join(run_dir, "metrics.json"))

    metrics = train(cfg, run_dir)  # the same command again: resumes at epoch 2

    with open(os.path.join(run_dir, "history.json")) as f:
        history = json.load(f)
    assert [h["epoch"] for h in history] == [1, 2], "an epoch was skipped or run twice"
    with open(os.path.join(run_dir, "metrics.json")) as f:
        on_disk = json.load(f)
    for key in ("deploy", "teacher"):
        assert 0.0 <= on_disk["test"][key]["accuracy"] <= 1.0
    assert on_disk["val"]["deploy"]["accuracy"] == history[-1]["val"]["deploy"]["accuracy"]
    assert on_disk["train_time_s"] > 0
    assert os.path.exists(os.path.join(run_dir, "config.yaml"))
    assert os.path.exists(os.path.join(run_dir, "plots", "history.png"))
    wandb_dir = os.path.join(run_dir, "wandb")
    assert any(d.startswith("offline-run") for d in os.listdir(wandb_dir)), os.listdir(wandb_dir)

    # The exported model reproduces the workers' test accuracy from RGB alone.
    model = load_deploy(os.path.join(run_dir, "deploy"))
    assert [spec.name for spec in model.input_modalities] == ["rgb"]
    test = read_split_numpy(tiny_synth, "test", ["rgb", "label"])
    predicted = model.predict({"rgb": test["rgb"]})
    accuracy = float((predicted == test["label"]).mean())
    assert accuracy == pytest.approx(metrics["test"]["deploy"]["accuracy"], abs=1e-9)


def test_rerun_with_another_config_is_refused(ray_local, tiny_synth, tmp_path, configs_dir, fast):
    from osmd_ray.train.runner import RunError, prepare_run_dir

    base = load_config(configs_dir / "osmd_synth.yaml", [*fast, f"data.root={tiny_synth}"])
    prepare_run_dir(base, str(tmp_path / "run"))
    other = load_config(
        configs_dir / "osmd_synth.yaml", [*fast, f"data.root={tiny_synth}", "seed=5"]
    )
    with pytest.raises(RunError, match="another configuration"):
        prepare_run_dir(other, str(tmp_path / "run"))
