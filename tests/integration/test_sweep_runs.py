"""`osmd sweep` end to end on a local Ray instance: in-process trials and trials that are Ray
Train runs, their epochs reported to Tune, a killed sweep resumed, and best.yaml reproducing
its trial."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import time
from pathlib import Path

import pytest
import yaml
from osmd_processes import REPO, end_session, ray_did_not_start, start_osmd
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table

from osmd_ray.config import load_config
from osmd_ray.experiments.sweep import load_sweep_spec, remove_recorded_placement_groups, run_sweep
from osmd_ray.train.runner import train

pytestmark = pytest.mark.integration


def write_spec(path: Path, data_root: str, fast: list[str], **changes) -> Path:
    spec = {
        "base": str(REPO / "configs" / "osmd_synth.yaml"),
        "overrides": [*fast, f"data.root={data_root}", "train.epochs=2"],
        "space": {
            "train.lr": {"loguniform": [3.0e-4, 3.0e-3]},
            "loss.w_recon": {"loguniform": [0.3, 30]},
        },
        "num_samples": 3,
        "max_concurrent_trials": 1,
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "search": {"algorithm": "optuna", "seed": 0},
        # One worker per trial: what is tested is Tune around Ray Train, and each run's
        # start-up (controller, workers, DeepSpeed) costs far more with two on 2 cores.
        "resources": {"num_workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0},
    }
    spec.update(changes)
    path.write_text(yaml.safe_dump(spec))
    return path


def read_trials(out: Path) -> list[dict[str, str]]:
    with open(out / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_a_killed_asha_sweep_resumes_and_best_yaml_reproduces_its_trial(
    ray_local, tiny_synth, tmp_path, fast, capsys
):
    """`osmd sweep` (its own local Ray) is SIGKILLed once its first trial has finished; the
    sweep continues (here in this process, on the session's Ray instance: the same run_sweep
    the command calls) without training that trial again; every trial is a real run whose
    epochs reached Tune, trials.csv lists each trial once, and best.yaml trains as is to the
    figure the sweep reported. One sweep serves both checks: each trial costs a Ray Train
    start-up, the bulk of this test's time."""
    # Selected on the validation loss (mode min): a continuous figure, so the trials differ
    # (a few steps on the tiny set barely move the accuracy) and reproducing it is a real check.
    spec_path = write_spec(
        tmp_path / "sweep.yaml", tiny_synth, fast, metric="val.deploy.loss", mode="min"
    )
    out = tmp_path / "sweep"
    finished = _kill_after_first_finished_trial(spec_path, out, tmp_path / "logs" / "killed.log")
    stamp = finished.stat().st_mtime_ns
    assert not (out / "trials.csv").exists()
    records = out / ".placement_groups"
    before = {p.name: {g.name for g in p.iterdir()} for p in records.iterdir()}

    capsys.readouterr()
    result = run_sweep(load_sweep_spec(spec_path), str(out))
    assert "continuing the sweep" in capsys.readouterr().out
    assert finished.stat().st_mtime_ns == stamp, "a finished trial was trained again"

    rows = read_trials(out)
    assert sorted(r["trial_id"] for r in rows) == sorted(p.name for p in (out / "trials").iterdir())
    assert len(rows) == 3 and len({r["trial_id"] for r in rows}) == 3
    for row in rows:
        # Each trial is a real run in its own folder, its epochs reported to Tune as they end.
        assert row["status"] in ("COMPLETED", "STOPPED_EARLY"), row
        epochs = int(row["epochs"])
        # ASHA may stop a trial at a rung on its last epoch too, before it exports.
        assert epochs == 2 if row["status"] == "COMPLETED" else epochs in (1, 2), row
        finished_run = (out / row["run_dir"] / "metrics.json").exists()
        assert finished_run == (row["status"] == "COMPLETED"), row
        assert 0.0 < float(row["final_metric"]) < 10.0
        assert (out / row["run_dir"] / "config.yaml").exists()
        if row["status"] == "COMPLETED":
            history = json.loads((out / row["run_dir"] / "history.json").read_text())
            assert [h["epoch"] for h in history] == [1, 2]
            assert float(row["final_metric"]) == pytest.approx(
                history[-1]["val"]["deploy"]["loss"], abs=1e-9
            )
            assert (out / row["run_dir"] / "deploy" / "meta.json").exists()
    assert next(r for r in rows if r["trial_id"] == finished.parent.name)["status"] == "COMPLETED"
    assert len({r["final_metric"] for r in rows}) == 3, "every trial reported the same figure"
    assert (out / "summary.png").stat().st_size > 1000
    assert result.best is not None and result.best["status"] == "COMPLETED"
    # The worker placement group of every trial that ran after the resume is gone once the
    # trial ended (stopped ones too); those before the kill died with the killed instance.
    after = {p.name: {g.name for g in p.iterdir()} for p in records.iterdir()}
    resumed = [pg for name, ids in after.items() for pg in ids - before.get(name, set())]
    assert len(after) == 3 and resumed
    for pg_id in resumed:
        group = PlacementGroup(ray_local.PlacementGroupID(bytes.fromhex(pg_id)))
        assert placement_group_table(group)["state"] == "REMOVED", pg_id

    # best.yaml trains as is, to the validation figure the sweep reported for its trial.
    best_cfg = load_config(out / "best.yaml")
    trial_cfg = load_config(out / result.best["run_dir"] / "config.yaml")
    assert best_cfg == trial_cfg
    metrics = train(best_cfg, str(tmp_path / "best_run"))
    # The figure its run deploys (its best epoch), by which the sweep ranked the trials.
    assert metrics["val"]["deploy"]["loss"] == pytest.approx(
        result.best["selected_metric"], abs=1e-6
    )
    assert result.best["selected_metric"] == min(
        float(r["deployed_metric"]) for r in rows if r["status"] == "COMPLETED"
    )


