"""Channels-last against contiguous (NCHW) images and weights in the in-process engine: the
seconds of one training epoch and one validation pass of ``LocalRun``, both layouts in one
process, alternating, one thread (what an in-process sweep trial on one CPU gets).

The engine runs channels-last (``osmd_ray.train.local``); the NCHW side converts the same
run's network and tensors back, so both train the same network on the same rows.

Usage::

    python benchmarks/memory_format.py                  # ~2 min on an idle core
    python benchmarks/memory_format.py --epochs 2 --config configs/osmd_synth.yaml

Writes a JSON (``--out``) and prints a markdown table. Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_CONFIG, RESULTS_DIR, load_cfg, machine, markdown_table, say, write_json

LAYOUTS = ("channels_last", "contiguous")


def build_run(cfg: Any, layout: str) -> Any:
    """The engine's run of ``cfg`` (the shared data read in memory) in ``layout``."""
    import torch

    from osmd_ray.train.local import LocalRun, as_tensors
    from osmd_ray.train.runner import read_in_memory

    data = read_in_memory(cfg)
    splits = as_tensors(data.arrays)
    run = LocalRun(cfg, data.manifest, splits)
    if layout == "contiguous":
        run.net.to(memory_format=torch.contiguous_format)
        run.splits = {s: {k: v.contiguous() for k, v in cols.items()} for s, cols in splits.items()}
    return run


def time_epochs(runs: dict[str, Any], epochs: int) -> dict[str, dict[str, list[float]]]:
    """Per layout: each epoch's training and validation seconds, the layouts alternating."""
    times: dict[str, dict[str, list[float]]] = {k: {"train_s": [], "val_s": []} for k in runs}
    for epoch in range(epochs):
        for layout, run in runs.items():
            started = time.perf_counter()
            run.train_epoch()
            trained = time.perf_counter()
            run.score("val")
            times[layout]["train_s"].append(trained - started)
            times[layout]["val_s"].append(time.perf_counter() - trained)
            say(f"epoch {epoch + 1} {layout}: train {trained - started:.2f}s")
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--epochs", type=int, default=4, help="epochs per layout (default 4)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "memory_format.json"))
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    # In-process, as a sweep trial runs it: one process, the batch of one worker.
    cfg = load_cfg(args.config, ["scaling.num_workers=0", *args.overrides])
    runs = {layout: build_run(cfg, layout) for layout in LAYOUTS}
    times = time_epochs(runs, args.epochs)
    # The first epoch warms up oneDNN's kernels: medians over the rest.
    median = {
        layout: {k: statistics.median(v[1:] or v) for k, v in t.items()}
        for layout, t in times.items()
    }
    speedup = {
        k: median["contiguous"][k] / median["channels_last"][k] for k in ("train_s", "val_s")
    }
    rows = [[layout, f"{m['train_s']:.2f}", f"{m['val_s']:.2f}"] for layout, m in median.items()]
    rows.append(["speed-up", f"{speedup['train_s']:.2f}x", f"{speedup['val_s']:.2f}x"])
    print(markdown_table(["layout", "train epoch s", "validation s"], rows))
    write_json(
        args.out,
        {
            "machine": machine(),
            "config": args.config,
            "overrides": args.overrides,
            "epochs": times,
            "median": median,
            "speedup": speedup,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
