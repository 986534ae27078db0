"""The sweep spec, its checks against the base config, and the outputs (no Ray)."""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import pytest
import yaml

from osmd_ray.cli import main
from osmd_ray.config import load_config
from osmd_ray.errors import ConfigError, SweepSpecError
from osmd_ray.experiments.sweep import (
    base_config,
    check_space,
    format_value,
    load_sweep_spec,
    param_overrides,
    parse_sweep_spec,
    pick_best,
    write_outputs,
)

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "configs" / "sweep_synth.yaml"


def spec_data(**changes) -> dict:
    data = {
        "base": str(REPO / "configs" / "osmd_synth.yaml"),
        "space": {
            "loss.w_recon": {"loguniform": [0.3, 30]},
            "train.lr": {"uniform": [1e-4, 1e-3]},
            "model.depth": {"int": [2, 4]},
            "model.fusion": {"choice": ["ctn", "sum"]},
        },
    }
    data.update(changes)
    return data


def test_the_shipped_spec_loads_and_its_space_fits_the_base_config(tmp_path):
    spec = load_sweep_spec(SPEC)
    assert spec.num_samples == 64 and spec.scheduler == "asha" and spec.search == "optuna"
    assert spec.tune_metric == "val/deploy/accuracy"
    cfg = base_config(spec, str(tmp_path / "sweep"))
    assert cfg.train.epochs == 10
    # Each trial in its own process (no worker group), two at once on 2 cores.
    assert spec.in_process and cfg.scaling.num_workers == 0 and cfg.scaling.use_gpu is False
    assert spec.trial_resources() == {"CPU": 1.0, "GPU": 0.0}
    assert spec.max_concurrent_trials == 2
    assert cfg.tracking.group == "sweep"
    # Tune runs trials in their own working directories: the default relative root is made
    # absolute, or every trial would miss the dataset.
    assert cfg.data.root == str(Path("data/synth_cls").resolve())


def test_the_method_sweep_searches_every_part_of_the_method_the_comparisons_need(tmp_path):
    spec = load_sweep_spec(REPO / "configs" / "sweep_method.yaml")
    keys = {p.key for p in spec.space}
    weights = {"loss.w_teacher", "loss.w_priv", "loss.w_kd", "loss.w_recon", "loss.w_jan"}
    shape = {"model.hallucination_width", "model.hallucination_depth"}
    assert weights | shape | {"loss.jan_warmup_epochs", "loss.alignment"} <= keys
    assert {"model.fusion", "train.lr"} <= keys
    # Every bound and choice makes a valid trial config (an invalid one raises).
    check_space(spec, base_config(spec, str(tmp_path / "sweep")))
    assert spec.in_process and spec.scheduler == "asha" and spec.search == "optuna"


def test_defaults_of_an_omitted_section():
    spec = parse_sweep_spec(spec_data(), "s.yaml")
    assert (spec.metric, spec.mode, spec.num_samples) == ("val.deploy.accuracy", "max", 8)
    assert (spec.scheduler, spec.grace_period, spec.reduction_factor) == ("asha", 1, 3.0)
    assert (spec.search, spec.search_seed, spec.max_concurrent_trials) == ("optuna", 0, 1)
    assert [p.domain for p in spec.space] == ["loguniform", "uniform", "int", "choice"]
    # Trials in their own processes unless the spec asks for Ray Train workers.
    assert (spec.num_workers, spec.cpus_per_worker, spec.gpus_per_worker) == (0, 1.0, 0.0)


