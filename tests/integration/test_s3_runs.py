"""Datasets, runs, checkpoints and results on S3: a real S3-protocol server on loopback
(moto in server mode, fixtures in conftest.py), never a mock of the client (issue 6)."""

from __future__ import annotations

import json
import os
import time

import pyarrow.parquet as pq
import pytest

from osmd_ray.cli import main
from osmd_ray.config import load_config

pytestmark = pytest.mark.integration

TINY = {"n_train": 256, "n_val": 64, "n_test": 64, "size": 16, "seed": 0, "progress": False}


def _fs():
    from osmd_ray import storage

    return storage.filesystem("s3://any")


def _tiny_dataset(bucket: str) -> str:
    """The TINY synthetic set written to ``bucket``; its URI."""
    from osmd_ray.data.synth import write_synth_dataset

    data = f"{bucket}/data/tiny"
    write_synth_dataset(data, **TINY)
    return data


def _read_json(uri: str):
    return json.loads(_fs().cat_file(uri))


def test_synth_check_train_resume_and_predict_on_s3(
    s3_bucket, ray_s3, configs_dir, fast, tmp_path, capsys, monkeypatch
):
    """The README's path on S3: synth to S3, check, train from S3 with checkpoints on S3,
    interrupted and resumed from the S3 checkpoint, then predict from the model on S3."""
    from osmd_ray.data.synth import write_synth_dataset
    from osmd_ray.train.runner import train

    monkeypatch.chdir(tmp_path)  # any local leftovers would land here, where we look
    data = f"{s3_bucket}/data/tiny"
    write_synth_dataset(data, **TINY)
    assert main(["data", "check", data]) == 0, capsys.readouterr().err

    cfg = load_config(
        configs_dir / "osmd_synth.yaml",
        # One worker: what is tested is storage on S3; two ranks are the end-to-end test's.
        [*fast, f"data.root={data}", "train.epochs=2", "scaling.num_workers=1"],
    )
    run = f"{s3_bucket}/runs/a"
    with pytest.raises(Exception, match="stopped after epoch 1"):
        train(cfg, run, stop_after_epoch=1)
    fs = _fs()
    listed = [os.path.basename(p) for p in fs.ls(run, refresh=True)]
    assert any(name.startswith("checkpoint_") for name in listed), listed
    assert "metrics.json" not in listed

    metrics = train(cfg, run)  # the same command again: resumes from the S3 checkpoint
    assert "resumed from the checkpoint of epoch 1" in capsys.readouterr().out

    history = _read_json(f"{run}/history.json")
    assert [h["epoch"] for h in history] == [1, 2], "an epoch was skipped or run twice"
    assert _read_json(f"{run}/metrics.json")["test"] == metrics["test"]
    for name in ("config.yaml", "plots/history.png", "deploy/meta.json"):
        assert fs.exists(f"{run}/{name}"), name
    # Nothing of the run landed in a local folder, and no credential was written anywhere.
    assert not os.path.exists(tmp_path / "s3:"), os.listdir(tmp_path)
    for key in fs.find(run):
        if key.endswith((".yaml", ".json")):
            assert "testing" not in fs.cat_file(key).decode(), key

    preds = f"{s3_bucket}/preds/test.parquet"
    code = main(["predict", "--model", f"{run}/deploy", "--data", data, "--out", preds])
    assert code == 0, capsys.readouterr().err
    with fs.open(preds, "rb") as f:
        table = pq.read_table(f)
    assert table.num_rows == TINY["n_test"]
    accuracy = (table["prediction"].to_numpy() == table["label"].to_numpy()).mean()
    assert accuracy == pytest.approx(metrics["test"]["deploy"]["accuracy"], abs=1e-9)


def test_missing_bucket_fails_in_seconds_naming_it(s3_server, tmp_path, configs_dir, capsys):
    started = time.monotonic()
    code = main(
        ["train", "--config", str(configs_dir / "osmd_synth.yaml"), "--out", "s3://no-such-bkt/r"]
        + ["data.root=s3://no-such-bkt/data", "tracking.wandb=false"]
    )
    err = capsys.readouterr().err
    assert code != 0
    assert "bucket 'no-such-bkt'" in err and "does not exist" in err, err
    assert time.monotonic() - started < 20


