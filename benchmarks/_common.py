"""Shared helpers of the CPU benchmarks: machine facts, in-memory batches, timing, JSON output.

Every benchmark records *where* and *when* it ran (``machine()``), because the numbers only mean
something next to the core count, the CPU model and the load average at the time.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
DEFAULT_CONFIG = ROOT / "configs" / "osmd_synth.yaml"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict[str, Any]:
    """Cores, CPU model, load average, date and library versions, for the JSON and the table."""
    import torch

    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "load_average_1_5_15": load_average(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def say(message: str) -> None:
    """Progress on stderr, so stdout holds only the table."""
    stamp = dt.datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


def load_cfg(config: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Any:
    from osmd_ray.config import load_config

    return load_config(config, list(overrides))


def load_manifest(cfg: Any) -> Any:
    """The manifest of ``cfg.data.root`` (relative roots resolve from the repository)."""
    from osmd_ray.data.schema import read_manifest

    root = cfg.data.root
    if "://" not in root and not os.path.isabs(root):
        root = str(ROOT / root)
    return read_manifest(root)


def random_batch(manifest: Any, names: Sequence[str], rows: int, seed: int) -> dict[str, Any]:
    """A batch of ``rows`` random samples with the manifest's shapes and dtypes, plus labels.

    Timings do not depend on pixel values; random tensors keep the data in memory and out of
    the measurement (no parquet decoding, no Ray Data).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    batch: dict[str, Any] = {}
    for name in names:
        spec = manifest.modalities[name]
        shape = (rows, *spec.shape)
        if spec.dtype == "uint8":
            batch[name] = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
        else:
            batch[name] = torch.rand(shape, generator=gen) * 8.0
    batch["label"] = torch.randint(0, manifest.num_classes, (rows,), generator=gen)
    return batch


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def time_calls(fn: Callable[[], Any], repeats: int, inner: int = 1) -> list[float]:
    """Seconds per call of ``fn``, ``repeats`` times (each the mean of ``inner`` calls)."""
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        out.append((time.perf_counter() - start) / inner)
    return out


def write_json(path: str | os.PathLike[str], payload: Mapping[str, Any]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    return out


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line(info: Mapping[str, Any]) -> str:
    load = ", ".join(str(v) for v in info["load_average_1_5_15"])
    return (
        f"{info['date_utc']}; nproc={info['nproc']}; {info['cpu_model']}; "
        f"load average {load}; torch {info['torch']}"
    )