@pytest.mark.parametrize(
    "space, key, words",
    [
        ({"loss.w_nope": {"uniform": [0, 1]}}, "space.loss.w_nope", "loss.w_nope"),
        ({"train.lr": {"loguniform": [-1e-3, 1e-2]}}, "space.train.lr", "> 0"),
        ({"train.lr": {"loguniform": [0, 1e-2]}}, "space.train.lr", "> 0"),
        ({"model.fusion": {"choice": []}}, "space.model.fusion", "non-empty"),
        ({"model.fusion": {"choice": ["ctn", "ctn"]}}, "space.model.fusion", "more than once"),
        ({"model.fusion": {"choice": ["ctn", "blend"]}}, "space.model.fusion", "blend"),
        ({"train.lr": {"uniform": [1e-2, 1e-3]}}, "space.train.lr", "low < high"),
        ({"model.depth": {"int": [2.5, 4]}}, "space.model.depth", "integers"),
        ({"train.lr": {"lognormal": [1, 2]}}, "space.train.lr", "loguniform"),
        ({"train.lr": [1e-3, 1e-2]}, "space.train.lr", "one domain"),
        ({"tracking.group": {"choice": ["a"]}}, "space.tracking.group", "wandb group"),
        ({"scaling.num_workers": {"int": [1, 4]}}, "space.scaling.num_workers", "resources"),
        ({"train.epochs": {"int": [0, 3]}}, "space.train.epochs", "train.epochs"),
    ],
)
def test_an_invalid_space_names_the_key(tmp_path, space, key, words):
    """Rejected before any trial starts (no Ray is touched), naming the key."""
    with pytest.raises(SweepSpecError) as info:
        spec = parse_sweep_spec(spec_data(space=space), "s.yaml")
        base_config(spec, str(tmp_path / "sw"))
    assert info.value.key == key
    assert words in str(info.value)


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"space": {}}, "space"),
        ({"metric": "test.deploy.accuracy"}, "metric"),
        ({"mode": "maximum"}, "mode"),
        ({"num_samples": 0}, "num_samples"),
        ({"max_concurrent_trials": True}, "max_concurrent_trials"),
        ({"scheduler": {"type": "hyperband"}}, "scheduler.type"),
        ({"scheduler": {"type": "asha", "reduction_factor": 1}}, "scheduler.reduction_factor"),
        ({"scheduler": {"type": "asha", "grace": 1}}, "scheduler.grace"),
        ({"search": "bohb"}, "search.algorithm"),
        ({"search": {"algorithm": "random", "seed": -1}}, "search.seed"),
        ({"resources": {"num_workers": -1}}, "resources.num_workers"),
        ({"resources": {"num_workers": 1.5}}, "resources.num_workers"),
        ({"resources": {"gpus_per_worker": 1.5}}, "resources.gpus_per_worker"),
        # Ray Train workers take whole GPUs; fractions are for in-process trials.
        ({"resources": {"num_workers": 2, "gpus_per_worker": 0.5}}, "resources.gpus_per_worker"),
        ({"samples": 3}, "samples"),
        ({"base": "no_such.yaml"}, "base"),
    ],
)
def test_an_invalid_spec_names_the_key(changes, key):
    with pytest.raises(SweepSpecError) as info:
        parse_sweep_spec(spec_data(**changes), "s.yaml")
    assert info.value.key == key


def test_in_process_trials_can_share_a_gpu(tmp_path):
    """Four in-process trials on one GPU: Tune reserves a quarter each, and each trial's
    config asks for the GPU (scaling.use_gpu) in its own process (scaling.num_workers 0)."""
    spec = parse_sweep_spec(
        spec_data(resources={"num_workers": 0, "cpus_per_worker": 2, "gpus_per_worker": 0.25}),
        "s.yaml",
    )
    assert spec.in_process and spec.trial_resources() == {"CPU": 2.0, "GPU": 0.25}
    cfg = base_config(spec, str(tmp_path / "s"))
    assert cfg.scaling.num_workers == 0 and cfg.scaling.use_gpu is True
    assert cfg.scaling.cpus_per_worker == 2


def test_overrides_may_not_set_what_the_sweep_sets(tmp_path):
    spec = parse_sweep_spec(spec_data(), "s.yaml")
    with pytest.raises(ConfigError, match="searched"):
        base_config(spec, str(tmp_path / "s"), ["train.lr=0.1"])
    with pytest.raises(ConfigError, match="resources.num_workers"):
        base_config(spec, str(tmp_path / "s"), ["scaling.num_workers=4"])
    with pytest.raises(ConfigError, match="train.epochs"):
        base_config(spec, str(tmp_path / "s"), ["train.epochs=-2"])


def test_sampled_values_become_overrides_that_keep_their_precision():
    import numpy as np

    overrides = param_overrides(
        {"train.lr": np.float64(1.2345678901234e-05), "model.depth": np.int64(3), "x": True}
    )
    assert overrides == ["train.lr=1.2345678901234e-05", "model.depth=3", "x=true"]
    assert format_value(["rgb", "depth"]) == "[rgb, depth]"
    cfg = load_config(None, overrides[:2])
    assert cfg.train.lr == 1.2345678901234e-05 and cfg.model.depth == 3


def _row(trial, lr, final, status, epochs):
    return {
        "trial_id": trial,
        "param.train.lr": lr,
        "param.model.fusion": "sum",
        "final_metric": final,
        "best_metric": final,
        "deployed_metric": final if status == "COMPLETED" else math.nan,
        "epochs": epochs,
        "status": status,
        "error": "",
        "run_dir": f"trials/{trial}",
    }


