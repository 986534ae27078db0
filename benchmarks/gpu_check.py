"""One OS-MD training configuration on one GPU: plain PyTorch against DeepSpeed ZeRO-2 and 3.

Issue 9's GPU check. Each call measures one ``--mode`` in its own process (so peak memory is
that mode's alone) and writes one JSON file; ``benchmarks/gpu_check.sh`` runs every mode and
``--summarize`` turns the JSON files into a Markdown table.

What is measured, per mode, for the same model, batch and data:

- ``torch``: a plain single-process loop, fp32 weights under ``torch.autocast(bfloat16)``,
  AdamW, gradient clipping — what a hand-written PyTorch script does;
- ``zero2`` / ``zero3``: the package's own DeepSpeed engine (``deepspeed_config`` of
  ``osmd_ray.train.loop``, bf16 weights with fp32 master copies), one rank.

Both run the package's ``build_model`` and ``compute_losses``: the OS-MD objective with its three
encoders (E_o, E_p, E_h), the CTN and the heads. The batch lives on the GPU before timing, so
data loading is out of the figure (Ray Data's share is measured on CPU by ``io_bench``/
``train_throughput``). Ray itself is not on the GPU machine; Ray Train's overhead over a bare
DeepSpeed rank is measured on CPU by ``train_throughput.py``.

Figures: samples per second (median over timed windows after warm-up), achieved TFLOP/s (the
FLOPs of one training step counted by ``torch.utils.flop_counter`` divided by the median step
time), and peak GPU memory (``torch.cuda.max_memory_allocated``).

Example (what gpu_check.sh runs)::

    python benchmarks/gpu_check.py --mode zero2 --out /tmp/gpu/zero2.json
    python benchmarks/gpu_check.py --summarize /tmp/gpu/*.json

A CPU smoke run of the same code: ``--device cpu --quick`` (fp32, gloo).

``--config FILE KEY=VALUE ...`` measures the run config ``osmd train`` would run instead,
at its dataset's image shapes and its batch (what ``benchmarks/gpu_platform.sh`` compares
``osmd train`` with); ``--channels-last`` and ``--compile`` (``torch.compile``, mode torch)
measure those layouts of the plain loop.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from osmd_ray.blocks.stages import part_parameter_groups  # noqa: E402
from osmd_ray.config import Config, load_config  # noqa: E402
from osmd_ray.data.schema import Manifest, ModalitySpec, read_manifest  # noqa: E402
from osmd_ray.methods import build_model  # noqa: E402
from osmd_ray.train.epoch import batch_losses, build_optimizer  # noqa: E402
from osmd_ray.train.loop import deepspeed_config  # noqa: E402

MODES = ("torch", "zero2", "zero3")
# The image configuration DESIGN and issue 4 give the NYUv2 segmentation config: 480x640
# RGB-D, a ResNet-34-class timm encoder, bf16. Segmentation heads are not built yet, so the
# check runs the classification OS-MD on that image configuration (13 classes, as NYUv2-13).
DEFAULT_SIZE = (480, 640)
DEFAULT_ENCODER = "timm:resnet34"
NUM_CLASSES = 13


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected HxW, e.g. 480x640") from None
    return h, w


def rgbd_manifest(height: int, width: int) -> Manifest:
    """An in-memory manifest of an RGB-D classification set (what build_model reads)."""
    return Manifest(
        schema_version=1,
        task="classification",
        num_classes=NUM_CLASSES,
        ignore_index=-100,
        label_shape=(),
        modalities={
            "rgb": ModalitySpec("rgb", "image", (3, height, width), "uint8"),
            "depth": ModalitySpec("depth", "image", (1, height, width), "float32"),
        },
        splits={},
        normalization={
            "rgb": {"mean": [120.0, 110.0, 100.0], "std": [60.0, 60.0, 60.0]},
            "depth": {"mean": [2.5], "std": [1.0]},
        },
    )


def run_config(args: argparse.Namespace, zero_stage: int) -> Config:
    return load_config(
        REPO / "configs" / "osmd_synth.yaml",
        [
            f"model.image_encoder={args.encoder}",
            # Dense depth decoding needs a small_cnn feature map; timm encoders use pooled.
            "model.recon_mode=" + ("dense" if args.encoder == "small_cnn" else "pooled"),
            *(
                []
                if args.encoder == "small_cnn"
                else ["model.hallucination_width=1", "model.hallucination_depth=0"]
            ),
            f"data.batch_size={args.batch}",
            f"train.zero_stage={zero_stage}",
            f"train.precision={'bf16' if args.device == 'cuda' else 'fp32'}",
            f"scaling.use_gpu={'true' if args.device == 'cuda' else 'false'}",
        ],
    )


def config_run(args: argparse.Namespace, zero_stage: int) -> tuple[Config, Manifest]:
    """``--config`` with its overrides: the run config ``osmd train`` would run (the mode
    sets ZeRO stage, precision and device) and its dataset's manifest."""
    cfg = load_config(
        args.config,
        [
            *args.overrides,
            f"train.zero_stage={zero_stage}",
            f"train.precision={'bf16' if args.device == 'cuda' else 'fp32'}",
            f"scaling.use_gpu={'true' if args.device == 'cuda' else 'false'}",
        ],
    )
    return cfg, read_manifest(cfg.data.root)


