"""The driver's run-folder logic that needs no Ray (osmd_ray.train.runner)."""

from __future__ import annotations

import json

import pytest

from osmd_ray.config import apply_overrides, load_config, save_config
from osmd_ray.train import runner


@pytest.fixture
def cfg(configs_dir, tiny_synth):
    return load_config(configs_dir / "osmd_synth.yaml", [f"data.root={tiny_synth}"])


def _finished_folder(cfg, path, metrics: dict) -> None:
    path.mkdir()
    save_config(cfg, str(path / runner.CONFIG_FILE))
    (path / runner.METRICS_FILE).write_text(json.dumps(metrics))


def test_finished_run_metrics_needs_the_same_config_and_metrics_json(cfg, tmp_path):
    metrics = {"test": {"deploy": {"accuracy": 0.5}}, "epochs": 10}
    _finished_folder(cfg, tmp_path / "done", metrics)
    assert runner.finished_run_metrics(cfg, str(tmp_path / "done")) == metrics
    # Another configuration in the folder is not this run.
    other = apply_overrides(cfg, ["seed=7"])
    assert runner.finished_run_metrics(other, str(tmp_path / "done")) is None
    # A started but unfinished run (config.yaml, no metrics.json), or no folder at all.
    (tmp_path / "done" / runner.METRICS_FILE).unlink()
    assert runner.finished_run_metrics(cfg, str(tmp_path / "done")) is None
    assert runner.finished_run_metrics(cfg, str(tmp_path / "missing")) is None


def test_rerunning_a_finished_run_returns_its_metrics_without_starting_ray(
    cfg, tmp_path, monkeypatch
):
    metrics = {"test": {"deploy": {"accuracy": 0.75}}, "epochs": 10}
    _finished_folder(cfg, tmp_path / "done", metrics)

    def no_ray(*_args, **_kwargs):
        raise AssertionError("a finished run started Ray")

    monkeypatch.setattr(runner, "ensure_ray", no_ray)
    monkeypatch.setattr(runner, "build_trainer", no_ray)
    assert runner.train(cfg, str(tmp_path / "done")) == metrics
