"""Running `osmd` commands as subprocesses in their own session, so that every process they
start (a local Ray instance's) can be found and cleaned up, even after a SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def start_osmd(argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as sink:
        # Its own session: every process it starts (Ray's) can be found and cleaned up.
        return subprocess.Popen(
            [sys.executable, "-m", "osmd_ray.cli", *argv],
            cwd=REPO,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def session_processes(sid: int) -> list[int]:
    import psutil

    found = []
    for pid in psutil.pids():
        try:
            if os.getsid(pid) == sid and pid != os.getpid():
                found.append(pid)
        except (ProcessLookupError, PermissionError):
            continue
    return found


def end_session(sid: int, grace_s: float) -> list[int]:
    """Wait up to ``grace_s`` for the processes of a session we started to exit, then SIGKILL
    what is left (only that session's processes); returns the pids that had to be killed."""
    deadline = time.monotonic() + grace_s
    while session_processes(sid) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = session_processes(sid)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


# Ray gives a new local node 30 s (hard-coded) to register; on a heavily loaded machine a
# second instance beside the session's can miss that. Such a start is retried once: it is the
# machine, not the behaviour under test.
RAY_START_TIMEOUT = "The current node timed out during startup"


def ray_did_not_start(log: Path) -> bool:
    return RAY_START_TIMEOUT in log.read_text(errors="replace")


def run_to_end(argv, env, log: Path, timeout_s: float) -> None:
    """Run an `osmd` command to its end; it must succeed."""
    for attempt in range(2):
        proc = start_osmd(argv, env, log)
        try:
            code = proc.wait(timeout=timeout_s)
        finally:
            end_session(proc.pid, grace_s=10)
        if code == 0:
            return
        assert attempt == 0 and ray_did_not_start(log), log.read_text()
