"""Deployment cost: parameters, FLOPs and CPU latency of the OS-MD deployment model against
``ordinary_only`` and ``full_multimodal`` with the same encoders (issue 9, item 2).

Each model is built from the config (``build_model``), exported exactly as a training run
exports it (``osmd_ray.deploy.export_deploy`` of the model's ``deploy_module``) and loaded back
with ``load_deploy``: what is timed is the network a user deploys (eval mode, fresh weights;
latency does not depend on their values). Inputs are random tensors of the manifest's shapes
and dtypes; osmd and ordinary_only take the ordinary modalities, full_multimodal the privileged
ones too.

- Parameters: unique tensors (E_h's stages shared with E_o count once).
- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one forward pass (it counts
  convolutions and matrix products, 2 FLOPs per multiply-add; normalisation and activations
  are not counted), at batch 1 and 64.
- Latency: ``net(batch)`` under ``torch.inference_mode`` with ``--threads`` torch threads;
  the models are timed in turn within each repeat (so a change in machine load hits all of
  them alike), and the median over repeats is reported.

Targets: the osmd deployment model at most 1.5x the latency of ordinary_only, and below
full_multimodal's. Besides the default config, the table shows osmd with
``model.hallucination_shared_stages`` = 1..depth: E_h reuses E_o's first stages, and the
deployment network computes them once for both (``encode_sharing_stages``); and other E_h
shapes (``--e-h``: ``model.hallucination_width`` and ``model.hallucination_depth``), the
full-size E_h of E_o's width and depth among them.

Usage::

    python benchmarks/deploy_latency.py            # full run (~2 min on 2 idle cores)
    python benchmarks/deploy_latency.py --quick    # smoke test

Writes a JSON (``--out``, default benchmarks/results/deploy_latency.json) and prints a
markdown table. Results and commands: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Mapping
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
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

MAX_VS_ORDINARY = 1.5
BATCHES = (1, 64)


def exported_net(cfg: Any, manifest: Any, workdir: str) -> nn.Module:
    """Build the model of ``cfg``, export its deployment network as a run does, load it back."""
    from osmd_ray.deploy import export_deploy, load_deploy
    from osmd_ray.methods import build_model

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, manifest)
    out = tempfile.mkdtemp(prefix=f"{cfg.method}-", dir=workdir)
    export_deploy(
        model,
        os.path.join(out, "deploy"),
        method=cfg.method,
        ordinary=[manifest.modalities[m] for m in cfg.data.ordinary],
        privileged=[manifest.modalities[m] for m in cfg.data.privileged],
        num_classes=manifest.num_classes,
        model_cfg=cfg.model,
        normalization=manifest.normalization,
        task=manifest.task,
        class_names=manifest.class_names,
    )
    return load_deploy(os.path.join(out, "deploy")).net


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in net.parameters()}.values())


def count_flops(net: nn.Module, batch: Mapping[str, Tensor]) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        net(batch)
    return int(counter.get_total_flops())


def profile_table(net: nn.Module, batch: Mapping[str, Tensor], calls: int) -> str:
    """torch.profiler's operator table of ``calls`` forward passes, by self CPU time: which
    operators the latency goes to (at batch 1, mostly the number of them, not their FLOPs)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            net(batch)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Parameters, FLOPs and latency (batch 1 and 64) of the osmd deployment model "
            "against ordinary_only and full_multimodal with the same encoders."
        )
    )
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="run config (YAML)")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides key.sub=value")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats per model")
    parser.add_argument(
        "--calls-b1", type=int, default=20, help="calls per repeat at batch 1 (averaged)"
    )
    parser.add_argument("--calls-b64", type=int, default=3, help="calls per repeat at batch 64")
    parser.add_argument(
        "--no-variants",
        action="store_true",
        help="skip the hallucination_shared_stages and --e-h variants",
    )
    parser.add_argument(
        "--e-h",
        nargs="*",
        default=["1:0", "0.25:0", "1:1"],  # E_o's shape, narrow only, shallow only
        metavar="WIDTH:DEPTH",
        help=(
            "E_h shapes timed as osmd variants: model.hallucination_width:"
            "model.hallucination_depth (0: model.depth); default 1:0 0.25:0 1:1"
        ),
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="CALLS",
        help="after timing, profile CALLS batch-1 calls of each model (torch.profiler tables "
        "by self CPU time, printed and in the JSON)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument(
        "--out", default=str(RESULTS_DIR / "deploy_latency.json"), help="JSON output path"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.calls_b1, args.calls_b64 = 3, 3, 1
    return args


def main(argv: list[str] | None = None) -> int:
    import time

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    base = load_cfg(args.config, args.set)
    manifest = load_manifest(base)
    info = machine()
    say(f"machine: {machine_line(info)}")
    depth = base.model.depth
    workdir = tempfile.mkdtemp(prefix="osmd-bench-deploy-")

    # name -> (network, inputs it reads)
    models: dict[str, tuple[nn.Module, list[str]]] = {}
    osmd_model = load_cfg(args.config, [*args.set, "method=osmd"]).model

    def add(name: str, overrides: list[str]) -> None:
        cfg = load_cfg(args.config, [*args.set, *overrides])
        if name != "osmd" and cfg.method == "osmd" and cfg.model == osmd_model:
            return  # the same network as the "osmd" row
        net = exported_net(cfg, manifest, workdir)
        models[name] = (net, [s.name for s in net.input_modalities])

    for method in ("ordinary_only", "osmd", "full_multimodal"):
        add(method, [f"method={method}"])
    if not args.no_variants and base.model.image_encoder == "small_cnn":
        for k in range(1, depth + 1):
            e_o_shaped = ["model.hallucination_width=1", "model.hallucination_depth=0"]
            shared = [f"model.hallucination_shared_stages={k}", *e_o_shaped]
            add(f"osmd shared_stages={k}", ["method=osmd", *shared])
        for shape in args.e_h:
            width, _, e_h_depth = shape.partition(":")
            stages = int(e_h_depth or 0) or depth
            shape_overrides = [
                "model.hallucination_shared_stages=0",
                f"model.hallucination_width={width}",
                f"model.hallucination_depth={e_h_depth or 0}",
            ]
            add(
                f"osmd E_h width x{float(width):g}, {stages} stages",
                ["method=osmd", *shape_overrides],
            )

    inputs = {
        b: random_batch(manifest, [*base.data.ordinary, *base.data.privileged], b, seed=b)
        for b in BATCHES
    }

    def feed(names: list[str], b: int) -> dict[str, Tensor]:
        return {n: inputs[b][n] for n in names}

    stats: dict[str, dict[str, Any]] = {}
    for name, (net, names) in models.items():
        stats[name] = {
            "parameters": count_parameters(net),
            "inputs": names,
            **{f"flops_b{b}": count_flops(net, feed(names, b)) for b in BATCHES},
            **{f"latency_ms_b{b}": [] for b in BATCHES},
        }
    say(f"{len(models)} models; timing {args.repeats} repeats, {args.threads} thread(s)")
    calls = {1: args.calls_b1, 64: args.calls_b64}
    with torch.inference_mode():
        for net, names in models.values():  # warm-up
            for b in BATCHES:
                for _ in range(2):
                    net(feed(names, b))
        for r in range(args.repeats):
            for b in BATCHES:
                for name, (net, names) in models.items():
                    batch = feed(names, b)
                    start = time.perf_counter()
                    for _ in range(calls[b]):
                        net(batch)
                    stats[name][f"latency_ms_b{b}"].append(
                        1000 * (time.perf_counter() - start) / calls[b]
                    )
            say(f"  repeat {r + 1}/{args.repeats}")

    for s in stats.values():
        for b in BATCHES:
            s[f"median_ms_b{b}"] = median(s[f"latency_ms_b{b}"])
    if args.profile:
        for name, (net, names) in models.items():
            stats[name]["profile_b1"] = profile_table(net, feed(names, 1), args.profile)
            print(f"\n{name}, batch 1, {args.profile} calls:\n{stats[name]['profile_b1']}")
    ref, full = stats["ordinary_only"], stats["full_multimodal"]
    rows = []
    for name, s in stats.items():
        for b in BATCHES:
            s[f"vs_ordinary_b{b}"] = s[f"median_ms_b{b}"] / ref[f"median_ms_b{b}"]
            s[f"vs_full_b{b}"] = s[f"median_ms_b{b}"] / full[f"median_ms_b{b}"]
        if name.startswith("osmd"):
            s["meets_targets"] = all(
                s[f"vs_ordinary_b{b}"] <= MAX_VS_ORDINARY and s[f"vs_full_b{b}"] < 1.0
                for b in BATCHES
            )
        rows.append(
            [
                name,
                s["parameters"],
                s["flops_b1"] / 1e6,
                s["flops_b1"] / ref["flops_b1"],
                s["median_ms_b1"],
                s["vs_ordinary_b1"],
                s["median_ms_b64"],
                s["vs_ordinary_b64"],
                s["vs_full_b64"],
                {True: "yes", False: "NO"}.get(s.get("meets_targets"), "-"),
            ]
        )
    table = markdown_table(
        [
            "model",
            "params",
            "MFLOP/sample",
            "FLOPs / ordinary_only",
            "ms @ b1",
            "x ordinary @ b1",
            "ms @ b64",
            "x ordinary @ b64",
            "x full_multimodal @ b64",
            "targets met",
        ],
        rows,
    )
    payload = {
        "benchmark": "deploy_latency",
        "machine": info,
        "machine_end": machine(),
        "config": args.config,
        "overrides": args.set,
        "threads": args.threads,
        "repeats": args.repeats,
        "calls": {str(b): c for b, c in calls.items()},
        "targets": {"max_vs_ordinary_only": MAX_VS_ORDINARY, "below_full_multimodal": True},
        "models": stats,
        "table": table,
    }
    out = write_json(args.out, payload)
    print(f"\n{machine_line(info)}\n{' '.join(sys.argv)}\n\n{table}\n")
    say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
