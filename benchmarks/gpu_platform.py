"""The GPU platform check (issue 29): the helpers ``benchmarks/gpu_platform.sh`` calls.

The shell script runs the parts (``osmd train`` through Ray Train, the plain PyTorch loop of
``gpu_check.py``, ``osmd sweep``, segmentation, the gpu tests), each under its own timeout;
this module makes their data set, measures the card's own bf16 matmul rate, and turns what
the parts wrote into one JSON file and one Markdown table:

    python benchmarks/gpu_platform.py data --src NYU_PNG_DIR --out WORK/data --rows 1536
    python benchmarks/gpu_platform.py matmul --out WORK/matmul.json
    python benchmarks/gpu_platform.py summarize --work WORK --out OUT

``data`` tiles the real NYU Depth V2 frames of ``../shared/data/nyuv2-mini`` (eight, 640x480
PNGs) into data sets of realistic shape: each row one of the frames, mirrored and shifted by a
pass-specific amount, so no two rows of a shard are byte-equal. ``cls``: the classification
task the plain loop also runs (label: the frame's most frequent labelled class, 13 classes),
``seg``: the frames' own per-pixel labels, ``sweep``: a smaller ``cls`` at a quarter of the
pixels for the packed sweep.

Figures of ``summarize``, per ``osmd train`` run, from its history.json (the last epoch,
the first being warm-up: cuDNN's autotuning, the data pipeline's start): samples/s, the share
of the epoch's training time spent waiting for the next batch, the peak GPU memory, and the
achieved TFLOP/s (the FLOPs of one training step, counted by ``gpu_check.py`` on the same
config, times the steps per second); the ratio to the plain loop's samples/s at the same
batch, against the issue's bars (0.9 and 5%).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from osmd_ray.data.nyuv2 import import_nyuv2, parse_size  # noqa: E402
from osmd_ray.data.reading import read_split_numpy  # noqa: E402
from osmd_ray.data.schema import IGNORE_INDEX, read_manifest  # noqa: E402
from osmd_ray.data.writer import write_dataset  # noqa: E402

SAMPLES_RATIO_BAR = 0.9
DATA_WAIT_BAR = 0.05
TRAIN_RUNS = ("zero0", "zero2")


def nyu_frames(src: str, size: tuple[int, int], scratch: Path) -> dict[str, np.ndarray]:
    """Every frame of the PNG layout at ``src``, imported by the product at ``size``."""
    import_nyuv2(src, str(scratch), size=size, overwrite=True, progress=False)
    manifest = read_manifest(str(scratch))
    parts = [
        read_split_numpy(str(scratch), split, ["rgb", "depth", "label"])
        for split in manifest.splits
    ]
    return {k: np.concatenate([p[k] for p in parts]) for k in ("rgb", "depth", "label")}


def tiled(frames: dict[str, np.ndarray], rows: int, seed: int) -> dict[str, np.ndarray]:
    """``rows`` rows cycling through the frames, pass ``p`` mirrored when odd and rolled
    sideways by ``37 p + 11 seed`` pixels (37 is prime to the widths used, so rows stay
    distinct for ``width`` passes), so that rows differ while staying real sensor data."""
    n, width = frames["rgb"].shape[0], frames["rgb"].shape[-1]
    out = {k: np.empty((rows, *v.shape[1:]), v.dtype) for k, v in frames.items()}
    for i in range(rows):
        passes = i // n
        shift = (37 * passes + 11 * seed) % width
        for k, v in frames.items():
            row = v[i % n][..., ::-1] if passes % 2 else v[i % n]
            out[k][i] = np.roll(row, shift, axis=-1)
    return out


def dominant_class(label: np.ndarray, classes: int) -> np.ndarray:
    """Per row, the most frequent labelled class of a (N, H, W) label map."""
    counts = [np.bincount(m[m != IGNORE_INDEX].ravel(), minlength=classes) for m in label]
    return np.asarray([int(c.argmax()) for c in counts], dtype=np.int64)


def write_tiled(
    frames: dict[str, np.ndarray], out: str, task: str, rows: dict[str, int], classes: int
) -> None:
    splits = {}
    for index, (split, n) in enumerate(rows.items()):
        data = tiled(frames, n, seed=index)
        if task == "classification":
            data["label"] = dominant_class(data["label"], classes)
        splits[split] = data
    write_dataset(
        out,
        splits,
        task=task,
        num_classes=classes,
        ignore_index=IGNORE_INDEX,
        kinds={"rgb": "image", "depth": "image"},
        description=f"nyuv2-mini frames tiled for benchmarks/gpu_platform.sh ({task})",
        overwrite=True,
        progress=False,
    )


def cmd_data(args: argparse.Namespace) -> int:
    out = Path(args.out)
    started = time.perf_counter()
    frames = nyu_frames(args.src, args.size, out / "_import")
    small = nyu_frames(args.src, (args.size[0] // 2, args.size[1] // 2), out / "_import_small")
    held_out = {"val": args.eval_rows, "test": args.eval_rows}
    write_tiled(frames, str(out / "cls"), "classification", {"train": args.rows, **held_out}, 13)
    write_tiled(frames, str(out / "seg"), "segmentation", {"train": args.seg_rows, **held_out}, 13)
    sweep_rows = {"train": args.sweep_rows, **held_out}
    write_tiled(small, str(out / "sweep"), "classification", sweep_rows, 13)
    print(
        f"gpu_platform: data sets cls, seg, sweep in {out} ({time.perf_counter() - started:.0f}s)"
    )
    return 0


def cmd_matmul(args: argparse.Namespace) -> int:
    """The card's bf16 rate on a large matrix product: the ceiling this machine shows."""
    import torch

    if not torch.cuda.is_available():
        result: dict[str, Any] = {"device": "cpu", "tflops_per_s": None}
    else:
        n = 8192
        a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        started, repeats = time.perf_counter(), 20
        for _ in range(repeats):
            a @ b
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - started) / repeats
        result = {"device": torch.cuda.get_device_name(), "tflops_per_s": 2 * n**3 / seconds / 1e12}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_figures(run_dir: Path, step_flops: float | None) -> dict[str, Any] | None:
    """The last epoch of an ``osmd train`` run folder as throughput figures."""
    history = read_json(run_dir / "history.json")
    if not history:
        return None
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    last = history[-1]
    steps = last["step"] - (history[-2]["step"] if len(history) > 1 else 0)
    span = last["data_wait"]["span_s"]
    batch = config.get("data", {}).get("batch_size")
    workers = max(1, config.get("scaling", {}).get("num_workers", 1))
    samples = steps * batch * workers if batch else None
    return {
        "epochs": len(history),
        "steps_last_epoch": steps,
        "batch": batch,
        "samples_per_s": samples / span if samples and span > 0 else None,
        "data_wait_share": last["data_wait"]["share"],
        "first_batch_wait_s": last["data_wait"]["first_batch_wait_s"],
        "peak_memory_gib": last.get("gpu_peak_memory_gib"),
        "tflops_per_s": step_flops * steps / span / 1e12 if step_flops and span > 0 else None,
    }


