"""Sweep overhead: where a trial of `osmd sweep` spends its wall time, and trials per hour
against a plain Ray Tune function trainable of the same model and epoch function (issue 27).

Three measurements, in one Ray instance, one after the other:

- ``osmd``: the product's own sweep (``run_sweep``) of the spec (default
  configs/sweep_synth.yaml: 64 in-process trials, ASHA, up to 10 epochs). Per trial, from
  trials.csv: wall (Tune starting the trial to its end), epochs (training steps and
  validation), set-up before the first epoch (model, optimiser, the shared data turned into
  tensors), saving (checkpoints; after the last epoch the test pass, the deployment model and
  the run's files), and the rest outside the trial function (Tune's start and teardown).
- ``plain``: what a Ray user writes instead: a function trainable that builds the same
  network and trains it with the same epoch function (``LocalRun.train_epoch``, data from the
  object store via ``tune.with_parameters``), validates, and ``tune.report``s every epoch;
  no run folder, no checkpoints, no deployment export. Same space, searcher and seed, ASHA
  settings, concurrency and resources; ``reuse_actors=True`` as the product sets it.
- ``--workers N`` (default 2; 0 skips it): one trial on N Ray Train workers under DeepSpeed,
  ``--workers-epochs`` epochs, no early stopping: its overhead (wall minus epochs).

Trials per hour = trials / sweep wall (Tuner.fit), the ratio osmd / plain is the figure the
issue asks for; epoch share = the trials' epoch seconds / (wall x concurrent trials).

Usage::

    python benchmarks/sweep_overhead.py                          # ~42 min on 2 idle cores
    python benchmarks/sweep_overhead.py --num-samples 8 --epochs 3 --workers 0   # ~2 min

Writes a JSON (``--out``) and prints a markdown table. Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS_DIR, ROOT, machine, machine_line, markdown_table, say, write_json

DEFAULT_SPEC = ROOT / "configs" / "sweep_synth.yaml"


def plain_trainable(params: dict[str, Any], base: dict[str, Any], data: Any) -> None:
    """The reference trial: the same network and epoch function, reported to Tune."""
    import ray.tune
    import torch

    from osmd_ray.config import apply_overrides, config_from_dict
    from osmd_ray.experiments.sweep import epoch_metrics, param_overrides
    from osmd_ray.train.local import LocalRun, as_tensors

    cfg = apply_overrides(config_from_dict(base), param_overrides(params))
    torch.set_num_threads(max(1, math.floor(cfg.scaling.cpus_per_worker)))
    run = LocalRun(cfg, data.manifest, as_tensors(data.arrays))
    epochs_s = 0.0
    while run.epoch < cfg.train.epochs:
        started = time.perf_counter()
        run.train_epoch()
        val = run.score("val")
        epochs_s += time.perf_counter() - started
        ray.tune.report({"epoch": run.epoch, "epochs_s": epochs_s, **epoch_metrics(val)})


def wall_recorder() -> Any:
    """A Tune callback that records each trial's wall time (start to end)."""
    from ray.tune import Callback

    class Walls(Callback):
        def __init__(self) -> None:
            self.started: dict[str, float] = {}
            self.wall: dict[str, float] = {}

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.started[trial.trial_id] = time.perf_counter()

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.wall[trial.trial_id] = time.perf_counter() - self.started[trial.trial_id]

        on_trial_error = on_trial_complete

    return Walls()


def run_plain(spec: Any, cfg: Any, folder: str) -> dict[str, Any]:
    import ray.tune

    from osmd_ray.config import config_to_dict
    from osmd_ray.experiments.sweep import search_config
    from osmd_ray.train.runner import read_in_memory

    started = time.perf_counter()  # the data read counts, as it does in the product's sweep
    data = read_in_memory(cfg)
    walls = wall_recorder()
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(plain_trainable, base=config_to_dict(cfg), data=data),
        spec.trial_resources(),
    )
    tuner = ray.tune.Tuner(
        trainable,
        param_space={p.key: p.tune_domain() for p in spec.space},
        tune_config=search_config(spec, cfg),  # the product's own search (reuse_actors too)
        run_config=ray.tune.RunConfig(
            name="plain", storage_path=folder, callbacks=[walls], verbose=0
        ),
    )
    grid = tuner.fit()
    wall = time.perf_counter() - started
    trials = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id")
        trials.append(
            {
                "trial_id": trial_id,
                "epochs": int(metrics.get("epoch", 0)),
                "wall_s": walls.wall.get(trial_id, math.nan),
                "epochs_s": float(metrics.get("epochs_s", math.nan)),
                "final_metric": metrics.get(spec.tune_metric),
            }
        )
    return summarize("plain", trials, wall, spec)


