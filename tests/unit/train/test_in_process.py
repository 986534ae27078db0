"""`scaling.num_workers: 0`: `osmd train` in the calling process, with the run folder of a
worker run, resumable, and the figures of the in-process engine itself."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from osmd_ray.config import load_config
from osmd_ray.predict import predict_split
from osmd_ray.train.local import train_in_process
from osmd_ray.train.runner import read_in_memory, train


@pytest.fixture
def cfg(configs_dir, tiny_synth, fast):
    return load_config(
        configs_dir / "osmd_synth.yaml",
        [*fast, f"data.root={tiny_synth}", "train.epochs=3", "scaling.num_workers=0"],
    )


def _without_timings(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.endswith("_time_s")}


def test_a_run_in_process_writes_the_run_folder_and_scores_every_row(cfg, tmp_path):
    out = tmp_path / "run"
    metrics = train(cfg, str(out))
    assert metrics["engine"] == "in_process" and metrics["epochs"] == 3
    for name in ("config.yaml", "history.json", "metrics.json", "plots/history.png"):
        assert (out / name).exists(), name
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    # The deployed (best) epoch's validation figures, and what it trained.
    assert metrics["deployed_epoch"] in (1, 2, 3) and metrics["stopped_early"] is False
    assert history[metrics["deployed_epoch"] - 1]["val"] == metrics["val"]
    # The same loop as the in-process engine of `osmd lab`: the same figures.
    _, figures = train_in_process(cfg)
    assert metrics["test"]["deploy"]["accuracy"] == figures["test_deploy"]
    assert metrics["val"]["deploy"]["accuracy"] == figures["val_deploy"]
    # Every test row scored once: the exported deployment model gives the same accuracy.
    summary = predict_split(str(out / "deploy"), cfg.data.root, "test", str(tmp_path / "p.parquet"))
    rows = int(re.search(r"(\d+) rows", summary).group(1))
    assert metrics["rows"]["test"] == rows
    accuracy = float(re.search(r"accuracy[= ]+([0-9.]+)", summary).group(1))
    assert accuracy == pytest.approx(metrics["test"]["deploy"]["accuracy"], abs=1e-3)


def test_a_run_stopped_after_an_epoch_resumes_to_the_uninterrupted_figures(cfg, tmp_path):
    whole = train(cfg, str(tmp_path / "whole"))
    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="stopped after epoch 1"):
        train(cfg, str(out), stop_after_epoch=1)
    assert (out / "checkpoint" / "state.pt").exists() and not (out / "metrics.json").exists()
    seen = []
    resumed = train(cfg, str(out), on_epoch=lambda record, metrics: seen.append(record["epoch"]))
    assert seen == [2, 3]  # epoch 1 came from the checkpoint
    assert _without_timings(resumed) == _without_timings(whole)
    # A finished run trains nothing when run again.
    assert train(cfg, str(out)) == resumed


def test_shared_data_read_once_gives_the_same_run(cfg, tmp_path):
    """What a sweep or a compare hands its runs: the dataset checked and read once."""
    data = read_in_memory(cfg)
    assert set(data.arrays) == {"train", "val", "test"}
    shared = train(cfg, str(tmp_path / "shared"), data=data)
    alone = train(cfg, str(tmp_path / "alone"))
    assert _without_timings(shared) == _without_timings(alone)
    assert Path(tmp_path / "shared" / "deploy" / "meta.json").exists()