def sweep_figures(sweep_dir: Path, wall_s: float | None) -> dict[str, Any] | None:
    try:
        with open(sweep_dir / "trials.csv", newline="") as f:
            trials = list(csv.DictReader(f))
    except OSError:
        return None
    epochs_s = sum(float(t.get("epochs_s") or 0) for t in trials)
    return {
        "trials": len(trials),
        "completed": sum(t.get("status") == "COMPLETED" for t in trials),
        "wall_s": wall_s,
        "trial_epochs_s": round(epochs_s, 1),
        # Above 1: trials trained at the same time on the one GPU.
        "packing": round(epochs_s / wall_s, 2) if wall_s else None,
    }


def summary(work: Path) -> dict[str, Any]:
    # In the order the parts ran.
    ran = sorted((work / "status").glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
    status = {p.stem: read_json(p) for p in ran}
    plain = {p.stem: read_json(p) for p in sorted((work / "plain").glob("*.json"))}
    base = plain.get("torch") or {}
    flops = base.get("step_flops")
    train = {name: run_figures(work / "runs" / name, flops) for name in TRAIN_RUNS}
    for figures in train.values():
        if figures and figures["samples_per_s"] and base.get("samples_per_s"):
            figures["vs_plain"] = figures["samples_per_s"] / base["samples_per_s"]
    seg = run_figures(work / "runs" / "seg", None)
    sweep = sweep_figures(work / "sweep", (status.get("sweep") or {}).get("seconds"))
    return {
        "machine": (work / "machine.txt").read_text() if (work / "machine.txt").exists() else "",
        "matmul": read_json(work / "matmul.json"),
        "parts": status,
        "plain": plain,
        "train": train,
        "sweep": sweep,
        "segmentation": seg,
        "gpu_tests": (work / "gpu_tests.txt").read_text().strip()
        if (work / "gpu_tests.txt").exists()
        else None,
    }


def _f(value: Any, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(s: dict[str, Any]) -> str:
    peak = (s.get("matmul") or {}).get("tflops_per_s")
    lines = ["# GPU platform check (benchmarks/gpu_platform.sh)", "", "```", s["machine"].strip()]
    lines += ["```", "", f"bf16 8192^3 matmul on this card: {_f(peak)} TFLOP/s", ""]
    lines += ["| part | status | seconds |", "|---|---|---|"]
    for name, st in s["parts"].items():
        if st["rc"] == -1:
            state = "skipped: budget spent"
        elif st["timed_out"]:
            state = "timed out"
        else:
            state = "ok" if st["rc"] == 0 else f"rc {st['rc']}"
        lines.append(f"| {name} | {state} | {st['seconds']:.0f} |")
    lines += ["", "Plain PyTorch loop (gpu_check.py, batch on the GPU):", ""]
    lines += ["| variant | samples/s | TFLOP/s | peak GiB |", "|---|---|---|---|"]
    for name, r in s["plain"].items():
        if r:
            row = f"| {name} | {_f(r['samples_per_s'], '.0f')} | {_f(r['tflops_per_s'])} | "
            lines.append(row + f"{_f(r['peak_memory_gib'])} |")
    lines += [
        "",
        "`osmd train` through Ray Train, one GPU worker, Ray Data streaming (last epoch):",
    ]
    lines += [
        "",
        f"| run | samples/s | vs plain (bar {SAMPLES_RATIO_BAR:g}) | data wait (bar "
        f"{DATA_WAIT_BAR:.0%}) | TFLOP/s | of matmul peak "
        "| peak GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in s["train"].items():
        if r:
            share = r["tflops_per_s"] / peak if r["tflops_per_s"] and peak else None
            lines.append(
                f"| {name} | {_f(r['samples_per_s'], '.0f')} | {_f(r.get('vs_plain'), '.2f')} | "
                f"{_f(100 * r['data_wait_share'], '.1f')}% | {_f(r['tflops_per_s'])} | "
                f"{_f(share, '.0%')} | {_f(r['peak_memory_gib'])} |"
            )
    if s["sweep"]:
        w = s["sweep"]
        lines += ["", f"Sweep: {w['trials']} trials ({w['completed']} completed) in "]
        lines[-1] += f"{_f(w['wall_s'], '.0f')} s, packing {_f(w['packing'], '.2f')}"
    if s["segmentation"]:
        g = s["segmentation"]
        lines += ["", f"Segmentation: {_f(g['samples_per_s'], '.1f')} samples/s, "]
        lines[-1] += f"peak {_f(g['peak_memory_gib'])} GiB"
    lines += ["", f"gpu tests: {s['gpu_tests'] or 'n/a'}", ""]
    return "\n".join(lines)


def cmd_summarize(args: argparse.Namespace) -> int:
    s = summary(Path(args.work))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "platform.json").write_text(json.dumps(s, indent=1) + "\n")
    text = markdown(s)
    (out / "platform.md").write_text(text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="tile the NYUv2 frames into the check's data sets")
    data.add_argument("--src", required=True, help="NYU Depth V2 PNG folder (nyuv2-mini)")
    data.add_argument("--out", required=True, help="folder for the data sets cls, seg, sweep")
    data.add_argument("--size", type=parse_size, default=(480, 640), help="HxW (480x640)")
    data.add_argument("--rows", type=int, default=1536, help="cls training rows (1536)")
    data.add_argument("--seg-rows", type=int, default=128, help="seg training rows (128)")
    data.add_argument("--sweep-rows", type=int, default=512, help="sweep training rows (512)")
    data.add_argument("--eval-rows", type=int, default=64, help="val and test rows (64)")
    data.set_defaults(func=cmd_data)
    matmul = commands.add_parser("matmul", help="the card's bf16 matrix-product rate")
    matmul.add_argument("--out", required=True, help="JSON file")
    matmul.set_defaults(func=cmd_matmul)
    summarize = commands.add_parser("summarize", help="platform.json and platform.md")
    summarize.add_argument("--work", required=True, help="the script's work folder")
    summarize.add_argument("--out", required=True, help="folder for platform.json and .md")
    summarize.set_defaults(func=cmd_summarize)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
