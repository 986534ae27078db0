"""The two places where the package needs Ray internals, kept here so they are easy to find.

Each function says why no public API serves and which one would replace it; when Ray offers
it, this module is the only one to change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def local_cluster_on_loopback() -> Iterator[None]:
    """Keep a local Ray instance started inside the block on 127.0.0.1.

    Ray replaces 127.0.0.1 by the machine's outward address (so that other nodes could join)
    unless it believes clusters are off, which it decides once, at import, from
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER; its GCS and raylet then listen on that address. Turn
    the flag off in this process while the instance starts (its processes take the address
    from their arguments), and back on afterwards: `ray start` in a child process must still
    be able to add nodes. A public ``ray.init(bind_address=...)`` would replace this.
    """
    from ray._private import ray_constants

    saved = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    if saved is None:  # another Ray version: nothing to adjust
        yield
        return
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def on_worker_group_start(record: Callable[[str], None]) -> Any:
    """A Ray Train callback that calls ``record(hex id)`` with the placement group of the
    run's worker group once the group has started.

    Ray Train V2 has no public callback that sees the worker group; a sweep needs its
    placement group to remove it after ASHA stopped the trial (osmd_ray.experiments.sweep).
    A public worker-group hook in ``ray.train.UserCallback``, or Tune removing a stopped trial's
    Train placement groups itself, would replace this.
    """
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    class RecordPlacementGroup(WorkerGroupCallback):
        def after_worker_group_start(self, worker_group: Any) -> None:
            state = worker_group.get_worker_group_state()
            record(state.placement_group_handle.placement_group.id.hex())

    return RecordPlacementGroup()
