"""Cost of the JMMD term against batch size, quadratic vs linear-time estimator (issue 9, item 3).

Part 1, the term alone: ``osmd_ray.blocks.losses.alignment_loss`` (the ``jan`` term exactly
as training computes it: JMMD over (features, softmax of H_p's logits), privileged side
detached), forward + backward, for batch sizes 16..4096 and both ``loss.jmmd_estimator``
values. Features have ``model.feature_dim`` columns and the logits the dataset's class count.

- time: median over ``--repeats`` repeats (``--threads`` torch threads; a call that takes over
  a second, the quadratic estimator at thousands of rows, is repeated twice only);
- peak memory: the highest total of tensor bytes the CPU allocator held during one
  forward + backward above what it held before, from ``torch.profiler`` with
  ``profile_memory=True`` (allocations and frees replayed in time order; a separate, untimed
  pass, since profiling slows the ops down).

"Linear starts to pay" is the smallest batch from which the linear estimator is faster at
every larger batch measured.

Part 2, share of a training step at the config's batch size: a plain PyTorch training step of
the config's model (build_model, compute_losses, backward, AdamW) with ``loss.w_jan=0`` (the
default: ``compute_losses`` skips a zero-weight term; the benchmark counts the calls to confirm
it), ``w_jan=1`` quadratic and ``w_jan=1`` linear, timed in turn within each repeat. The share
is the term's own time (part 1's measurement at that batch) over the ``w_jan=1`` step time,
and, as a cross-check, the step time difference ``(t[w_jan=1] - t[w_jan=0]) / t[w_jan=1]``.
Target: <= 10%.

Usage::

    python benchmarks/jmmd_cost.py            # full run (minutes: batch 4096 dominates)
    python benchmarks/jmmd_cost.py --quick    # smoke test

Writes a JSON (``--out``, default benchmarks/results/jmmd_cost.json) and prints markdown
tables. Results and commands: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any

import torch
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
from torch.profiler import ProfilerActivity, profile

TARGET_SHARE = 0.10
ESTIMATORS = ("quadratic", "linear")
SIZES = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def term_inputs(n: int, dim: int, classes: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "z_p": torch.randn(n, dim, generator=gen),
        "z_h": (torch.randn(n, dim, generator=gen) + 0.3).requires_grad_(),
        "priv_logits": torch.randn(n, classes, generator=gen),
        "priv_logits_h": torch.randn(n, classes, generator=gen).requires_grad_(),
    }


def term_step(inputs: dict[str, torch.Tensor], loss_cfg: Any) -> float:
    """One forward + backward of the jan term, as compute_losses calls it."""
    from osmd_ray.blocks.losses import alignment_loss

    for key in ("z_h", "priv_logits_h"):
        inputs[key].grad = None
    value = alignment_loss(
        inputs["z_p"], inputs["z_h"], inputs["priv_logits"], inputs["priv_logits_h"], loss_cfg
    )
    value.backward()
    return float(value.detach())


def peak_bytes(fn: Any) -> int:
    """Peak of the tensor bytes allocated (net of frees) while ``fn`` runs, on the CPU."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def time_term(n: int, loss_cfg: Any, dim: int, classes: int, repeats: int) -> dict[str, Any]:
    inputs = term_inputs(n, dim, classes, seed=n)
    start = time.perf_counter()
    term_step(inputs, loss_cfg)  # warm-up, and a first estimate of the time
    single = time.perf_counter() - start
    # Enough calls per repeat that one repeat lasts >= ~20 ms (small batches take microseconds);
    # calls of over a second (the quadratic estimator at thousands of rows) are repeated twice.
    calls = max(1, min(200, int(0.02 / max(single, 1e-6))))
    if single > 1.0:
        repeats = min(repeats, 2)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            term_step(inputs, loss_cfg)
        times.append((time.perf_counter() - start) / calls)
    return {
        "ms": 1000 * median(times),
        "ms_all": [1000 * t for t in times],
        "calls_per_repeat": calls,
        "repeats": repeats,
        "peak_mib": peak_bytes(lambda: term_step(inputs, loss_cfg)) / 2**20,
    }


