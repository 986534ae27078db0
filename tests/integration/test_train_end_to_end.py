"""A real training run on a local Ray instance: two CPU workers, gloo, DeepSpeed ZeRO-2."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from osmd_ray.cli import main
from osmd_ray.config import apply_overrides, load_config

pytestmark = pytest.mark.integration


def test_stopped_after_first_epoch_resumes_and_deploys(
    ray_local, tiny_synth, tmp_path, configs_dir, fast, plain_run
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
    for record in history:  # the loop's own account of the time spent waiting for data
        wait = record["data_wait"]
        assert 0.0 <= wait["first_batch_wait_s"] <= wait["wait_s"] <= wait["span_s"]
        assert 0.0 <= wait["share"] < 1.0
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
    test = read_split_numpy(tiny_synth, "test", ["rgb", "label", "sample_id"])
    predicted = model.predict({"rgb": test["rgb"]})
    accuracy = float((predicted == test["label"]).mean())
    assert accuracy == pytest.approx(metrics["test"]["deploy"]["accuracy"], abs=1e-9)

    # Rerunning a finished run trains nothing more and gives the same metrics.
    before = sorted(os.listdir(run_dir))
    again = train(cfg, run_dir)
    assert again == metrics
    assert sorted(os.listdir(run_dir)) == before, "rerunning a finished run wrote into it"

    # `osmd predict` writes the same predictions from the shards.
    preds_path = tmp_path / "preds.parquet"
    code = main(
        [
            "predict",
            "--model",
            os.path.join(run_dir, "deploy"),
            "--data",
            tiny_synth,
            "--split",
            "test",
            "--out",
            str(preds_path),
        ]
    )
    assert code == 0
    table = pq.read_table(preds_path).to_pydict()
    by_id = dict(zip(table["sample_id"], table["prediction"], strict=True))
    expected = dict(zip(test["sample_id"], predicted.tolist(), strict=True))
    assert by_id == expected

    # The same seed without the interruption gives the same run (repeatable, exact resume).
    # That run is the session's plain_run (trained once, also the reliability tests'
    # reference): it must be this config without wandb.
    assert plain_run.cfg == apply_overrides(cfg, ["tracking.wandb=false"])
    plain, plain_history = plain_run.metrics, plain_run.history
    for resumed, uninterrupted in zip(history, plain_history, strict=True):
        for part in ("train", "val"):
            assert _flat(resumed[part]) == pytest.approx(_flat(uninterrupted[part]), rel=1e-4)
    assert _flat(plain["test"]) == pytest.approx(_flat(metrics["test"]), rel=1e-4)


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def test_rerun_with_another_config_is_refused(ray_local, tiny_synth, tmp_path, configs_dir, fast):
    from osmd_ray.errors import RunError
    from osmd_ray.train.runner import prepare_run_dir

    base = load_config(configs_dir / "osmd_synth.yaml", [*fast, f"data.root={tiny_synth}"])
    prepare_run_dir(base, str(tmp_path / "run"))
    other = load_config(
        configs_dir / "osmd_synth.yaml", [*fast, f"data.root={tiny_synth}", "seed=5"]
    )
    with pytest.raises(RunError, match="another configuration"):
        prepare_run_dir(other, str(tmp_path / "run"))


def test_the_local_ray_instance_listens_on_loopback_only(ray_local):
    """Ray would use the machine's outward address for a local instance; nothing of ours may
    listen on (or talk to) anything but 127.0.0.1."""
    import psutil

    node = ray_local._private.worker.global_worker.node
    assert node.node_ip_address == "127.0.0.1"
    assert node.gcs_address.startswith("127.0.0.1:")
    servers = [
        p for p in psutil.Process().children(recursive=True) if p.name() in ("gcs_server", "raylet")
    ]
    assert {p.name() for p in servers} == {"gcs_server", "raylet"}
    listening = [
        c.laddr.ip
        for p in servers
        for c in p.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]
    assert listening, "found no listening socket of the GCS or the raylet"
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for ip in listening), listening