def run_osmd(spec: Any, overrides: list[str], folder: str) -> dict[str, Any]:
    from osmd_ray.experiments.sweep import run_sweep

    started = time.perf_counter()
    run_sweep(spec, folder, overrides)
    wall = time.perf_counter() - started
    with open(Path(folder) / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    trials = [
        {
            "trial_id": r["trial_id"],
            "epochs": int(r["epochs"]),
            "status": r["status"],
            **{k: float(r[k]) for k in ("wall_s", "epochs_s", "setup_s", "save_s", "trial_s")},
            "final_metric": float(r["final_metric"]),
        }
        for r in rows
    ]
    return summarize("osmd", trials, wall, spec)


def summarize(name: str, trials: list[dict[str, Any]], wall: float, spec: Any) -> dict[str, Any]:
    epochs_s = sum(t["epochs_s"] for t in trials)
    overheads = [t["wall_s"] - t["epochs_s"] for t in trials if not math.isnan(t["wall_s"])]
    summary = {
        "name": name,
        "trials": len(trials),
        "epochs_trained": sum(t["epochs"] for t in trials),
        "sweep_wall_s": round(wall, 1),
        "trials_per_hour": round(3600 * len(trials) / wall, 1),
        "epoch_seconds": round(epochs_s, 1),
        "epoch_share": round(epochs_s / (wall * spec.max_concurrent_trials), 3),
        "median_trial_overhead_s": round(statistics.median(overheads), 2) if overheads else None,
        "max_trial_overhead_s": round(max(overheads), 2) if overheads else None,
        "trial_rows": trials,
    }
    if name == "osmd":
        stopped = [t for t in trials if t["status"] == "STOPPED_EARLY"]
        completed = [t for t in trials if t["status"] == "COMPLETED"]
        for label, group in (("stopped", stopped), ("completed", completed)):
            if group:
                summary[f"median_parts_{label}_s"] = {
                    part: round(statistics.median(t[part] for t in group), 2)
                    for part in ("wall_s", "epochs_s", "setup_s", "save_s")
                } | {
                    "outside_trial_function_s": round(
                        statistics.median(t["wall_s"] - t["trial_s"] for t in group), 2
                    )
                }
    return summary


def run_workers_trial(workers: int, epochs: int, folder: str, overrides: list[str]) -> dict:
    """One trial on ``workers`` Ray Train workers: its wall time against its epochs."""
    from osmd_ray.experiments.sweep import load_sweep_spec, run_sweep

    spec_path = Path(folder) / "workers.yaml"
    spec_path.write_text(
        f"base: {ROOT / 'configs' / 'osmd_synth.yaml'}\n"
        f"overrides: [train.epochs={epochs}]\n"
        "space: {train.lr: {loguniform: [1.0e-3, 1.1e-3]}}\n"
        "num_samples: 1\nscheduler: none\nsearch: random\n"
        f"resources: {{num_workers: {workers}, cpus_per_worker: 1, gpus_per_worker: 0}}\n"
    )
    run_sweep(load_sweep_spec(spec_path), str(Path(folder) / "out"), overrides)
    with open(Path(folder) / "out" / "trials.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    wall, epochs_s = float(row["wall_s"]), float(row["epochs_s"])
    return {
        "workers": workers,
        "epochs": int(row["epochs"]),
        "wall_s": wall,
        "epochs_s": epochs_s,
        "overhead_s": round(wall - epochs_s, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default=str(DEFAULT_SPEC), help="sweep spec (in-process)")
    parser.add_argument("--num-samples", type=int, help="override the spec's num_samples")
    parser.add_argument("--epochs", type=int, help="override train.epochs of every trial")
    parser.add_argument(
        "--workers", type=int, default=2, help="Ray Train trial's workers (0: skip)"
    )
    parser.add_argument("--workers-epochs", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS_DIR / "sweep_overhead.json"))
    args = parser.parse_args(argv)

    from dataclasses import replace

    from osmd_ray.experiments.sweep import base_config, load_sweep_spec

    spec = load_sweep_spec(args.spec)
    if args.num_samples:
        spec = replace(spec, num_samples=args.num_samples)
    overrides = ["tracking.wandb=false"] + ([f"train.epochs={args.epochs}"] if args.epochs else [])
    if not spec.in_process:
        parser.error(f"{args.spec}: resources.num_workers must be 0 (in-process trials)")
    from osmd_ray.experiments.sweep import _start_ray

    # Ray first, so that neither search's wall time includes starting it.
    _start_ray(spec)
    info = machine()
    results: dict[str, Any] = {"machine": info, "spec": args.spec, "overrides": overrides}
    with tempfile.TemporaryDirectory(prefix="osmd-sweep-bench-") as tmp:
        say(f"osmd sweep: {spec.num_samples} trials")
        results["osmd"] = run_osmd(spec, overrides, str(Path(tmp) / "osmd"))
        cfg = base_config(spec, str(Path(tmp) / "osmd"), overrides)
        say(f"plain Tune function trainable: {spec.num_samples} trials")
        results["plain"] = run_plain(spec, cfg, str(Path(tmp) / "plain"))
        if args.workers:
            say(f"one trial on {args.workers} Ray Train workers")
            folder = Path(tmp) / "workers"
            folder.mkdir()
            results["workers_trial"] = run_workers_trial(
                args.workers, args.workers_epochs, str(folder), ["tracking.wandb=false"]
            )
    ours, plain = results["osmd"], results["plain"]
    results["trials_per_hour_ratio"] = round(ours["trials_per_hour"] / plain["trials_per_hour"], 3)
    path = write_json(args.out, results)
    rows = [
        [
            s["name"],
            s["trials"],
            s["epochs_trained"],
            s["sweep_wall_s"],
            s["trials_per_hour"],
            s["epoch_share"],
            s["median_trial_overhead_s"],
            s["max_trial_overhead_s"],
        ]
        for s in (ours, plain)
    ]
    print(machine_line(info))
    print(
        markdown_table(
            [
                "search",
                "trials",
                "epochs",
                "wall s",
                "trials/h",
                "epoch share",
                "median overhead s",
                "max overhead s",
            ],
            rows,
        )
    )
    print(f"trials per hour, osmd / plain: {results['trials_per_hour_ratio']}")
    for label in ("stopped", "completed"):
        if f"median_parts_{label}_s" in ours:
            print(f"osmd {label} trials, medians: {ours[f'median_parts_{label}_s']}")
    if "workers_trial" in results:
        print(f"Ray Train trial: {results['workers_trial']}")
    say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