def test_the_best_trial_is_the_best_that_completed_and_best_yaml_trains_as_is(tmp_path):
    data = spec_data(
        space={
            "train.lr": {"loguniform": [1e-4, 1e-2]},
            "model.fusion": {"choice": ["ctn", "sum"]},
        }
    )
    spec = parse_sweep_spec(data, "s.yaml")
    cfg = base_config(spec, str(tmp_path))
    rows = [
        _row("a", 1e-3, 0.70, "COMPLETED", 4),
        # Higher, but after one epoch only: its figure is not what best.yaml would train to.
        _row("b", 2e-3, 0.90, "STOPPED_EARLY", 1),
        _row("c", 3.5e-3, 0.80, "COMPLETED", 4),
        _row("d", 5e-3, math.nan, "ERROR", 0),
    ]
    best = pick_best(rows, spec, cfg)
    assert best["trial_id"] == "c"
    write_outputs(rows, best, spec, cfg, str(tmp_path))

    saved = load_config(tmp_path / "best.yaml")
    assert saved.train.lr == 3.5e-3 and saved.model.fusion == "sum"
    assert saved.train.epochs == cfg.train.epochs and saved.data.root == cfg.data.root
    assert "c, val.deploy.accuracy=0.8000" in (tmp_path / "best.yaml").read_text()
    with open(tmp_path / "trials.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["trial_id"] for r in table] == ["a", "b", "c", "d"]
    assert table[1]["status"] == "STOPPED_EARLY" and table[1]["epochs"] == "1"
    assert (tmp_path / "summary.png").stat().st_size > 1000


def test_min_mode_picks_the_lowest():
    spec = parse_sweep_spec(spec_data(metric="val.deploy.loss", mode="min"), "s.yaml")
    rows = [_row("a", 1e-3, 0.5, "COMPLETED", 4), _row("b", 1e-3, 0.3, "COMPLETED", 4)]
    assert pick_best(rows, spec, None)["trial_id"] == "b"


def test_the_cli_rejects_a_bad_space_with_exit_code_2_before_ray(tmp_path, capsys):
    data = spec_data(space={"loss.w_jan": {"loguniform": [-1, 1]}})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    code = main(["sweep", "--config", str(path), "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "space.loss.w_jan" in err and "> 0" in err
    assert not (tmp_path / "out").exists()


def test_resume_without_a_sweep_is_refused(tmp_path, capsys):
    code = main(["sweep", "--config", str(SPEC), "--out", str(tmp_path / "none"), "--resume"])
    assert code == 2
    assert "no sweep to continue" in capsys.readouterr().err


def test_an_object_store_output_that_does_not_answer_fails_in_seconds(monkeypatch, capsys):
    import socket

    with socket.socket() as sock:  # a loopback port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    started = time.monotonic()
    code = main(["sweep", "--config", str(SPEC), "--out", "s3://osmd-gone/sweep"])
    assert code == 2
    err = capsys.readouterr().err
    assert "bucket 'osmd-gone'" in err and "did not answer" in err, err
    assert time.monotonic() - started < 20


def test_the_shipped_gpu_spec_asks_for_gpu_workers(tmp_path):
    spec = load_sweep_spec(REPO / "configs" / "sweep_synth_gpu.yaml")
    assert spec.num_samples == 32 and spec.max_concurrent_trials == 8
    cfg = base_config(spec, str(tmp_path / "sweep"), ["data.root=/shared/data/synth_cls"])
    check_space(spec, cfg)
    assert cfg.scaling.use_gpu is True and cfg.scaling.num_workers == 2
    assert cfg.scaling.cpus_per_worker == 4 and cfg.train.epochs == 10
    assert cfg.data.root == "/shared/data/synth_cls"


def test_the_converged_method_sweep_searches_the_alignments_and_the_fusion_ablations(tmp_path):
    spec = load_sweep_spec(REPO / "configs" / "sweep_method_converged.yaml")
    choices = {p.key: set(p.values) for p in spec.space if p.domain == "choice"}
    assert choices["loss.alignment"] == {"jmmd", "mmd", "contrastive", "relational"}
    assert {0.0} < choices["loss.prediction_bandwidth"]
    for ablation in ("model.shared_translator", "model.share_fusion"):
        assert choices[ablation] == {True, False}, ablation
    assert "sum" in choices["model.fusion"] and 0.0 in choices["loss.w_jan"]
    cfg = base_config(spec, str(tmp_path / "sweep"))
    # Trials train to convergence: early stopping on, the best epoch deployed.
    assert cfg.train.early_stopping.patience > 0 and cfg.train.deploy_epoch == "best"
    check_space(spec, cfg)


def test_labels_only_control_gets_the_method_sweeps_budget_over_its_own_keys(tmp_path):
    """Issue 28's equal tuning budget: the control's sweep must match osmd's in trials,
    scheduler, search and training length, over the very domains of osmd's keys that change
    the network labels_only trains."""
    method = load_sweep_spec(REPO / "configs" / "sweep_method_converged.yaml")
    control = load_sweep_spec(REPO / "configs" / "sweep_labels_only_converged.yaml")
    budget = (
        "num_samples",
        "max_concurrent_trials",
        "scheduler",
        "grace_period",
        "reduction_factor",
        "search",
        "search_seed",
        "metric",
        "mode",
    )
    assert [getattr(control, k) for k in budget] == [getattr(method, k) for k in budget]
    method_space = {p.key: p for p in method.space}
    for param in control.space:
        assert param == method_space[param.key], param.key
    assert not [p.key for p in control.space if p.key.startswith("loss.")]
    cfg = base_config(control, str(tmp_path / "control"))
    osmd_cfg = base_config(method, str(tmp_path / "method"))
    assert cfg.method == "labels_only" and osmd_cfg.method == "osmd"
    assert cfg.train == osmd_cfg.train
