"""`osmd compare` for real: 2 variants x 1 seed on a local Ray, then resuming it.

The grid over several seeds (summary means and deviations, gap closure) is checked in
tests/unit/test_compare.py with a fake train; here each run is a real one, so one seed (3, not
the config's 0, so that the seed visibly reaches the run) keeps the test to three trainings."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from osmd_ray.cli import main

pytestmark = pytest.mark.integration


def write_two_variant_spec(
    tmp_path: Path, configs_dir: Path, overrides: list[str], seeds: list[int]
) -> Path:
    """A compare spec of ordinary_only and osmd (the target) over ``seeds``, on the default
    config with ``overrides``."""
    spec = tmp_path / "spec.yaml"
    variants = [
        {"name": "ordinary_only", "overrides": ["method=ordinary_only"]},
        {"name": "osmd", "overrides": ["method=osmd"]},
    ]
    spec.write_text(
        yaml.safe_dump(
            {
                "base": str(configs_dir / "osmd_synth.yaml"),
                "overrides": overrides,
                "variants": variants,
                "seeds": seeds,
                "target": "osmd",
            }
        )
    )
    return spec


def test_tiny_compare_writes_checked_files_and_resumes(
    ray_local, tiny_synth, tmp_path, configs_dir, fast
):
    # One worker: what is tested is the grid around train(), and a run's start-up
    # (controller, workers, DeepSpeed) costs far more with two on 2 cores.
    spec = write_two_variant_spec(
        tmp_path, configs_dir, ["train.epochs=1", "scaling.num_workers=1"], seeds=[3]
    )
    out = tmp_path / "cmp"
    argv = ["compare", "--config", str(spec), "--out", str(out), *fast, f"data.root={tiny_synth}"]

    assert main(argv) == 0

    runs = out / "runs" / "tiny_synth"
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["variant"], r["seed"]) for r in rows) == [
        ("ordinary_only", "3"),
        ("osmd", "3"),
    ]
    for row in rows:
        metrics = json.loads(
            (runs / row["variant"] / f"seed{row['seed']}" / "metrics.json").read_text()
        )
        accuracy = float(row["test_deploy_accuracy"])
        assert 0.0 <= accuracy <= 1.0
        assert accuracy == pytest.approx(metrics["test"]["deploy"]["accuracy"], abs=1e-12)
        assert row["method"] == metrics["method"] == row["variant"]
        assert int(row["seed"]) == metrics["seed"]
        assert float(row["train_time_s"]) == pytest.approx(metrics["train_time_s"])
        assert int(row["deploy_params"]) > 0
        assert 0 < float(row["latency_ms_b1"]) and 0 < float(row["latency_ms_b64"])
        if row["variant"] == "osmd":  # osmd has a teacher path; ordinary_only has none
            assert float(row["test_teacher_accuracy"]) == pytest.approx(
                metrics["test"]["teacher"]["accuracy"], abs=1e-12
            )
        else:
            assert row["test_teacher_accuracy"] == ""
    summary = (out / "summary.md").read_text()
    assert "| ordinary_only | ordinary_only | 1 |" in summary
    assert "| osmd | osmd | 1 |" in summary
    assert "(target)" in summary
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The same command again trains nothing; a deleted run is trained again.
    finished = {p: p.stat().st_mtime_ns for p in runs.glob("*/seed*/metrics.json")}
    assert len(finished) == 2
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in finished} == finished

    shutil.rmtree(runs / "osmd" / "seed3")
    assert main(argv) == 0
    for path, mtime in finished.items():
        if "osmd/seed3" in str(path):
            assert path.exists()
        else:
            assert path.stat().st_mtime_ns == mtime, f"{path} was retrained"
    with open(out / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 2
    checkpoints = [d for d in os.listdir(runs / "osmd" / "seed3") if d.startswith("checkpoint_")]
    assert checkpoints, "the redone run left no checkpoint"
    assert Path(runs / "osmd" / "seed3" / "deploy" / "meta.json").exists()


def test_in_process_grid_reads_the_data_once_and_trains_each_run_in_a_ray_task(
    ray_local, tiny_synth, tmp_path, configs_dir, fast, monkeypatch, capsys
):
    """scaling.num_workers=0, as the shipped synthetic specs set it: 2 variants x 2 seeds.
    The driver checks and reads the dataset once; every run trains in a Ray task's process
    (runner.train in this process would fail), by default as many at once as the cores
    allow; a rerun trains nothing."""
    from osmd_ray.train import runner

    spec = write_two_variant_spec(
        tmp_path, configs_dir, ["train.epochs=1", "scaling.num_workers=0"], seeds=[0, 1]
    )
    reads = []
    real_read = runner.read_in_memory
    monkeypatch.setattr(
        runner,
        "read_in_memory",
        lambda cfg, **kw: reads.append(cfg.data.root) or real_read(cfg, **kw),
    )

    def not_here(*args, **kwargs):
        raise AssertionError("an in-process compare run trained in the driver")

    monkeypatch.setattr(runner, "train", not_here)  # Ray tasks import their own runner
    out = tmp_path / "cmp"
    argv = ["compare", "--config", str(spec), "--out", str(out), *fast, f"data.root={tiny_synth}"]

    assert main(argv) == 0

    printed = capsys.readouterr().out
    assert "4 runs: 0 finished earlier, 4 to train, up to " in printed
    assert reads == [tiny_synth]
    metrics_files = sorted((out / "runs" / "tiny_synth").glob("*/seed*/metrics.json"))
    assert [p.relative_to(out / "runs" / "tiny_synth").as_posix() for p in metrics_files] == [
        f"{variant}/seed{seed}/metrics.json"
        for variant in ("ordinary_only", "osmd")
        for seed in (0, 1)
    ]
    for path in metrics_files:
        metrics = json.loads(path.read_text())
        assert metrics["engine"] == "in_process" and metrics["epochs"] == 1
    assert (out / "summary.md").exists()
    with open(out / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 4

    finished = {p: p.stat().st_mtime_ns for p in metrics_files}
    assert main(argv) == 0
    assert "4 runs: 4 finished earlier, 0 to train" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    assert reads == [tiny_synth]  # nothing to train: nothing read again


def test_tune_gives_every_variant_the_same_sweep_and_trains_its_best_over_the_seeds(
    ray_local, tiny_synth, tmp_path, configs_dir, fast, capsys
):
    """--tune 2: each variant's own sweep of 2 trials (ordinary_only over train.lr, osmd over
    train.lr and its weighted loss terms), then every seed trains the best trial's values;
    a rerun reuses the tuning and trains nothing."""
    spec = write_two_variant_spec(
        tmp_path, configs_dir, ["train.epochs=2", "scaling.num_workers=0"], seeds=[0, 1]
    )
    out = tmp_path / "cmp"
    argv = ["compare", "--config", str(spec), "--out", str(out), "--tune", "2", *fast]
    argv.append(f"data.root={tiny_synth}")

    assert main(argv) == 0

    printed = capsys.readouterr().out
    assert "tuning tiny_synth/ordinary_only: 2 trials over train.lr\n" in printed
    assert "tuning tiny_synth/osmd: 2 trials over train.lr, loss.w_teacher" in printed
    for variant in ("ordinary_only", "osmd"):
        folder = out / "tune" / "tiny_synth" / variant
        with open(folder / "trials.csv", newline="") as f:
            assert len(list(csv.DictReader(f))) == 2  # the same budget for every variant
        choice = json.loads((folder / "tuned.json").read_text())
        lr = float(next(o for o in choice["overrides"] if o.startswith("train.lr=")).split("=")[1])
        assert 1e-3 / 3 <= lr <= 3e-3  # within the searched range around the untuned 1e-3
        for seed in (0, 1):
            run = yaml.safe_load(
                (out / "runs" / "tiny_synth" / variant / f"seed{seed}" / "config.yaml").read_text()
            )
            assert run["train"]["lr"] == pytest.approx(lr)  # every seed trains the best's values
            assert run["seed"] == seed
    summary = (out / "summary.md").read_text()
    assert "## Tuning" in summary and "2 trials of `osmd sweep`" in summary

    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "tuned earlier" in printed and "4 runs: 4 finished earlier, 0 to train" in printed
