"""Training throughput: Ray Train + DeepSpeed against a plain PyTorch loop, same model, same cores.

What is compared (issue 9, item 1):

- ``plain``: one process, ``torch.set_num_threads(--threads)`` (default: every core), the
  OS-MD model of the config (``build_model``), AdamW over the same per-part groups, the same
  LR schedule, ``compute_losses``, ``clip_grad_norm_`` and ``optimizer.step`` - what a
  hand-written script does. Batch ``data.batch_size`` (64).
- ``ray w=1``: one Ray Train worker holding every core (``cpus_per_worker = nproc``).
- ``ray w=2``: two Ray Train workers of ``nproc / 2`` CPUs each. Each takes ``data.batch_size``
  rows per step, so the *global* batch doubles (128): samples/s are counted over both workers,
  and compared with the plain loop on the same cores (a plain loop at batch 128 is measured too,
  so the effect of the larger batch can be told apart from the platform's cost).
- ZeRO stage 0 and 2 for each worker count.

The Ray runs use the package's real loop pieces inside a ``TorchTrainer`` train function:
``build_model``, ``part_parameter_groups``, ``lr_schedule``, ``deepspeed_config``,
``deepspeed.initialize``, ``compute_losses``, ``nonfinite_terms`` (the per-step all-reduce of
the real loop), ``engine.backward`` and ``engine.step``. It does *not* call
``train_loop_per_worker`` itself: that reads Ray Data shards, and the point here is the
training step with the data held in memory (random tensors of the manifest's shapes and
dtypes, the same in both loops). The Ray Data input pipeline is out of this measurement.

Each setup runs warm-up steps, then ``--repeats`` timed runs of ``--steps`` steps; a run's
samples/s is rows x steps / seconds (rows over all workers), and the table shows the median
over runs and its ratio to the plain loop. The plain loop runs before Ray starts and again
after it stops; its runs are pooled, so a drift in machine load shows up as a spread.

Usage::

    python benchmarks/train_throughput.py            # full run (~5 min on 2 idle cores)
    python benchmarks/train_throughput.py --quick    # smoke test (~1 min)

Writes a JSON (``--out``, default benchmarks/results/train_throughput.json) and prints a
markdown table. Results and commands: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common
from _common import (
    DEFAULT_CONFIG,
    RESULTS_DIR,
    load_cfg,
    load_manifest,
    machine,
    machine_line,
    markdown_table,
    median,
    random_batch,
    say,
    write_json,
)

TARGET_RATIO = 0.85
N_BATCHES = 4  # distinct in-memory batches, cycled


def _phases_template() -> dict[str, float]:
    return {"forward_loss": 0.0, "backward": 0.0, "step": 0.0}


def profile_steps(step: Any, steps: int) -> str:
    """torch.profiler's table of the ops that took the most CPU time over ``steps`` steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            step(i)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)


def plain_rates(
    cfg: Any,
    manifest: Any,
    batch_size: int,
    threads: int,
    warmup: int,
    steps: int,
    repeats: int,
    profile: int = 0,
) -> dict[str, Any]:
    """samples/s of a single-process PyTorch loop of the config's model (no Ray, no DeepSpeed)."""
    import torch

    from osmd_ray.blocks.stages import part_parameter_groups
    from osmd_ray.methods import build_model
    from osmd_ray.train.epoch import batch_losses, build_optimizer, lr_schedule

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, manifest)
    model.train()
    parts, groups = part_parameter_groups(model)
    optimizer = build_optimizer(groups, cfg)
    scheduler = lr_schedule(optimizer, cfg, manifest.num_rows("train"), parts)
    params = [p for g in groups for p in g["params"]]
    names = [*cfg.data.ordinary, *cfg.data.privileged]
    batches = [random_batch(manifest, names, batch_size, seed=i) for i in range(N_BATCHES)]
    phases = _phases_template()

    def step(i: int) -> None:
        batch = batches[i % N_BATCHES]
        t0 = time.perf_counter()
        outputs = model(batch)
        losses = batch_losses(outputs, batch, cfg)
        t1 = time.perf_counter()
        losses["total"].backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        float(losses["total"].detach())  # a script logs its loss
        t3 = time.perf_counter()
        phases["forward_loss"] += t1 - t0
        phases["backward"] += t2 - t1
        phases["step"] += t3 - t2

    for i in range(warmup):
        step(i)
    phases.update(_phases_template())
    rates = []
    for r in range(repeats):
        start = time.perf_counter()
        for i in range(steps):
            step(i)
        rates.append(batch_size * steps / (time.perf_counter() - start))
        say(f"  plain b={batch_size} threads={threads}: run {r + 1}/{repeats} {rates[-1]:.1f}/s")
    timed = steps * repeats
    return {
        "rates": rates,
        "threads": torch.get_num_threads(),
        "phase_ms_per_step": {k: 1000 * v / timed for k, v in phases.items()},
        "profile": profile_steps(step, profile) if profile else None,
    }


