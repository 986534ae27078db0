"""A real multi-node cluster: a head and worker nodes, each its own `ray start` on this machine
(cluster/local.sh, token authentication on), and jobs/train.py submitted to it with
JobSubmissionClient uploading the working directory, as a user would with `ray job submit`.

One job, `jobs/train.py` for 5 epochs on two training workers (`train.max_failures=1`, the
FailureConfig), checked twice over:
- a run on the cluster: Ray Train's workers on the worker nodes (the head has 1 CPU, for the
  job driver), the job connected to this cluster, SUCCEEDED, its artifacts;
- a worker node lost halfway: once Ray Train has registered the checkpoint of epoch 1 (of 5), the
  node hosting the training workers is SIGKILLed (its whole process group: raylet, object
  store, workers; no draining, as a crash or power loss). The head notices within seconds
  (local.sh sets Ray's health checks to 1 s x 5), Ray Train restarts the worker group on the
  spare worker node and the job SUCCEEDS from that checkpoint within a deadline (it never
  hangs): "resumed from the checkpoint of epoch K" in the job's log, every epoch once in
  history.json, and the records of epochs 1..K exactly as the checkpoint held them at the
  kill (their timings too, so they were not trained again).
One job instead of a plain run and a killed one saves about 90 s of CI. The nodes are
separate Ray nodes (a head and two worker nodes with 2 CPUs each), not separate machines:
they all run on this machine, on 127.0.0.1, not in network namespaces of their own (not done:
`ip netns` needs CAP_NET_ADMIN, which a CI container need not grant, so the test would need a
loopback fallback anyway).

Needs ray[default] (in the `dev` extra, so `make test` runs it; it skips without it). It once
failed in a full suite: the progress Queue actor of osmd_ray/train/runner.py (num_cpus 0,
placed on any node) was on the killed node and the restarted workers died on their next put.
The queue is now pinned to the driver's node, and a worker whose queue is gone writes its
progress to its own log instead (tests/unit/train/test_runner.py, test_loop.py).

The cluster is stopped in a finally by `cluster/local.sh stop`, which ends only the process
groups this test started (never `ray stop`, which would end every Ray instance on the machine).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
LOCAL_SH = REPO / "cluster" / "local.sh"
JOB_TIMEOUT_S = 600
# From the kill to the job's end: node death noticed (~5 s), the worker group restarted
# (DeepSpeed set-up) and the last epochs, test and export; about a minute on 2 busy cores.
AFTER_KILL_DEADLINE_S = 300
# The kill comes once KILL_AFTER_CHECKPOINTS checkpoints are registered; the epochs left after
# it are the margin that keeps a fast machine from finishing the run before the kill.
EPOCHS = 5
KILL_AFTER_CHECKPOINTS = 1


def _job_server_available() -> bool:
    """`ray job submit` needs the dashboard's job server, which comes with ray[default]."""
    try:
        import aiohttp_cors  # noqa: F401
        import grpc  # noqa: F401
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Cluster:
    address: str  # the dashboard's URL, for JobSubmissionClient
    token: str
    state: str  # OSMD_CLUSTER_DIR: each node's temp dir and log
    env: dict

    def sh(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        done = subprocess.run(
            ["bash", str(LOCAL_SH), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, f"local.sh {' '.join(args)}:\n{done.stderr}{done.stdout}"
        return done

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address, headers={"Authorization": f"Bearer {self.token}"})

    def train_worker_logs(self, node: str = "*") -> set[Path]:
        """The logs of the Ray Train workers that ran on ``node`` (a glob: all by default).

        A worker's log, <node>/session_*/logs/worker-<id>-<job>-<pid>.out, names its actor."""
        return {
            log
            for log in Path(self.state).glob(f"{node}/session_*/logs/worker-*.out")
            if ":actor_name:RayTrainWorker" in log.read_text(errors="replace")
        }

    def train_worker_nodes(self) -> dict[str, int]:
        """Node name (worker1, ...) -> how many live Ray Train workers it hosts now; the pid in
        a worker log's name says whether it is still alive (those of an earlier job are gone)."""
        nodes: dict[str, int] = {}
        for log in self.train_worker_logs():
            try:
                os.kill(int(log.stem.rsplit("-", 1)[1]), 0)
            except OSError:
                continue
            node = log.relative_to(self.state).parts[0]
            nodes[node] = nodes.get(node, 0) + 1
        return nodes


@pytest.fixture(scope="module")
def cluster():
    """Head (1 CPU: the job driver) + two worker nodes (2 CPUs each: the training workers and
    a spare for the kill test)."""
    if not _job_server_available():
        pytest.skip("the Ray job server needs ray[default] (pip install 'ray[default]')")
    # Short path: Ray's Unix sockets live under the temp dir (108-byte limit).
    state = tempfile.mkdtemp(prefix="osmd-mn-", dir="/tmp")
    env = {
        **os.environ,
        "OSMD_CLUSTER_DIR": state,
        "RAY_AUTH_TOKEN_PATH": os.path.join(state, "auth_token"),  # this cluster's own token
        "HEAD_CPUS": "1",
        "WORKER_CPUS": "2",
        "RAY": os.path.join(os.path.dirname(sys.executable), "ray"),
    }
    env.pop("RAY_ADDRESS", None)
    cluster = Cluster("", "", state, env)
    try:
        started = cluster.sh("start", "2")
        address = re.search(r"export RAY_ADDRESS=(\S+)", started.stdout).group(1)
        token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        cluster.address, cluster.token = address, token
        yield cluster
    finally:
        stopped = subprocess.run(
            ["bash", str(LOCAL_SH), "stop"], env=env, capture_output=True, text=True, timeout=180
        )
        shutil.rmtree(state, ignore_errors=True)
        assert stopped.returncode == 0, stopped.stderr


def submit_train(cluster: Cluster, run_dir: str, overrides: list[str]) -> str:
    return cluster.client().submit_job(
        entrypoint=" ".join(
            ["python jobs/train.py --config configs/osmd_synth.yaml", f"--out {run_dir}"]
            + overrides
        ),
        runtime_env={"working_dir": str(REPO)},
    )


def wait_for_job(client, job_id: str, deadline: float):
    """The job's status once terminal, or its last status at the deadline."""
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(1)
        status = client.get_job_status(job_id)
    return status


def registered_checkpoints(run_dir: Path) -> int:
    """How many checkpoints Ray Train's controller has registered (its snapshot lists them).

    The same as test_reliability_runs._registered, which stays there: it runs inside the
    training workers, where that module's own functions arrive pickled by value but a module
    beside it cannot be imported (ModuleNotFoundError, tried)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        return len(snapshot["checkpoint_results"])
    except (OSError, ValueError, KeyError):
        return 0


def checkpoint_states(run_dir: Path) -> dict[int, dict]:
    """Epoch index -> the state.json of its checkpoint, for those readable now (one being
    written may not parse yet)."""
    states = {}
    for path in run_dir.glob("checkpoint_*/state.json"):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        states[state["epoch"]] = state
    return states


def test_train_job_on_two_nodes_survives_losing_a_worker_node(cluster, tiny_synth, fast):
    from ray.job_submission import JobStatus

    client = cluster.client()
    run_dir = Path(cluster.state, "runs", "killed")
    overrides = [
        *fast,
        f"data.root={tiny_synth}",
        f"train.epochs={EPOCHS}",
        "train.max_failures=1",
        "scaling.num_workers=2",
        "scaling.cpus_per_worker=1",
    ]
    job_id = submit_train(cluster, str(run_dir), overrides)

    def job_failure(what: str) -> str:
        status = client.get_job_status(job_id)
        return f"{what}; job {job_id} is {status}:\n{client.get_job_logs(job_id)[-6000:]}"

    # Until Ray Train has registered the checkpoint of epoch KILL_AFTER_CHECKPOINTS.
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while registered_checkpoints(run_dir) < KILL_AFTER_CHECKPOINTS:
        if client.get_job_status(job_id).is_terminal() or time.monotonic() > deadline:
            pytest.fail(job_failure(f"no {KILL_AFTER_CHECKPOINTS} checkpoints registered"))
        time.sleep(0.5)
    hosts = cluster.train_worker_nodes()
    assert hosts and set(hosts) <= {"worker1", "worker2"}, hosts
    victim = max(hosts, key=hosts.get)
    spare = ({"worker1", "worker2"} - {victim}).pop()
    # Only registered checkpoints count: a checkpoint_* folder can hold the state.json of an
    # epoch whose checkpoint Ray has not registered yet, and the run never resumes from that.
    registered = registered_checkpoints(run_dir)
    assert registered < EPOCHS, "the run finished before the kill: raise EPOCHS"

    before = cluster.train_worker_logs(spare)
    # What each checkpoint holds now, read just before the kill (Ray deletes old checkpoints
    # later: it keeps 2): the one the run resumes from must be among them.
    held = checkpoint_states(run_dir)
    cluster.sh("kill", victim)
    killed_at = time.monotonic()
    status = wait_for_job(client, job_id, killed_at + AFTER_KILL_DEADLINE_S)
    after_kill_s = time.monotonic() - killed_at
    if not status.is_terminal():
        client.stop_job(job_id)
        pytest.fail(job_failure(f"still running {AFTER_KILL_DEADLINE_S} s after the kill"))
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, job_failure(f"{victim} killed")
    # The entrypoint connected to this cluster (RAY_ADDRESS from the job manager) instead of
    # starting a private instance: only then does the cluster know the job's driver.
    assert client.get_job_info(job_id).driver_info is not None
    assert "test.deploy.accuracy=" in logs

    # Resumed from a checkpoint registered before the kill, not from epoch 0.
    resumed = [int(k) for k in re.findall(r"resumed from the checkpoint of epoch (\d+)", logs)]
    assert resumed, job_failure("no 'resumed from the checkpoint' line")
    assert len(resumed) == 1 and resumed[0] >= registered, (resumed, registered)
    history = json.loads((run_dir / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    # The epochs before the kill were not trained again: their records (timings included)
    # are the ones the checkpoint it resumed from held (registered, so never rewritten).
    assert resumed[0] - 1 in held, f"no checkpoint of epoch {resumed[0]} before the kill: {held}"
    assert history[: resumed[0]] == held[resumed[0] - 1]["history"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == EPOCHS
    assert metrics["method"] == "osmd"
    assert 0.0 <= metrics["test"]["deploy"]["accuracy"] <= 1.0
    assert Path(run_dir, "deploy", "meta.json").is_file()
    # The restarted workers ran on the spare node.
    assert cluster.train_worker_logs(spare) - before, (
        f"no Ray Train worker started on {spare} after the kill"
    )
    print(f"{victim} killed; job SUCCEEDED {after_kill_s:.0f} s later, resumed at {resumed}")