def make_batch(
    batch: int, manifest: Manifest, device: torch.device, channels_last: bool = False
) -> dict[str, torch.Tensor]:
    """Random RGB-D samples of ``manifest``'s shapes, moved to ``device`` once, before any
    timing (images channels-last if asked)."""
    g = torch.Generator().manual_seed(0)
    rgb, depth = manifest.modalities["rgb"].shape, manifest.modalities["depth"].shape
    label_shape = (batch, *manifest.label_shape)
    cpu = {
        "rgb": torch.randint(0, 256, (batch, *rgb), generator=g, dtype=torch.uint8),
        "depth": torch.rand((batch, *depth), generator=g) * 5.0,
        "label": torch.randint(0, manifest.num_classes, label_shape, generator=g),
    }
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return {
        k: v.to(device).contiguous(memory_format=layout) if v.dim() == 4 else v.to(device)
        for k, v in cpu.items()
    }


def step_losses(model: Any, batch: dict[str, torch.Tensor], cfg: Config) -> torch.Tensor:
    return batch_losses(model(batch), batch, cfg)["total"]


def count_step_flops(model: Any, batch: dict[str, torch.Tensor], cfg: Config, autocast: Any) -> int:
    """FLOPs of one forward and backward pass (matmuls and convolutions, as counted by torch)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        with autocast():
            loss = step_losses(model, batch, cfg)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_windows(
    step: Any, device: torch.device, warmup: int, windows: int, steps: int
) -> list[float]:
    """Seconds per step of each timed window, after ``warmup`` untimed steps."""
    for _ in range(warmup):
        step()
    synchronize(device)
    per_step = []
    for _ in range(windows):
        started = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        per_step.append((time.perf_counter() - started) / steps)
    return per_step


def measure(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: --device cuda but torch sees no GPU (use --device cpu)")
    zero_stage = {"torch": 0, "zero2": 2, "zero3": 3}[args.mode]
    if args.config:
        cfg, manifest = config_run(args, zero_stage)
        args.batch, args.encoder = cfg.data.batch_size, cfg.model.image_encoder
    else:
        cfg, manifest = run_config(args, zero_stage), rgbd_manifest(*args.size)
    height, width = manifest.modalities["rgb"].shape[1:]
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    batch = make_batch(args.batch, manifest, device, args.channels_last)
    model = build_model(cfg, manifest).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    parameters = sum(p.numel() for p in model.parameters())
    bf16 = device.type == "cuda"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    # Counted on the fp32 module under autocast, before DeepSpeed wraps it: the same
    # convolutions and matmuls run in every mode.
    flops = count_step_flops(model, batch, cfg, autocast)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    if args.mode == "torch":
        # Compiled after the FLOP count (counted on the eager module: the same operations).
        net = torch.compile(model) if args.compile else model
        optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=cfg.train.lr,
            weight_decay=cfg.train.weight_decay,
            fused=device.type == "cuda",
        )

        def step() -> None:
            with autocast():
                loss = step_losses(net, batch, cfg)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    else:
        import deepspeed

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + zero_stage))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        # The same client optimiser the workers build (osmd_ray.train.loop).
        optimizer = build_optimizer(part_parameter_groups(model)[1], cfg)
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(cfg, bf16)
        )

        def step() -> None:
            loss = step_losses(engine, batch, cfg)
            engine.backward(loss)
            engine.step()

    per_step = timed_windows(step, device, args.warmup, args.windows, args.steps)
    median = statistics.median(per_step)
    result = {
        "mode": args.mode,
        "variant": variant_name(args),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "encoder": args.encoder,
        "size": f"{height}x{width}",
        "batch": args.batch,
        "parameters": parameters,
        "step_flops": flops,
        "step_s_windows": per_step,
        "step_s_median": median,
        "samples_per_s": args.batch / median,
        "tflops_per_s": flops / median / 1e12,
        "peak_memory_gib": (
            torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        ),
    }
    if args.mode != "torch":
        import deepspeed

        result["deepspeed"] = deepspeed.__version__
    return result


def variant_name(args: argparse.Namespace) -> str:
    """What a run changed from the eager, contiguous default ("" for none)."""
    return "+".join(
        n for n, on in (("channels_last", args.channels_last), ("compile", args.compile)) if on
    )


def summarize(paths: list[str]) -> str:
    rows = [json.loads(Path(p).read_text()) for p in paths]
    rows.sort(key=lambda r: (MODES.index(r["mode"]), r.get("variant", "")))
    base = next((r for r in rows if r["mode"] == "torch" and not r.get("variant")), None)
    first = rows[0]
    lines = [
        f"{first['device']}, torch {first['torch']}, {first['encoder']} encoders at "
        f"{first['size']}, batch {first['batch']}, {first['parameters'] / 1e6:.1f} M parameters, "
        f"{first['step_flops'] / 1e12:.2f} TFLOP per training step (counted)",
        "",
        "| mode | samples/s | vs plain PyTorch | TFLOP/s | peak memory (GiB) | step (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        mode = r["mode"] + (f" {r['variant']}" if r.get("variant") else "")
        ratio = f"{r['samples_per_s'] / base['samples_per_s']:.2f}" if base else "n/a"
        memory = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "n/a"
        lines.append(
            f"| {mode} | {r['samples_per_s']:.0f} | {ratio} | {r['tflops_per_s']:.1f} | "
            f"{memory} | {r['step_s_median'] * 1e3:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Run every mode with benchmarks/gpu_check.sh (its header: the machine set-up).",
    )
    parser.add_argument("--mode", choices=MODES, help="what to measure (one per process)")
    parser.add_argument("--out", help="JSON file to write the figures to")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--size", type=parse_size, default=DEFAULT_SIZE, help="image HxW (480x640)")
    parser.add_argument("--encoder", default=DEFAULT_ENCODER, help="model.image_encoder")
    parser.add_argument("--batch", type=int, default=32, help="samples per step (32)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (10)")
    parser.add_argument("--windows", type=int, default=5, help="timed windows (5); median taken")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed window (10)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 32x32 small_cnn, batch 8, 2 warm-up steps, 2 windows of 2 steps",
    )
    parser.add_argument(
        "--channels-last", action="store_true", help="weights and images channels-last"
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the network (mode torch only)"
    )
    parser.add_argument(
        "--config",
        metavar="YAML",
        help="measure this run config and its dataset's image shapes instead (batch and "
        "encoder from the config; --size, --encoder, --batch are then ignored)",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="overrides of --config, as osmd train"
    )
    parser.add_argument("--summarize", nargs="+", metavar="JSON", help="print the table of runs")
    args = parser.parse_args(argv)
    if args.overrides and not args.config:
        parser.error("KEY=VALUE overrides need --config")
    if args.compile and args.mode != "torch":
        parser.error("--compile measures the plain loop only (--mode torch)")
    if args.summarize:
        print(summarize(args.summarize), end="")
        return 0
    if args.mode is None:
        parser.error("--mode is required (or --summarize)")
    if args.quick:
        args.size, args.encoder, args.batch = (32, 32), "small_cnn", 8
        args.warmup, args.windows, args.steps = 2, 2, 2
    what = (
        f"{args.config} {' '.join(args.overrides)}"
        if args.config
        else f"{args.encoder} {args.size}, batch {args.batch}"
    )
    print(f"gpu_check: {args.mode} on {args.device}, {what}", flush=True)
    result = measure(args)
    text = json.dumps(result, indent=2)
    print(text, flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