def ray_train_fn(config: dict[str, Any]) -> None:
    """The Ray Train worker: the package's model, losses and DeepSpeed config, timed steps."""
    import deepspeed
    import ray.train
    import ray.train.torch
    import torch

    from osmd_ray.blocks.stages import part_parameter_groups
    from osmd_ray.config import config_from_dict
    from osmd_ray.data.schema import Manifest
    from osmd_ray.methods import build_model
    from osmd_ray.train.epoch import (
        batch_losses,
        batch_to_device,
        build_optimizer,
        lr_schedule,
        nonfinite_terms,
        uses_bf16,
    )
    from osmd_ray.train.loop import deepspeed_config, set_cpu_threads

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    threads_found = torch.get_num_threads()
    cfg = config_from_dict(config["cfg"])
    if config["worker_threads"] == "package":
        set_cpu_threads(cfg)  # what train_loop_per_worker does
    elif config["worker_threads"] != "none":
        torch.set_num_threads(int(config["worker_threads"]))
    manifest = Manifest.from_json(config["manifest_json"], source="manifest")
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, manifest)
    parts, groups = part_parameter_groups(model)
    optimizer = build_optimizer(groups, cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lr_schedule(optimizer, cfg, manifest.num_rows("train") // world, parts),
        config=deepspeed_config(cfg, uses_bf16(cfg)),
    )
    engine.train()
    names = [*cfg.data.ordinary, *cfg.data.privileged]
    batch_size = cfg.data.batch_size
    batches = [
        batch_to_device(random_batch(manifest, names, batch_size, seed=100 * rank + i), device)
        for i in range(N_BATCHES)
    ]
    phases = _phases_template()

    def step(i: int) -> None:
        batch = batches[i % N_BATCHES]
        t0 = time.perf_counter()
        outputs = engine(batch)
        losses = batch_losses(outputs, batch, cfg)
        if nonfinite_terms(losses, device):
            raise RuntimeError("non-finite loss in the throughput benchmark")
        t1 = time.perf_counter()
        engine.backward(losses["total"])
        t2 = time.perf_counter()
        engine.step()
        float(losses["total"].detach())
        t3 = time.perf_counter()
        phases["forward_loss"] += t1 - t0
        phases["backward"] += t2 - t1
        phases["step"] += t3 - t2

    for i in range(config["warmup"]):
        step(i)
    phases.update(_phases_template())
    rates = []
    for _ in range(config["repeats"]):
        torch.distributed.barrier()
        start = time.perf_counter()
        for i in range(config["steps"]):
            step(i)
        # The last step's collectives already synchronise the ranks; rank 0's clock counts.
        rates.append(world * batch_size * config["steps"] / (time.perf_counter() - start))
    timed = config["steps"] * config["repeats"]
    profile_text = None
    if config.get("profile"):
        profile_text = profile_steps(step, config["profile"])
    # Ray Train V2 keeps only the metrics reported with a checkpoint; this benchmark runs on
    # one machine, so every rank writes its figures into a folder the driver reads.
    _common.write_json(
        os.path.join(config["result_dir"], f"rank{rank}.json"),
        {
            "rates": rates,
            "rank": rank,
            "threads_found": threads_found,
            "threads_used": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "phase_ms_per_step": {k: 1000 * v / timed for k, v in phases.items()},
            "profile": profile_text,
        },
    )


def ray_rates(
    cfg: Any,
    manifest: Any,
    workers: int,
    cpus_per_worker: float,
    zero: int,
    worker_threads: str,
    warmup: int,
    steps: int,
    repeats: int,
    storage: str,
    profile: int = 0,
) -> dict[str, Any]:
    import ray.train
    from ray.train.torch import TorchTrainer

    from osmd_ray.config import apply_overrides, config_to_dict

    run_cfg = apply_overrides(
        cfg,
        [
            f"train.zero_stage={zero}",
            f"scaling.num_workers={workers}",
            f"scaling.cpus_per_worker={cpus_per_worker}",
        ],
    )
    result_dir = tempfile.mkdtemp(prefix="ranks-", dir=storage)
    trainer = TorchTrainer(
        ray_train_fn,
        train_loop_config={
            "cfg": config_to_dict(run_cfg),
            "manifest_json": manifest.to_json(),
            "worker_threads": worker_threads,
            "warmup": warmup,
            "steps": steps,
            "repeats": repeats,
            "result_dir": result_dir,
            "profile": profile,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers,
            use_gpu=False,
            resources_per_worker={"CPU": cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=f"tp-w{workers}-z{zero}-{int(time.time() * 1000)}", storage_path=storage
        ),
    )
    started = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - started
    ranks = [json.loads(Path(result_dir, f"rank{r}.json").read_text()) for r in range(workers)]
    return {**ranks[0], "wall_s": wall, "per_rank": ranks}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "samples/s of an OS-MD training step under Ray Train + DeepSpeed (1 and 2 CPU "
            "workers, ZeRO 0 and 2) against a plain single-process PyTorch loop on the same "
            "cores; median of repeated runs after warm-up, and the ratio (target >= 0.85)."
        )
    )
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="run config (YAML)")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides key.sub=value")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per setup")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per setup")
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="cores the comparison runs on: plain loop threads, and CPUs shared by the workers",
    )
    parser.add_argument(
        "--worker-threads",
        default="package",
        help=(
            "torch threads inside each Ray worker: 'package' calls osmd_ray.train.loop."
            "set_cpu_threads as train_loop_per_worker does (a real run), 'none' leaves the "
            "count torch starts with in a Ray worker (the behaviour before that fix), or a number"
        ),
    )
    parser.add_argument(
        "--setups",
        default="w1z0,w1z2,w2z0,w2z2",
        help="Ray setups, comma-separated w<workers>z<zero stage> (empty: plain loop only)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        help="after timing, profile this many steps with torch.profiler (tables in the JSON)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (1+2 steps x 2)")
    parser.add_argument(
        "--out", default=str(RESULTS_DIR / "train_throughput.json"), help="JSON output path"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.steps, args.repeats = 1, 2, 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_cfg(args.config, args.set)
    manifest = load_manifest(cfg)
    batch = cfg.data.batch_size
    info = machine()
    say(f"machine: {machine_line(info)}")
    say(f"config {args.config}: method={cfg.method}, batch {batch}/worker, {args.threads} cores")
    timing = dict(warmup=args.warmup, steps=args.steps, repeats=args.repeats)

    results: dict[str, Any] = {"plain": {}, "ray": {}}
    say("plain loop (before Ray starts)")
    before = plain_rates(cfg, manifest, batch, args.threads, **timing, profile=args.profile)
    before_2x = plain_rates(cfg, manifest, 2 * batch, args.threads, **timing)

    setups = [s for s in args.setups.split(",") if s]
    if setups:
        import ray

        from osmd_ray import cluster

        # Send the helpers by value: Ray workers do not have benchmarks/ on their path.
        ray.cloudpickle.register_pickle_by_value(_common)
        cluster.ensure_ray(worker_cpus=2, use_gpu=False)
        storage = tempfile.mkdtemp(prefix="osmd-bench-ray-")
        for setup in setups:
            workers, zero = int(setup[1 : setup.index("z")]), int(setup[setup.index("z") + 1 :])
            cpus = args.threads / workers
            say(f"ray {setup}: {workers} worker(s) x {cpus:g} CPU, ZeRO {zero}")
            metrics = ray_rates(
                cfg,
                manifest,
                workers,
                cpus,
                zero,
                args.worker_threads,
                **timing,
                storage=storage,
                profile=args.profile,
            )
            say(
                f"  rates {[round(r, 1) for r in metrics['rates']]}, torch threads "
                f"{metrics['threads_found']} -> {metrics['threads_used']} "
                f"(OMP_NUM_THREADS={metrics['omp_num_threads']}), {metrics['wall_s']:.0f}s"
            )
            results["ray"][setup] = {
                "workers": workers,
                "cpus_per_worker": cpus,
                "zero_stage": zero,
                "worker_threads_option": args.worker_threads,
                **metrics,
            }
        ray.shutdown()
        say("plain loop (after Ray stopped)")
        after = plain_rates(cfg, manifest, batch, args.threads, **timing)
        after_2x = plain_rates(cfg, manifest, 2 * batch, args.threads, **timing)
    else:
        after, after_2x = {"rates": []}, {"rates": []}

    plain = {
        "rates": before["rates"] + after["rates"],
        "rates_before_ray": before["rates"],
        "rates_after_ray": after["rates"],
        "threads": before["threads"],
        "phase_ms_per_step": before["phase_ms_per_step"],
        "profile": before["profile"],
    }
    plain_2x = {
        "rates": before_2x["rates"] + after_2x["rates"],
        "phase_ms_per_step": before_2x["phase_ms_per_step"],
    }
    base = median(plain["rates"])
    results["plain"] = {f"b{batch}": plain, f"b{2 * batch}": plain_2x}

    base_2x = median(plain_2x["rates"])
    rows = [
        [f"plain PyTorch, {args.threads} threads", batch, base, 1.0, 1.0, "-"],
        [
            f"plain PyTorch, {args.threads} threads",
            2 * batch,
            base_2x,
            base_2x / base,
            1.0,
            "-",
        ],
    ]
    for r in results["ray"].values():
        rate = median(r["rates"])
        same_batch = base if r["workers"] == 1 else base_2x if r["workers"] == 2 else None
        r["median"] = rate
        r["ratio_to_plain"] = rate / base
        r["ratio_to_plain_same_global_batch"] = rate / same_batch if same_batch else None
        r["meets_target"] = rate / base >= TARGET_RATIO
        rows.append(
            [
                f"Ray Train + DeepSpeed, {r['workers']} x {r['cpus_per_worker']:g} CPU, "
                f"ZeRO {r['zero_stage']} (torch threads {r['threads_used']})",
                batch * r["workers"],
                rate,
                rate / base,
                rate / same_batch if same_batch else "-",
                "yes" if r["meets_target"] else "NO",
            ]
        )
    table = markdown_table(
        [
            "setup",
            "global batch",
            "samples/s (median)",
            f"ratio to plain b{batch}",
            "ratio to plain, same global batch",
            ">= 0.85",
        ],
        rows,
    )
    payload = {
        "benchmark": "train_throughput",
        "machine": info,
        "machine_end": machine(),
        "config": args.config,
        "overrides": args.set,
        "timing": timing,
        "target_ratio": TARGET_RATIO,
        "plain_median": base,
        "plain_median_batch_x2": base_2x,
        "results": results,
        "table": table,
    }
    out = write_json(args.out, payload)
    print(f"\n{machine_line(info)}\n{' '.join(sys.argv)}\n\n{table}\n")
    say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