def step_share(cfg: Any, manifest: Any, steps: int, repeats: int) -> dict[str, Any]:
    """Training step time with w_jan=0, and w_jan=1 for each estimator, timed in turn."""
    import osmd_ray.blocks.losses as losses_mod
    from osmd_ray.blocks.losses import compute_losses
    from osmd_ray.blocks.nets import privileged_mask
    from osmd_ray.blocks.stages import part_parameter_groups
    from osmd_ray.methods import build_model

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, manifest)
    model.train()
    _, groups = part_parameter_groups(model)
    optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    params = [p for g in groups for p in g["params"]]
    names = [*cfg.data.ordinary, *cfg.data.privileged]
    batch = random_batch(manifest, names, cfg.data.batch_size, seed=0)
    variants = {
        "w_jan=0 (default)": dataclasses.replace(cfg.loss, w_jan=0.0),
        "w_jan=1 quadratic": dataclasses.replace(cfg.loss, w_jan=1.0, jmmd_estimator="quadratic"),
        "w_jan=1 linear": dataclasses.replace(cfg.loss, w_jan=1.0, jmmd_estimator="linear"),
    }
    # Count the (J)MMD calls, to show whether a variant computes the term at all.
    calls = {name: 0 for name in variants}
    current = {"name": ""}
    real_jmmd, real_mmd = losses_mod.jmmd, losses_mod.mmd

    def counted(fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[current["name"]] += 1
            return fn(*args, **kwargs)

        return wrapper

    def step(loss_cfg: Any) -> None:
        outputs = model(batch)
        losses = compute_losses(
            outputs,
            batch["label"].long(),
            privileged_mask(batch, cfg.data.privileged),
            cfg.method,
            loss_cfg,
        )
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(losses["total"].detach())

    times: dict[str, list[float]] = {name: [] for name in variants}
    losses_mod.jmmd, losses_mod.mmd = counted(real_jmmd), counted(real_mmd)
    try:
        for name, loss_cfg in variants.items():  # warm-up, and one counted step each
            current["name"] = name
            step(loss_cfg)
        counted_calls = dict(calls)
        for r in range(repeats):
            for name, loss_cfg in variants.items():
                current["name"] = name
                start = time.perf_counter()
                for _ in range(steps):
                    step(loss_cfg)
                times[name].append((time.perf_counter() - start) / steps)
            say(f"  step timing repeat {r + 1}/{repeats}")
    finally:
        losses_mod.jmmd, losses_mod.mmd = real_jmmd, real_mmd
    return {
        name: {
            "ms": 1000 * median(t),
            "ms_all": [1000 * x for x in t],
            "alignment_calls_per_step": counted_calls[name],
        }
        for name, t in times.items()
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Time and peak memory of the JMMD term (forward + backward) against batch size for "
            "the quadratic and linear-time estimators, and its share of a training step."
        )
    )
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="run config (YAML)")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides key.sub=value")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument(
        "--sizes", type=int, nargs="*", default=list(SIZES), help="batch sizes of part 1"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (both parts)")
    parser.add_argument("--steps", type=int, default=4, help="training steps per timed repeat")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument(
        "--out", default=str(RESULTS_DIR / "jmmd_cost.json"), help="JSON output path"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes = [s for s in args.sizes if s <= 512]
        args.repeats, args.steps = 2, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_cfg(args.config, args.set)
    manifest = load_manifest(cfg)
    info = machine()
    say(f"machine: {machine_line(info)}")
    dim, classes = cfg.model.feature_dim, manifest.num_classes
    say(f"alignment={cfg.loss.alignment}, features {dim}, classes {classes}, {args.threads} thr")

    term: dict[str, dict[int, Any]] = {e: {} for e in ESTIMATORS}
    for n in sorted(set(args.sizes) | {cfg.data.batch_size}):
        for estimator in ESTIMATORS:
            loss_cfg = dataclasses.replace(cfg.loss, jmmd_estimator=estimator, w_jan=1.0)
            term[estimator][n] = time_term(n, loss_cfg, dim, classes, args.repeats)
        q, lin = term["quadratic"][n], term["linear"][n]
        say(
            f"  n={n}: quadratic {q['ms']:.3f} ms {q['peak_mib']:.2f} MiB, "
            f"linear {lin['ms']:.3f} ms {lin['peak_mib']:.2f} MiB"
        )
    sizes = sorted(term["quadratic"])
    pays_from = None
    for n in reversed(sizes):
        if term["linear"][n]["ms"] < term["quadratic"][n]["ms"]:
            pays_from = n
        else:
            break

    say(f"training step at batch {cfg.data.batch_size}")
    steps = step_share(cfg, manifest, args.steps, args.repeats)
    b = cfg.data.batch_size
    shares = {}
    for estimator in ESTIMATORS:
        step_ms = steps[f"w_jan=1 {estimator}"]["ms"]
        shares[estimator] = {
            "term_ms": term[estimator][b]["ms"],
            "step_ms": step_ms,
            "share_direct": term[estimator][b]["ms"] / step_ms,
            "share_step_difference": (step_ms - steps["w_jan=0 (default)"]["ms"]) / step_ms,
        }
        shares[estimator]["meets_target"] = shares[estimator]["share_direct"] <= TARGET_SHARE

    size_rows = [
        [
            n,
            term["quadratic"][n]["ms"],
            term["linear"][n]["ms"],
            term["quadratic"][n]["ms"] / term["linear"][n]["ms"],
            term["quadratic"][n]["peak_mib"],
            term["linear"][n]["peak_mib"],
        ]
        for n in sizes
    ]
    size_table = markdown_table(
        [
            "batch",
            "quadratic ms",
            "linear ms",
            "quadratic / linear",
            "quadratic peak MiB",
            "linear peak MiB",
        ],
        size_rows,
    )
    step_rows = [[name, s["ms"], s["alignment_calls_per_step"]] for name, s in steps.items()]
    step_table = markdown_table(
        [f"training step, batch {b}", "ms (median)", "(J)MMD calls per step"], step_rows
    )
    share_rows = [
        [
            e,
            s["term_ms"],
            s["step_ms"],
            100 * s["share_direct"],
            100 * s["share_step_difference"],
            "yes" if s["meets_target"] else "NO",
        ]
        for e, s in shares.items()
    ]
    share_table = markdown_table(
        [
            f"estimator (w_jan=1, batch {b})",
            "term ms",
            "step ms",
            "share % (term / step)",
            "share % (step difference)",
            "<= 10%",
        ],
        share_rows,
    )
    payload = {
        "benchmark": "jmmd_cost",
        "machine": info,
        "machine_end": machine(),
        "config": args.config,
        "overrides": args.set,
        "threads": args.threads,
        "repeats": args.repeats,
        "alignment": cfg.loss.alignment,
        "feature_dim": dim,
        "num_classes": classes,
        "term": {e: {str(n): v for n, v in r.items()} for e, r in term.items()},
        "linear_faster_from_batch": pays_from,
        "steps": steps,
        "shares": shares,
        "target_share": TARGET_SHARE,
        "tables": {"sizes": size_table, "steps": step_table, "shares": share_table},
    }
    out = write_json(args.out, payload)
    pays = f"linear is faster from batch {pays_from} on" if pays_from else "linear never faster"
    print(
        f"\n{machine_line(info)}\n{' '.join(sys.argv)}\n\n{size_table}\n\n{pays}\n\n"
        f"{step_table}\n\n{share_table}\n"
    )
    say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