def test_an_in_process_sweep_resumes_after_a_kill_stops_trials_early_and_reproduces_best(
    ray_local, tiny_synth, tmp_path, fast, capsys
):
    """The default trial: one process per trial (resources.num_workers 0), the dataset read
    once. `osmd sweep` is SIGKILLed once its first trial has finished; continued here, it
    trains that trial no more; ASHA stops trials after their first epoch; every ended trial
    prints its line; and best.yaml, trained as is (in process too), gives its trial's figure."""
    spec_path = write_spec(
        tmp_path / "sweep.yaml",
        tiny_synth,
        [f for f in fast if not f.startswith("model.")],  # epochs long enough to kill between
        metric="val.deploy.loss",
        mode="min",
        num_samples=6,
        resources={"num_workers": 0, "cpus_per_worker": 1, "gpus_per_worker": 0},
    )
    out = tmp_path / "sweep"
    finished = _kill_after_first_finished_trial(spec_path, out, tmp_path / "logs" / "killed.log")
    stamp = finished.stat().st_mtime_ns
    assert not (out / "trials.csv").exists()
    assert not (out / ".placement_groups").exists()  # no worker groups, nothing to remove

    capsys.readouterr()
    result = run_sweep(load_sweep_spec(spec_path), str(out))
    printed = capsys.readouterr().out
    assert "continuing the sweep" in printed
    assert finished.stat().st_mtime_ns == stamp, "a finished trial was trained again"
    rows = read_trials(out)
    assert len(rows) == 6 and len({r["trial_id"] for r in rows}) == 6
    assert all(r["status"] in ("COMPLETED", "STOPPED_EARLY") for r in rows), rows
    assert any(r["status"] == "STOPPED_EARLY" and r["epochs"] == "1" for r in rows), rows
    # One line per trial that ended in this invocation: id, metric, epochs, status, seconds.
    lines = re.findall(r"\[sweep \d+/6\] (\w+)  val\.deploy\.loss=[0-9.]+  epochs=\d  \w+", printed)
    assert lines and set(lines) <= {r["trial_id"] for r in rows}
    for row in rows:
        assert (out / row["run_dir"] / "config.yaml").exists()
        completed = row["status"] == "COMPLETED"
        assert (out / row["run_dir"] / "metrics.json").exists() == completed, row
    # Trials that trained in this invocation were timed: wall, epochs, overhead (a trial that
    # finished before the kill only replayed its history, untimed).
    timed = [r for r in rows if not math.isnan(float(r["wall_s"]))]
    assert timed and {r["trial_id"] for r in timed} <= set(lines)
    for row in timed:
        assert float(row["wall_s"]) >= float(row["epochs_s"]) > 0, row
        assert float(row["overhead_s"]) == pytest.approx(
            float(row["wall_s"]) - float(row["epochs_s"]), abs=0.02
        )
    best_cfg = load_config(out / "best.yaml")
    assert best_cfg.scaling.num_workers == 0
    metrics = train(best_cfg, str(tmp_path / "best_run"))
    assert metrics["engine"] == "in_process"
    assert metrics["val"]["deploy"]["loss"] == pytest.approx(result.best["final_metric"], abs=1e-6)


def test_a_left_over_placement_group_is_removed(ray_local, tmp_path):
    """What the sweep does for a trial that ASHA stopped: its workers' placement group,
    recorded by the trial, is removed (Ray would keep it, and its CPUs, until the sweep ends)."""
    group = placement_group([{"CPU": 1}])
    ray_local.get(group.ready(), timeout=60)
    record = tmp_path / "trial"  # a folder of one empty file per group, named by its id
    record.mkdir()
    (record / group.id.hex()).touch()
    assert remove_recorded_placement_groups(str(record)) == 1
    assert placement_group_table(group)["state"] == "REMOVED"
    assert remove_recorded_placement_groups(str(record)) == 0  # already gone: nothing to do
    assert remove_recorded_placement_groups(str(tmp_path / "none")) == 0


def _kill_after_first_finished_trial(spec_path: Path, out: Path, log: Path) -> Path:
    """`osmd sweep` (its own local Ray) SIGKILLed once a trial has finished; returns that
    trial's metrics.json. A Ray start timing out on a loaded machine is retried once."""
    argv = ["sweep", "--config", str(spec_path), "--out", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    for attempt in range(2):
        proc = start_osmd(argv, env, log)
        try:
            finished = _wait_for_finished_trial(out, proc, log)
            if finished is not None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        finally:
            # Ray's processes outlive a SIGKILLed driver: waiting long for them only costs time.
            end_session(proc.pid, grace_s=2)
        if finished is not None:
            return finished
        assert attempt == 0, log.read_text()
    raise AssertionError("unreachable")


def _wait_for_finished_trial(out: Path, proc, log: Path) -> Path | None:
    """metrics.json of the first trial that finished, or None when Ray did not start."""
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        found = sorted((out / "trials").glob("*/metrics.json"))
        if found:
            return found[0]
        if proc.poll() is not None:
            if ray_did_not_start(log):
                return None
            pytest.fail(f"osmd sweep ended early ({proc.returncode}):\n{log.read_text()}")
        time.sleep(0.2)
    pytest.fail(f"no trial finished after 900 s:\n{log.read_text()}")
