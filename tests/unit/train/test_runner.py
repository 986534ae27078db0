"""The driver side that needs no Ray: the run folder (osmd_ray.train.run_folder) and the runner."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from osmd_ray import cluster
from osmd_ray.config import apply_overrides, load_config, save_config
from osmd_ray.train import run_folder, runner


@pytest.fixture
def cfg(configs_dir, tiny_synth):
    return load_config(configs_dir / "osmd_synth.yaml", [f"data.root={tiny_synth}"])


def _finished_folder(cfg, path, metrics: dict) -> None:
    path.mkdir()
    save_config(cfg, str(path / run_folder.CONFIG_FILE))
    (path / run_folder.METRICS_FILE).write_text(json.dumps(metrics))


def test_finished_run_metrics_needs_the_same_config_and_metrics_json(cfg, tmp_path):
    metrics = {"test": {"deploy": {"accuracy": 0.5}}, "epochs": 10}
    _finished_folder(cfg, tmp_path / "done", metrics)
    assert run_folder.finished_run_metrics(cfg, str(tmp_path / "done")) == metrics
    # Another configuration in the folder is not this run.
    other = apply_overrides(cfg, ["seed=7"])
    assert run_folder.finished_run_metrics(other, str(tmp_path / "done")) is None
    # A started but unfinished run (config.yaml, no metrics.json), or no folder at all.
    (tmp_path / "done" / run_folder.METRICS_FILE).unlink()
    assert run_folder.finished_run_metrics(cfg, str(tmp_path / "done")) is None
    assert run_folder.finished_run_metrics(cfg, str(tmp_path / "missing")) is None


def test_rerunning_a_finished_run_returns_its_metrics_without_starting_ray(
    cfg, tmp_path, monkeypatch
):
    metrics = {"test": {"deploy": {"accuracy": 0.75}}, "epochs": 10}
    _finished_folder(cfg, tmp_path / "done", metrics)

    def no_ray(*_args, **_kwargs):
        raise AssertionError("a finished run started Ray")

    monkeypatch.setattr(cluster, "ensure_ray", no_ray)
    monkeypatch.setattr(runner, "build_trainer", no_ray)
    assert runner.train(cfg, str(tmp_path / "done")) == metrics


class _Trainer:
    """A stand-in for TorchTrainer whose fit() raises the next prepared error, if any."""

    def __init__(self, errors: list[Exception]) -> None:
        self.errors = errors

    def fit(self) -> str:
        if self.errors:
            raise self.errors.pop(0)
        return "result"


def _store_down() -> Exception:
    import ray.train

    return ray.train.ControllerError(OSError("AWS Error NETWORK_CONNECTION: Could not connect"))


def test_a_store_failure_under_the_controller_waits_for_the_bucket_and_refits(monkeypatch):
    from osmd_ray import storage
    from osmd_ray.train.runner import fit_surviving_store_outages

    waited: list[str] = []
    monkeypatch.setattr(storage, "wait_for_bucket", lambda path, *a, **k: waited.append(path))
    errors = [_store_down(), _store_down()]
    builds: list[_Trainer] = []

    def build() -> _Trainer:
        builds.append(_Trainer(errors))
        return builds[-1]

    assert fit_surviving_store_outages(build, "s3://b/runs/a", max_failures=2) == "result"
    assert len(builds) == 3 and waited == ["s3://b/runs/a", "s3://b/runs/a"]


def test_store_failures_beyond_max_failures_and_other_controller_errors_are_raised(monkeypatch):
    import ray.train

    from osmd_ray import storage
    from osmd_ray.train.runner import fit_surviving_store_outages

    monkeypatch.setattr(storage, "wait_for_bucket", lambda *a, **k: None)
    errors = [_store_down(), _store_down()]
    with pytest.raises(ray.train.ControllerError, match="NETWORK_CONNECTION"):
        fit_surviving_store_outages(lambda: _Trainer(errors), "s3://b/runs/a", max_failures=1)
    assert errors == []  # one refit, then the second failure is raised
    # Not an OSError underneath, or a local folder: nothing to wait for.
    logic = [ray.train.ControllerError(ValueError("bad state"))]
    with pytest.raises(ray.train.ControllerError, match="bad state"):
        fit_surviving_store_outages(lambda: _Trainer(logic), "s3://b/runs/a", max_failures=5)
    local = [_store_down()]
    with pytest.raises(ray.train.ControllerError):
        fit_surviving_store_outages(lambda: _Trainer(local), "/tmp/runs/a", max_failures=5)


def test_wait_for_bucket_polls_until_the_store_answers_then_gives_up_after_its_timeout(
    monkeypatch,
):
    from osmd_ray import storage

    answers = [storage.StorageError("down"), storage.StorageError("down"), None]

    def check(path: str, purpose: str = "") -> None:
        answer = answers.pop(0) if answers else storage.StorageError("still down")
        if answer is not None:
            raise answer

    monkeypatch.setattr(storage, "check_bucket", check)
    monkeypatch.setattr(storage, "WAIT_POLL_S", 0.0)
    storage.wait_for_bucket("s3://b/x", timeout_s=60)
    assert answers == []
    with pytest.raises(storage.StorageError, match="still down"):
        storage.wait_for_bucket("s3://b/x", timeout_s=0.05)


def test_progress_queue_is_pinned_to_the_drivers_node(monkeypatch, ray_local):
    """A queue on a worker node would die with it, and fail the restarted workers' puts."""
    import ray.util.queue

    made: list[dict] = []

    class RecordingQueue:
        def __init__(self, actor_options: dict) -> None:
            made.append(actor_options)

        def get(self, timeout: float) -> str:
            raise ray.util.queue.Empty

        def shutdown(self) -> None:
            pass

    monkeypatch.setattr(ray.util.queue, "Queue", RecordingQueue)
    with runner.ProgressPrinter("[test] "):
        pass
    (options,) = made
    strategy = options["scheduling_strategy"]
    assert strategy.node_id == ray_local.get_runtime_context().get_node_id()
    assert strategy.soft is False
    assert options["num_cpus"] == 0


class _Dataset:
    """A stand-in for a Ray Dataset that names what Ray Train's DataConfig made of it."""

    def __init__(self, split: str) -> None:
        self.name, self.split = None, split
        self.context = SimpleNamespace(execution_options=None)

    def set_name(self, name: str) -> None:
        self.name = name

    def copy(self, _dataset: object) -> _Dataset:
        return self

    def streaming_split(self, n: int, *, equal: bool, locality_hints: object) -> list[str]:
        return [f"{self.split} part {i + 1}/{n}{' (equal)' if equal else ''}" for i in range(n)]

    def iterator(self) -> str:
        return f"{self.split} whole"


def test_workers_split_train_equally_and_read_val_and_test_whole(cfg, tmp_path, monkeypatch):
    """Every worker reads val/test whole and scores its share (loop.rank_share): an equal
    split would drop their remainder rows."""
    from osmd_ray.data.schema import read_manifest

    fake = lambda _cfg, _manifest, split, _columns: _Dataset(split)  # noqa: E731
    monkeypatch.setattr(runner, "in_memory_dataset", fake)
    monkeypatch.setattr(runner, "streamed_dataset", fake)
    trainer = runner.build_trainer(cfg, read_manifest(cfg.data.root), str(tmp_path / "run"))
    per_worker = trainer.data_config.configure(
        trainer.datasets, world_size=2, worker_handles=None, worker_node_ids=None
    )
    assert per_worker == [
        {"train": f"train part {i}/2 (equal)", "val": "val whole", "test": "test whole"}
        for i in (1, 2)
    ]
