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


def test_bf16_runs_its_forwards_under_autocast_and_keeps_fp32_weights(
    configs_dir, tiny_synth, monkeypatch
):
    # train.precision=bf16 needs scaling.use_gpu; the run is moved to the CPU, whose
    # autocast runs bf16 too, so the precision handling is tested without a GPU.
    import torch

    from osmd_ray.data.schema import read_manifest
    from osmd_ray.train import local

    monkeypatch.setattr(local, "run_device", lambda cfg: torch.device("cpu"))
    overrides = [f"data.root={tiny_synth}", "model.width=4", "scaling.use_gpu=true"]
    cfg = load_config(configs_dir / "osmd_synth.yaml", [*overrides, "train.precision=bf16"])
    manifest = read_manifest(tiny_synth)
    run = local.LocalRun(cfg, manifest, local.load_splits(cfg, manifest))
    rows = {k: v[:8] for k, v in run.splits["train"].items()}
    assert run._forward(rows)["deploy_logits"].dtype == torch.bfloat16
    run.train_epoch()
    assert {p.dtype for p in run.net.parameters()} == {torch.float32}
    assert 0.0 <= run.score("val")["deploy"]["accuracy"] <= 1.0

    fp32 = load_config(configs_dir / "osmd_synth.yaml", [*overrides, "train.precision=fp32"])
    plain = local.LocalRun(fp32, manifest, local.load_splits(fp32, manifest))
    assert plain._forward(rows)["deploy_logits"].dtype == torch.float32
