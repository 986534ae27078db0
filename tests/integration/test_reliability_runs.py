"""Failures during real runs (issue 8): a worker killed mid-epoch, the driver killed, NaN
losses and gradients; and no credential from the environment written anywhere.

Faults are injected inside the Ray Train workers by wrapping the loop's ``compute_losses``
(see :func:`faulty_loop`), so the product code carries no test hooks. docs/reliability.md
lists what each test proves.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray.cloudpickle
from osmd_processes import end_session, ray_did_not_start, run_to_end, start_osmd

from osmd_ray.config import apply_overrides, load_config
from osmd_ray.errors import ConfigError
from osmd_ray.train import runner
from osmd_ray.train.loop import TIMING_KEYS, train_loop_per_worker

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# Workers cannot import this test module (it is not on their path): ship it by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


# --- fault injection inside the workers ---------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """Something to break in one worker at one training step of the first attempt."""

    kind: str
    """sigkill (the worker process dies), nan_loss (a loss term and the total become NaN) or
    nan_grad (the loss stays finite, the gradients become NaN)."""
    rank: int
    """The worker rank that breaks."""
    call: int
    """The n-th training step this worker process runs (compute_losses calls, from 1)."""
    marker: str
    """A file created when the fault fires; it fires only while the file does not exist, so a
    restarted worker (a new process, counting from 1 again) runs clean."""
    term: str = "deploy"
    """nan_loss: the loss term that becomes NaN (deploy: every method computes it)."""
    registered: int = 0
    """sigkill: first wait until Ray has registered this many checkpoints of the run."""
    run_dir: str = ""
    """sigkill with ``registered``: the run folder, where Ray's snapshot lists them."""


def faulty_loop(*faults: Fault):
    """train_loop_per_worker with ``faults`` injected; monkeypatch it into runner."""

    def loop(loop_config):
        import ray.train

        from osmd_ray.train import epoch

        rank = ray.train.get_context().get_world_rank()
        original = epoch.compute_losses
        calls = [0]

        def compute_losses(outputs, *args, **kwargs):
            result = original(outputs, *args, **kwargs)
            calls[0] += 1
            for fault in faults:
                if fault.rank == rank and fault.call == calls[0] and _claim(fault.marker):
                    result = _inject(fault, result, outputs)
            return result

        # batch_losses looks compute_losses up in its module at every call, so this takes.
        epoch.compute_losses = compute_losses
        try:
            train_loop_per_worker(loop_config)
        finally:
            epoch.compute_losses = original

    return loop


def _claim(marker: str) -> bool:
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def _inject(fault: Fault, result: dict, outputs: dict) -> dict:
    import torch

    if fault.kind == "sigkill":
        # Ray registers a reported checkpoint when its controller next polls every worker
        # (every 2 s): a worker that dies before that poll takes the checkpoint with it, and
        # the run restarts from the one before. Wait for the registration, then die.
        deadline = time.monotonic() + 300
        while _registered(Path(fault.run_dir)) < fault.registered and time.monotonic() < deadline:
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGKILL)
    result = dict(result)
    if fault.kind == "nan_loss":
        nan = torch.tensor(math.nan)
        result[fault.term] = result[fault.term] * nan
        result["total"] = result["total"] * nan  # as a real NaN term would make it
    elif fault.kind == "nan_grad":
        logits = outputs["deploy_logits"]
        # Adds exactly 0 to the loss, but d sqrt(u)/du at u = 0 is inf, and 0 * inf is NaN.
        result["total"] = result["total"] + 0.0 * torch.sqrt(logits - logits.detach()).sum()
    return result


# --- helpers ------------------------------------------------------------------------------------


def config(configs_dir, fast, tiny_synth, *extra: str):
    return load_config(
        configs_dir / "osmd_synth.yaml",
        [*fast, f"data.root={tiny_synth}", "scaling.num_workers=2", *extra],
    )


def read_json(path: Path):
    return json.loads(path.read_text())


def _registered(run_dir: Path) -> int:
    """How many checkpoints Ray's checkpoint manager has registered for the run."""
    try:
        return len(read_json(run_dir / "checkpoint_manager_snapshot.json")["checkpoint_results"])
    except (OSError, ValueError, KeyError):
        return 0


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.iterdir() if p.name.startswith("checkpoint_") and p.is_dir())