def test_refused_credentials_fail_in_seconds_naming_the_bucket(
    auth_s3_endpoint, s3_server, monkeypatch, capsys
):
    monkeypatch.setenv("AWS_ENDPOINT_URL", auth_s3_endpoint)
    started = time.monotonic()
    code = main(["data", "check", "s3://osmd-private/data"])
    err = capsys.readouterr().err
    assert code == 2
    assert "bucket 'osmd-private'" in err and "credentials" in err, err
    assert time.monotonic() - started < 20


def test_truncated_and_foreign_objects_are_named_by_check_and_refused_by_training(
    s3_bucket, configs_dir, fast, capsys
):
    import pyarrow as pa

    from osmd_ray.data.synth import write_synth_dataset
    from osmd_ray.errors import DataError
    from osmd_ray.train.runner import train

    data = f"{s3_bucket}/data/damaged"
    write_synth_dataset(data, **TINY)
    fs = _fs()
    shard = f"{data}/train/part-00000.parquet"
    fs.pipe_file(shard, fs.cat_file(shard)[:-100])  # an upload cut short
    with fs.open(f"{data}/val/part-foreign.parquet", "wb") as f:  # someone else's file
        pq.write_table(pa.table({"x": [1.0, 2.0]}), f)

    assert main(["data", "check", data]) == 1
    out = capsys.readouterr().out
    assert "train/part-00000.parquet" in out and "truncated" in out, out
    assert "val/part-foreign.parquet: not in manifest" in out, out

    cfg = load_config(configs_dir / "osmd_synth.yaml", [*fast, f"data.root={data}"])
    with pytest.raises(DataError) as info:
        train(cfg, f"{s3_bucket}/runs/refused")
    assert "train/part-00000.parquet" in str(info.value)
    assert "val/part-foreign.parquet" in str(info.value)
    assert not fs.exists(f"{s3_bucket}/runs/refused"), "training started on damaged data"


