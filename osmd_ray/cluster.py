"""The one way the package starts or joins Ray (DESIGN §6).

``RAY_ADDRESS`` set: join that cluster. Otherwise start a local instance on 127.0.0.1 with
token authentication as Ray 2.60 sets it up, sized for the work at hand plus room for Ray
Data's read tasks.
"""

from __future__ import annotations

import math
import os
import sys

from osmd_ray import storage
from osmd_ray.ray_private_api import local_cluster_on_loopback

DATA_TASK_CPUS = 2
"""Logical CPUs a local instance keeps beside the training workers for Ray Data's tasks:
when the workers hold every CPU, the data pipeline starves and the run hangs without an
error (DESIGN §6)."""


def ensure_ray(worker_cpus: float, use_gpu: bool) -> None:
    """Connect to the cluster in RAY_ADDRESS, or start a local Ray instance with room for
    ``worker_cpus`` logical CPUs of workers (and DATA_TASK_CPUS more); nothing when Ray is
    already initialised in this process. ``use_gpu`` picks DeepSpeed's accelerator on the
    workers (``DS_ACCELERATOR``)."""
    import ray

    if ray.is_initialized():
        return
    env_vars = {
        "DS_ACCELERATOR": "cuda" if use_gpu else "cpu",
        # Ray Train V2 routes print() through a logger as well: lines would show twice.
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        # The S3 endpoint and region (never credentials: workers take those from their own
        # environment or instance profile).
        **storage.worker_env(),
    }
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": env_vars}, log_to_driver=True)
        return
    needed = math.ceil(worker_cpus) + DATA_TASK_CPUS
    with local_cluster_on_loopback():
        ray.init(
            num_cpus=max(os.cpu_count() or 1, needed),
            include_dashboard=False,
            # A local instance talks over loopback only.
            _node_ip_address="127.0.0.1",
            runtime_env={
                "env_vars": env_vars,
                "worker_process_setup_hook": f"{__name__}.pin_ray_address",
            },
            # Workers' logs stay in /tmp/ray/session_latest/logs; progress comes through a
            # queue and failures through the exception fit() raises. OSMD_VERBOSE=1 streams
            # them all.
            log_to_driver=bool(os.environ.get("OSMD_VERBOSE")),
            configure_logging=True,
            logging_level="WARNING",
        )


def pin_ray_address() -> None:
    """Worker set-up hook of a local instance: RAY_ADDRESS names this instance.

    Ray Train's placement-group cleaner asks Ray's state API about the controller without an
    address; with another Ray instance on the same machine (tests, a second sweep) the API
    finds several and raises, the cleaner thread dies, and the placement groups of trials that
    ASHA stopped are never removed: the next trial then waits forever for CPUs.
    """
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def stop_ray() -> None:
    """Shut down this process's Ray connection, if something started one (an interrupted
    compare stops its runs this way; they resume from their last checkpoint next time)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