def finite_file(path: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    return all(
        bool(torch.isfinite(t).all())
        for t in load_file(str(path)).values()
        if t.is_floating_point()
    )


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if key in TIMING_KEYS:
            continue
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def assert_same_numbers(got: dict, want: dict) -> None:
    """Equal keys; numbers within rel 1e-4, anything else (e.g. a stage name) exactly."""
    got, want = flat(got), flat(want)
    assert sorted(got) == sorted(want)
    numbers = [k for k, v in want.items() if isinstance(v, (int, float))]
    assert {k: got[k] for k in numbers} == pytest.approx({k: want[k] for k in numbers}, rel=1e-4)
    assert {k: v for k, v in got.items() if k not in numbers} == {
        k: v for k, v in want.items() if k not in numbers
    }


# --- a worker killed in the middle of an epoch --------------------------------------------------


def test_worker_sigkill_mid_epoch_resumes_from_the_last_checkpoint(
    ray_local, tiny_synth, tmp_path, configs_dir, fast, monkeypatch, capsys, plain_run
):
    """With train.max_failures=1, rank 1 of two is SIGKILLed at its 6th step (epoch 2 of 2,
    one of its four steps done, once Ray has registered the epoch-1 checkpoint). Ray restarts
    the workers from that checkpoint and the run finishes: every epoch once, and the same
    numbers as an uninterrupted run (rel 1e-4)."""
    base = config(configs_dir, fast, tiny_synth, "train.epochs=2")
    # The uninterrupted reference is the session's plain_run (trained once, shared with
    # test_train_end_to_end): the same config.
    assert plain_run.cfg == base
    reference, reference_history = plain_run.metrics, plain_run.history
    capsys.readouterr()

    marker, run_dir = tmp_path / "killed-worker", tmp_path / "killed"
    fault = Fault("sigkill", 1, 6, str(marker), registered=1, run_dir=str(run_dir))
    monkeypatch.setattr(runner, "train_loop_per_worker", faulty_loop(fault))
    metrics = runner.train(apply_overrides(base, ["train.max_failures=1"]), str(run_dir))

    assert marker.exists(), "the fault never fired"
    assert not _alive(int(marker.read_text())), "the killed worker process is still there"
    out = capsys.readouterr().out
    assert "resumed from the checkpoint of epoch 1 (step 4)" in out, out
    history = read_json(run_dir / "history.json")
    assert [h["epoch"] for h in history] == [1, 2], "an epoch was skipped or run twice"
    assert [h["step"] for h in history] == [4, 8]
    for resumed, plain in zip(history, reference_history, strict=True):
        assert_same_numbers(resumed, plain)
    assert_same_numbers(metrics["test"], reference["test"])
    assert metrics["epochs"] == 2


def test_a_gpu_run_this_machine_cannot_schedule_is_a_config_error(
    ray_local, tiny_synth, tmp_path, configs_dir, fast
):
    """Ray would wait for GPUs that a local instance never gets, then fail from inside Ray
    Train; the run is refused at once instead, before its folder is created."""
    import ray

    workers = int(ray.cluster_resources().get("GPU", 0)) + 1
    cfg = config(configs_dir, fast, tiny_synth, "scaling.use_gpu=true")
    cfg = apply_overrides(cfg, [f"scaling.num_workers={workers}"])
    with pytest.raises(ConfigError) as info:
        runner.train(cfg, str(tmp_path / "run"))
    assert info.value.key == "scaling.use_gpu"
    assert not (tmp_path / "run").exists()


# --- NaN and inf ---------------------------------------------------------------------------------


def test_nan_loss_stops_the_run_naming_the_step_and_the_term(
    ray_local, tiny_synth, tmp_path, configs_dir, fast, monkeypatch
):
    cfg = config(configs_dir, fast, tiny_synth, "train.epochs=1")
    fault = Fault("nan_loss", rank=0, call=3, marker=str(tmp_path / "nan"))
    monkeypatch.setattr(runner, "train_loop_per_worker", faulty_loop(fault))
    run_dir = tmp_path / "run"
    with pytest.raises(Exception) as info:
        runner.train(cfg, str(run_dir))
    message = str(info.value)
    assert "non-finite loss at epoch 1, step 3: term(s) deploy, total" in message, message
    assert "NonFiniteLossError" in message
    assert checkpoints(run_dir) == [], "nothing may be checkpointed after a NaN loss"
    assert not (run_dir / "deploy").exists() and not (run_dir / "metrics.json").exists()


def test_nan_steps_are_skipped_and_non_finite_weights_never_checkpointed(
    ray_local, tiny_synth, tmp_path, configs_dir, fast, monkeypatch, capsys
):
    """train.nonfinite=skip: a NaN loss in epoch 1 drops that step (the weights stay finite,
    as they could not after its backward). In epoch 2 a finite loss with NaN gradients makes
    the weights NaN (ZeRO stage 0 applies them; stages 1-2 in fp32 skip such a step inside
    DeepSpeed): the run stops before it checkpoints them, and epoch 1 stays the last
    checkpoint."""
    cfg = config(
        configs_dir,
        fast,
        tiny_synth,
        "train.epochs=2",
        "train.nonfinite=skip",
        "train.zero_stage=0",
    )
    faults = (
        Fault("nan_loss", rank=0, call=3, marker=str(tmp_path / "nan-loss")),
        Fault("nan_grad", rank=0, call=6, marker=str(tmp_path / "nan-grad")),
    )
    monkeypatch.setattr(runner, "train_loop_per_worker", faulty_loop(*faults))
    run_dir = tmp_path / "run"
    with pytest.raises(Exception) as info:
        runner.train(cfg, str(run_dir))
    assert "non-finite weights after epoch 2, step 8" in str(info.value), str(info.value)
    out = capsys.readouterr().out
    assert "skipped: non-finite loss at epoch 1, step 3: term(s) deploy, total" in out, out

    (only,) = checkpoints(run_dir)
    state = read_json(only / "state.json")
    assert state["epoch"] == 0, "the epoch-2 checkpoint must not exist"
    assert finite_file(only / "model.safetensors")
    assert all(math.isfinite(v) for v in state["history"][0]["train"]["loss"].values())
    assert not (run_dir / "deploy").exists() and not (run_dir / "metrics.json").exists()


# --- the driver killed, credentials in the environment ------------------------------------------

SECRET_VARS = ("WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def _wait_for_checkpoints(run_dir: Path, count: int, proc: subprocess.Popen, log: Path) -> bool:
    """Until Ray has registered ``count`` checkpoints of the run (its snapshot lists them);
    False when Ray did not start."""
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            if ray_did_not_start(log):
                return False
            pytest.fail(f"osmd train ended early ({proc.returncode}):\n{log.read_text()}")
        if _registered(run_dir) >= count:
            return True
        time.sleep(0.1)
    pytest.fail(f"no {count} checkpoints after 900 s:\n{log.read_text()}")


def _start_and_kill_after(argv, env, log: Path, run_dir: Path, count: int) -> None:
    """Start `osmd train`, SIGKILL it once ``count`` checkpoints are registered."""
    for attempt in range(2):
        proc = start_osmd(argv, env, log)
        try:
            started = _wait_for_checkpoints(run_dir, count, proc, log)
            if started:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
            # Ray's dashboard and runtime-env agents outlive a SIGKILLed driver: clean up
            # (they would not exit on their own, so waiting long for them only costs time).
            end_session(proc.pid, grace_s=2)
        if started:
            return
        assert attempt == 0, log.read_text()


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(_files(root))}


def test_killed_driver_resumes_on_rerun_and_no_secret_is_written(tiny_synth, tmp_path, fast):
    """`osmd train` (own local Ray) runs with credentials in its environment, is SIGKILLed
    after its first checkpoint, and the same command again resumes from that checkpoint:
    epochs once each, the earlier records kept, registered checkpoints never rewritten. Then
    `osmd predict`. No credential appears in any file under the run folder (wandb's offline
    files included), in the predictions, in what `osmd compare` writes over the same run, in
    the captured output or in Ray's session logs."""
    secrets = {name: f"osmd-secret-{name.lower()}-{uuid.uuid4().hex}" for name in SECRET_VARS}
    # Ray's session folder holds Unix sockets, whose paths must stay under 108 bytes.
    ray_tmp = Path(tempfile.mkdtemp(prefix="osmd-ray-", dir="/tmp"))
    env = {
        **os.environ,
        **secrets,
        "WANDB_MODE": "offline",
        # Should anything still try to go online, it meets a closed local port.
        "WANDB_BASE_URL": "http://127.0.0.1:9",
        "RAY_TMPDIR": str(ray_tmp),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("RAY_ADDRESS", None)  # a local instance of its own
    try:
        _kill_rerun_predict_and_search(tiny_synth, tmp_path, fast, secrets, env, ray_tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _kill_rerun_predict_and_search(tiny_synth, tmp_path, fast, secrets, env, ray_tmp) -> None:
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    overrides = [
        *fast,
        f"data.root={tiny_synth}",
        "train.epochs=2",
        "tracking.wandb=true",
        # compare names an empty group after its spec: with one set, its run is this one.
        "tracking.group=secrets",
        # What is killed is the driver: one worker does (the worker-kill test above has two).
        "scaling.num_workers=1",
    ]
    argv = ["train", "--config", "configs/osmd_synth.yaml", "--out", str(run_dir), *overrides]

    _start_and_kill_after(argv, env, logs / "train-killed.log", run_dir, count=1)
    kept = read_json(run_dir / "checkpoint_manager_snapshot.json")
    latest = run_dir / kept["latest_checkpoint_result"]["checkpoint_dir_name"]
    killed_at = read_json(latest / "state.json")
    done = killed_at["epoch"] + 1  # epochs finished and checkpointed before the kill
    at_kill = {p.name: _tree(p) for p in checkpoints(run_dir)}
    assert not (run_dir / "metrics.json").exists()

    run_to_end(argv, env, logs / "train-rerun.log", timeout_s=900)
    rerun = (logs / "train-rerun.log").read_text()
    assert f"resumed from the checkpoint of epoch {done}" in rerun, rerun
    history = read_json(run_dir / "history.json")
    assert [h["epoch"] for h in history] == [1, 2], "an epoch was skipped or run twice"
    assert history[:done] == killed_at["history"], "the rerun started over"
    compared = 0
    for name, files in at_kill.items():
        if (run_dir / name).exists():  # or removed whole by Ray's num_to_keep
            assert _tree(run_dir / name) == files, f"{name} was rewritten"
            compared += 1
    assert compared, "no checkpoint from before the kill was left to compare"

    preds = tmp_path / "preds.parquet"
    predict = [
        "predict",
        "--model",
        str(run_dir / "deploy"),
        "--data",
        tiny_synth,
        "--out",
        str(preds),
    ]
    run_to_end(predict, env, logs / "predict.log", timeout_s=300)

    # `osmd compare` over the same run, in the same environment: its one-run grid finds the
    # run finished (it trains exactly what was trained above), loads its deployment model for
    # the latency columns and writes results.csv, summary.md and summary.png.
    compare_out = tmp_path / "compare"
    shutil.copytree(run_dir, compare_out / "runs" / Path(tiny_synth).name / "osmd" / "seed0")
    spec = tmp_path / "secrets.yaml"
    spec.write_text(
        json.dumps(
            {
                "base": str(REPO / "configs" / "osmd_synth.yaml"),
                "overrides": overrides,
                "variants": [{"name": "osmd", "overrides": ["method=osmd"]}],
                "seeds": [0],
            }
        )
    )
    compare = ["compare", "--config", str(spec), "--out", str(compare_out)]
    run_to_end(compare, env, logs / "compare.log", timeout_s=300)
    assert "1 finished earlier, 0 to train" in (logs / "compare.log").read_text()
    assert (compare_out / "results.csv").read_text().count("\n") == 2  # header + the run

    wandb_files = [p for p in _files(run_dir / "wandb") if "offline-run" in str(p)]
    assert wandb_files, "wandb wrote no offline run into the run folder"
    searched = _files(run_dir) + [preds] + _files(compare_out) + _files(logs) + _files(ray_tmp)
    leaks = [
        f"{path}: {name}"
        for path in searched
        for name, value in secrets.items()
        if value.encode() in path.read_bytes()
    ]
    assert not leaks, "credentials written to disk:\n" + "\n".join(leaks)