def test_compare_writes_runs_and_results_to_s3_and_resumes(
    s3_bucket, ray_s3, configs_dir, fast, tmp_path, capsys
):
    import csv
    import io

    import yaml

    data = _tiny_dataset(s3_bucket)
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "base": str(configs_dir / "osmd_synth.yaml"),
                "overrides": ["train.epochs=1", "scaling.num_workers=1"],
                # One run: what is tested here is the grid's I/O on S3 and its resume there;
                # the grid itself is tests/integration/test_compare_runs.py's subject.
                "variants": [{"name": "osmd", "overrides": ["method=osmd"]}],
                "seeds": 1,
            }
        )
    )
    out = f"{s3_bucket}/compare"
    argv = ["compare", "--config", str(spec), "--out", out, *fast, f"data.root={data}"]
    assert main(argv) == 0, capsys.readouterr().err

    fs = _fs()
    rows = list(csv.DictReader(io.StringIO(fs.cat_file(f"{out}/results.csv").decode())))
    assert [r["variant"] for r in rows] == ["osmd"]
    for row in rows:
        assert row["run_dir"] == f"runs/tiny/{row['variant']}/seed0"
        metrics = _read_json(f"{out}/{row['run_dir']}/metrics.json")
        assert float(row["test_deploy_accuracy"]) == pytest.approx(
            metrics["test"]["deploy"]["accuracy"], abs=1e-12
        )
        assert int(row["deploy_params"]) > 0  # measured from the model on S3
    assert "| osmd | osmd | 1 |" in fs.cat_file(f"{out}/summary.md").decode()
    assert fs.cat_file(f"{out}/summary.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert not any(p.name.startswith("s3:") for p in tmp_path.iterdir())

    capsys.readouterr()
    assert main(argv) == 0  # the same command again: the run is found finished on S3
    assert "1 finished earlier, 0 to train" in capsys.readouterr().out


def test_a_sweep_keeps_tune_state_trials_and_outputs_on_s3_and_resumes_there(
    s3_bucket, ray_s3, configs_dir, fast, tmp_path, capsys
):
    """`osmd sweep --out s3://...`: Tune's state (Ray's storage_filesystem), the trial's run
    and trials.csv / best.yaml / summary.png all land on S3; the same command again continues
    the sweep from the state on S3 and trains nothing twice. One trial: the search itself is
    tests/integration/test_sweep_runs.py's subject."""
    import csv
    import io

    import yaml

    data = _tiny_dataset(s3_bucket)
    spec = tmp_path / "sweep.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "base": str(configs_dir / "osmd_synth.yaml"),
                "overrides": [*fast, f"data.root={data}", "train.epochs=1"],
                "space": {"train.lr": {"loguniform": [3.0e-4, 3.0e-3]}},
                "num_samples": 1,
                "max_concurrent_trials": 1,
                "scheduler": {"type": "none"},
                "search": {"algorithm": "random", "seed": 0},
                "resources": {"num_workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0},
            }
        )
    )
    out = f"{s3_bucket}/sweep"
    argv = ["sweep", "--config", str(spec), "--out", out]
    assert main(argv) == 0, capsys.readouterr().err

    fs = _fs()
    rows = list(csv.DictReader(io.StringIO(fs.cat_file(f"{out}/trials.csv").decode())))
    assert len(rows) == 1 and rows[0]["status"] == "COMPLETED", rows
    run = f"{out}/{rows[0]['run_dir']}"
    metrics = _read_json(f"{run}/metrics.json")
    assert float(rows[0]["final_metric"]) == pytest.approx(
        metrics["val"]["deploy"]["accuracy"], abs=1e-12
    )
    assert fs.exists(f"{run}/deploy/meta.json")
    assert fs.find(f"{out}/tune"), "Tune's state is not on S3"
    best = yaml.safe_load(fs.cat_file(f"{out}/best.yaml"))
    assert best["train"]["lr"] == pytest.approx(float(rows[0]["param.train.lr"]))
    assert fs.cat_file(f"{out}/summary.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert not any(p.name.startswith("s3:") for p in tmp_path.iterdir())
    assert not os.path.exists("s3:"), "a local folder named after the URI was created"

    stamp = fs.info(f"{run}/metrics.json")["LastModified"]
    capsys.readouterr()
    assert main(argv) == 0
    assert "continuing the sweep" in capsys.readouterr().out
    assert fs.info(f"{run}/metrics.json")["LastModified"] == stamp, "the trial trained again"


def test_an_endpoint_that_does_not_answer_fails_in_seconds(s3_server, monkeypatch, capsys):
    import socket

    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    started = time.monotonic()
    code = main(["data", "synth", "--out", "s3://osmd-gone/data", "--train", "64"])
    err = capsys.readouterr().err
    assert code == 2
    assert "bucket 'osmd-gone'" in err and "did not answer" in err, err
    assert time.monotonic() - started < 20


class _FlakyStore:
    """A moto S3 server on a fixed port that goes away when the first write of a key that
    contains ``trigger`` arrives (that write gets a 503, later ones find no server) and comes
    back ``outage_s`` later. moto keeps its objects in this process across the restart, as a
    real store keeps them across an outage."""

    def __init__(self, port: int, trigger: str, outage_s: float) -> None:
        import threading

        self.port, self.trigger, self.outage_s = port, trigger, outage_s
        self.triggered = threading.Event()
        self.stopped_at: float | None = None
        self.back_at: float | None = None
        self._servers: list = []
        self._chaos = threading.Thread(target=self._go_away_and_come_back, daemon=True)

    def _server(self):
        from moto.server import ThreadedMotoServer

        store = self

        class Server(ThreadedMotoServer):
            def _server_entry(self) -> None:
                from moto.moto_server.werkzeug_app import (
                    DomainDispatcherApplication,
                    MotoRequestHandler,
                    create_backend_app,
                )
                from werkzeug.serving import make_server

                app = DomainDispatcherApplication(create_backend_app)

                def wrapped(environ, start_response):
                    writes = environ["REQUEST_METHOD"] in ("PUT", "POST")
                    if writes and store.trigger in environ["PATH_INFO"]:
                        if not store.triggered.is_set():
                            store.triggered.set()
                        start_response("503 Service Unavailable", [])
                        return [b""]
                    return app(environ, start_response)

                self._server = make_server(
                    self._ip_address, self._port, wrapped, True, request_handler=MotoRequestHandler
                )
                self._server_ready_event.set()
                self._server.serve_forever()

        return Server(ip_address="127.0.0.1", port=self.port, verbose=False)

    def _go_away_and_come_back(self) -> None:
        self.triggered.wait()
        self._servers[-1].stop()
        self.stopped_at = time.monotonic()
        time.sleep(self.outage_s)
        self.trigger = "\0"  # never again
        self._servers.append(self._server())
        self._servers[-1].start()
        self.back_at = time.monotonic()

    def __enter__(self) -> _FlakyStore:
        self._servers.append(self._server())
        self._servers[-1].start()
        self._chaos.start()
        return self

    def __exit__(self, *exc) -> None:
        self.triggered.set()  # a run that never reached the trigger ends the chaos too
        self._chaos.join(timeout=self.outage_s + 30)
        self._servers[-1].stop()


@pytest.mark.parametrize(
    "trigger",
    [
        # A worker's checkpoint upload fails: Ray Train restarts the worker group.
        "/checkpoint_20",
        # Ray Train's controller fails to save the run's state after that checkpoint: the
        # runner waits for the store and fits again (fit_surviving_store_outages).
        "/checkpoint_manager_snapshot.json",
    ],
    ids=["checkpoint-upload", "controller-state"],
)
def test_training_survives_the_store_going_away_and_coming_back(
    trigger, ray_s3, configs_dir, fast, monkeypatch
):
    """The store goes away at the first write of a checkpoint (or of Ray's run state after
    it) and returns 15 s later: the run resumes (train.max_failures) and finishes."""
    import socket

    import boto3

    from osmd_ray.train.runner import train

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    with _FlakyStore(port, trigger, outage_s=15) as store:
        # A bucket per case: moto's objects outlive its servers in this process.
        bucket = f"osmd-outage-{trigger.strip('/').split('.')[0].replace('_', '-')}"
        boto3.client("s3").create_bucket(Bucket=bucket)
        data, run = _tiny_dataset(f"s3://{bucket}"), f"s3://{bucket}/runs/a"
        cfg = load_config(
            configs_dir / "osmd_synth.yaml",
            # One worker, two epochs: the outage hits the first checkpoint, and the second
            # epoch runs after the store is back.
            [*fast, f"data.root={data}", "train.epochs=2", "train.max_failures=6"]
            + ["scaling.num_workers=1"],
        )
        metrics = train(cfg, run)
        finished = time.monotonic()
        history = _read_json(f"{run}/history.json")
    assert store.stopped_at is not None, f"no write of {trigger} reached the store"
    assert store.back_at is not None and store.back_at < finished
    assert metrics["epochs"] == 2
    assert [h["epoch"] for h in history] == [1, 2]


def test_import_npz_from_and_to_s3(s3_bucket, tmp_path, capsys):
    """NPZ files read from S3 and the imported dataset written to S3, then checked."""
    import numpy as np

    rng = np.random.default_rng(0)
    fs = _fs()
    for split, n in (("train", 80), ("test", 20)):
        local = tmp_path / f"{split}.npz"
        np.savez(local, ir=rng.random((n, 1, 8, 8), dtype=np.float32), label=np.arange(n) % 3)
        fs.put_file(str(local), f"{s3_bucket}/npz/{split}.npz")
    out = f"{s3_bucket}/data/imported"
    argv = ["data", "import", "--out", out]
    argv += ["--train", f"{s3_bucket}/npz/train.npz", "--test", f"{s3_bucket}/npz/test.npz"]
    assert main(argv) == 0, capsys.readouterr().err
    assert main(["data", "check", out]) == 0, capsys.readouterr().out
    manifest = _read_json(f"{out}/manifest.json")
    rows = {split: sum(s["rows"] for s in shards) for split, shards in manifest["splits"].items()}
    assert rows["train"] + rows["val"] == 80 and rows["test"] == 20, rows
