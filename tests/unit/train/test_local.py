"""The in-process engine: the workers' epoch function in one process, reproducibly."""

from __future__ import annotations

import math

from osmd_ray.config import load_config
from osmd_ray.train.local import train_in_process


def test_same_config_same_figures_and_every_method_path_is_scored(configs_dir, tiny_synth):
    overrides = [f"data.root={tiny_synth}", "train.epochs=2", "model.width=4"]
    cfg = load_config(configs_dir / "osmd_synth.yaml", overrides)
    lines = []
    _, first = train_in_process(cfg, say=lines.append)
    _, again = train_in_process(cfg)
    first.pop("train_s"), again.pop("train_s")
    assert first == again
    assert first["metric"] == "accuracy" and 0.0 <= first["test_deploy"] <= 1.0
    assert "test_teacher" in first  # osmd evaluates its teacher path too
    assert len(lines) == 2 and lines[0].startswith("epoch 1/2 [joint]")


def test_labels_only_trains_without_reading_the_privileged_modality(configs_dir, tiny_synth):
    cfg = load_config(
        configs_dir / "osmd_synth.yaml",
        [f"data.root={tiny_synth}", "train.epochs=2", "method=labels_only", "data.privileged=[]"],
    )
    net, figures = train_in_process(cfg)
    assert figures["method"] == "labels_only" and "test_teacher" not in figures
    assert not math.isnan(figures["train_deploy"])
    assert "E_p" not in dict(net.named_children())
