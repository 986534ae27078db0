"""Data input throughput: the Ray Data pipeline into two Ray Train workers against pyarrow.

What is measured (issue 6, item 5):

- ``pyarrow limit``: one process reads the training split's shards one after another with
  ``pyarrow.parquet.read_table`` (the columns training uses) and decodes them to torch tensors
  (``column_to_numpy`` + ``torch.from_numpy``): what a single reader can do at best.
- ``ray streamed``: the package's read path for datasets above ``data.in_memory_mb``:
  ``osmd_ray.data.reading.read_split`` (seeded file shuffle), handed to a ``TorchTrainer`` with
  2 CPU workers (Ray Train splits it with ``streaming_split(equal=True)``); each worker consumes
  ``get_dataset_shard("train").iter_torch_batches`` with the arguments of
  ``osmd_ray/train/loop.py`` (batch 64, ``drop_last``, a local shuffle buffer of 4 batches) and
  nothing else: no model. Samples/s = rows delivered to both workers / the slower worker's
  epoch time. Epoch 1 includes the pipeline's start; the table shows the median of the later
  epochs.
- ``ray in-memory``: the same workers over ``osmd_ray.train.runner.in_memory_dataset`` (the
  path of datasets up to ``data.in_memory_mb``, the default configuration's path).
- each of these from a local folder and from a moto S3 server on 127.0.0.1 (as
  tests/integration/conftest.py starts it), holding a byte copy of the same dataset.

Ratios: each Ray figure over the pyarrow limit of the same storage.

Writing (``--write-mb`` > 0): seconds for ``write_dataset`` to write that many MiB of random
64 x 64 RGB-D rows in ``--write-shard-mb`` shards, in this process (``parallel=False``) and
in parallel Ray tasks (``parallel=True``, Ray already started; its start time is reported
apart): the basis of ``PARALLEL_MIN_BYTES``.

Data wait in training (``--train-epochs`` > 0): ``osmd_ray.train.runner.train`` on the default
configuration (configs/osmd_synth.yaml, the default synthetic dataset), read from the
training loop's own account in history.json (``data_wait`` of each epoch, measured by
``osmd_ray.train.loop.WaitTimer`` on every rank). Per epoch and rank: data wait = time the
loop waited for its next training batch; step time = the epoch's training span (data +
forward + backward + step). The share is summed over ranks and epochs; the first batch of
each epoch (the pipeline's start, prefetched in the background since the loop's
``PrefetchedBatches``) is also reported apart.

Usage::

    python benchmarks/io_bench.py            # full run (~6 min on 2 idle cores)
    python benchmarks/io_bench.py --quick    # smoke test (~3 min)

Writes a JSON (``--out``, default benchmarks/results/io_bench.json) and prints a markdown
table. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common
from _common import DEFAULT_CONFIG, RESULTS_DIR, machine, machine_line, markdown_table, median, say

COLUMNS = ["label", "rgb", "depth"]  # what the default configuration trains on


# --------------------------------------------------------------------------- the limit


def pyarrow_rates(root: str, repeats: int) -> list[float]:
    """Samples/s of one process reading and decoding the training shards, ``repeats`` times."""
    import pyarrow.parquet as pq
    import torch

    from osmd_ray import storage
    from osmd_ray.data.schema import column_to_numpy, read_manifest

    manifest = read_manifest(root)
    fs, _ = storage.url_to_fs(root)
    files = [storage.url_to_fs(f)[1] for f in manifest.files(root, "train")]
    rates = []
    for _ in range(repeats):
        start, rows = time.perf_counter(), 0
        for path in files:
            with fs.open(path, "rb") as f:
                table = pq.read_table(f, columns=COLUMNS)
            tensors = {c: torch.from_numpy(column_to_numpy(table.column(c))) for c in COLUMNS}
            rows += len(tensors["label"])
        rates.append(rows / (time.perf_counter() - start))
    return rates


# --------------------------------------------------------------------------- Ray pipeline


def consume_fn(config: dict[str, Any]) -> None:
    """Ray Train worker: iterate the training shard as loop.py does, time each epoch."""
    import ray.train

    context = ray.train.get_context()
    rank = context.get_world_rank()
    shard = ray.train.get_dataset_shard("train")
    batch_size = config["batch_size"]
    epochs = []
    for epoch in range(config["epochs"]):
        start, rows, first = time.perf_counter(), 0, None
        for batch in shard.iter_torch_batches(
            batch_size=batch_size,
            drop_last=True,
            local_shuffle_buffer_size=4 * batch_size,
            local_shuffle_seed=7919 + epoch * 31 + rank,
            prefetch_batches=config["prefetch_batches"],
        ):
            if first is None:
                first = time.perf_counter() - start
            rows += int(batch["label"].shape[0])
        epochs.append({"rows": rows, "seconds": time.perf_counter() - start, "first_s": first})
    record = {"rank": rank, "epochs": epochs, "iterator_stats": shard.stats()}
    Path(config["out_dir"], f"rank{rank}.json").write_text(json.dumps(record))


def pipeline_rates(
    name: str, dataset: Any, epochs: int, batch_size: int, prefetch_batches: int
) -> dict[str, Any]:
    """Run ``consume_fn`` on 2 workers over ``dataset``; per-epoch samples/s of both."""
    import ray.train
    from ray.train.torch import TorchTrainer

    out_dir = tempfile.mkdtemp(prefix="io_bench_", dir=_scratch())
    trainer = TorchTrainer(
        consume_fn,
        train_loop_config={
            "epochs": epochs,
            "batch_size": batch_size,
            "prefetch_batches": prefetch_batches,
            "out_dir": out_dir,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}
        ),
        run_config=ray.train.RunConfig(name=f"io_bench_{name}", storage_path=out_dir),
        datasets={"train": dataset},
    )
    trainer.fit()
    ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in (0, 1)]
    shutil.rmtree(out_dir, ignore_errors=True)
    per_epoch = []
    for e in range(epochs):
        rows = sum(r["epochs"][e]["rows"] for r in ranks)
        seconds = max(r["epochs"][e]["seconds"] for r in ranks)
        per_epoch.append(rows / seconds)
    steady = per_epoch[1:] or per_epoch
    return {
        "samples_per_s_by_epoch": per_epoch,
        "samples_per_s": median(steady),
        "rows_per_epoch": [sum(r["epochs"][e]["rows"] for r in ranks) for e in range(epochs)],
        "first_batch_s": [
            max(r["epochs"][e]["first_s"] or 0 for r in ranks) for e in range(epochs)
        ],
        "iterator_stats_rank0": ranks[0]["iterator_stats"],
    }


# --------------------------------------------------------------------------- writing


def write_rates(total_mb: float, shard_mb: float) -> dict[str, Any]:
    """Seconds to write ``total_mb`` MiB of random rows (64 x 64 RGB-D) in ``shard_mb`` MiB
    shards: in this process, and in parallel Ray tasks (Ray already running)."""
    import numpy as np

    from osmd_ray.data.writer import write_dataset

    rng = np.random.default_rng(0)
    shapes = {"rgb": ((3, 64, 64), np.uint8), "depth": ((1, 64, 64), np.float32)}
    row_bytes = sum(int(np.prod(shape)) * np.dtype(dt).itemsize for shape, dt in shapes.values())
    rows = max(2, int(total_mb * 2**20 / row_bytes))
    train = {
        "rgb": rng.integers(0, 256, (rows, *shapes["rgb"][0]), dtype=np.uint8),
        "depth": rng.uniform(1, 8, (rows, *shapes["depth"][0])).astype(np.float32),
        "label": rng.integers(0, 4, rows),
    }
    out: dict[str, Any] = {"rows": rows, "mib": total_mb, "shard_mib": shard_mb}
    for mode in ("serial", "parallel"):
        root = os.path.join(_scratch(), f"write_{mode}")
        start = time.perf_counter()
        m = write_dataset(
            root,
            {"train": train},
            task="classification",
            num_classes=4,
            target_shard_bytes=int(shard_mb * 2**20),
            parallel=mode == "parallel",
            progress=False,
        )
        out[f"{mode}_s"] = time.perf_counter() - start
        out["shards"] = len(m.splits["train"])
        shutil.rmtree(root, ignore_errors=True)
    out["row_bytes"] = row_bytes
    return out


# --------------------------------------------------------------------------- data wait


def data_wait(root: str, epochs: int, overrides: list[str]) -> dict[str, Any]:
    """Train on the default configuration; the data wait share from the loop's own account.

    ``train_loop_per_worker`` times every wait for a training batch on every rank and writes
    the sums to each epoch's record in history.json (``data_wait``: mean wait per rank, the
    first batch's part of it, and the share of the ranks' summed epoch time).
    """
    from osmd_ray.train import runner

    cfg = _common.load_cfg(
        DEFAULT_CONFIG, [f"data.root={root}", f"train.epochs={epochs}", *overrides]
    )
    out_dir = tempfile.mkdtemp(prefix="io_bench_wait_", dir=_scratch())
    metrics = runner.train(cfg, os.path.join(out_dir, "run"))
    history = json.loads(Path(out_dir, "run", "history.json").read_text())
    shutil.rmtree(out_dir, ignore_errors=True)
    workers = cfg.scaling.num_workers
    steps_per_rank = history[-1]["step"]
    # Summed over ranks and epochs (the records hold means over ranks).
    wait, first, span = (
        workers * sum(h["data_wait"][key] for h in history)
        for key in ("wait_s", "first_batch_wait_s", "span_s")
    )
    in_memory = "in memory" if cfg.data.in_memory_mb > 0 else "streamed"
    return {
        "epochs": epochs,
        "overrides": overrides,
        "path": in_memory,
        "steps_per_rank": steps_per_rank,
        "step_time_ms": 1000 * span / max(steps_per_rank * workers, 1),
        "data_wait_share": wait / span,
        "data_wait_share_without_first_batches": (wait - first) / (span - first),
        "first_batch_wait_ms_mean": 1000 * first / max(1, workers * len(history)),
        "wait_ms_per_step": 1000 * wait / max(steps_per_rank * workers, 1),
        "per_epoch": [h["data_wait"] | {"epoch_time_s": h["epoch_time_s"]} for h in history],
        "train_time_s": metrics["train_time_s"],
    }


# --------------------------------------------------------------------------- set-up


_SCRATCH: list[str] = []


def _scratch() -> str:
    if not _SCRATCH:
        _SCRATCH.append(tempfile.mkdtemp(prefix="osmd_io_bench_"))
    return _SCRATCH[0]


def start_s3() -> Any:
    """moto's S3 server on 127.0.0.1 and a free port; the environment points at it (before
    Ray starts, so its workers inherit it), as tests/integration/conftest.py does."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        }
    )
    return server


def make_datasets(args: argparse.Namespace, with_s3: bool) -> dict[str, str]:
    """The benchmark dataset in a local folder (and a byte copy on S3); the default one."""
    import boto3

    from osmd_ray import storage
    from osmd_ray.data.checker import verify_dataset
    from osmd_ray.data.synth import write_synth_dataset

    roots = {"local": os.path.join(_scratch(), "bench")}
    started = time.perf_counter()
    write_synth_dataset(
        roots["local"],
        n_train=args.rows,
        n_val=64,
        n_test=64,
        size=args.size,
        shard_mb=args.shard_mb,
        progress=False,
    )
    manifest = verify_dataset(roots["local"])
    say(
        f"wrote {args.rows} rows in {len(manifest.splits['train'])} training shards "
        f"({sum(s.bytes for s in manifest.splits['train']) / 2**20:.1f} MiB) in "
        f"{time.perf_counter() - started:.1f} s"
    )
    if with_s3:
        boto3.client("s3").create_bucket(Bucket="io-bench")
        roots["s3"] = "s3://io-bench/bench"
        storage.upload_dir(roots["local"], roots["s3"])
        verify_dataset(roots["s3"], deep=True)
        say(f"copied it to {roots['s3']} (moto on {os.environ['AWS_ENDPOINT_URL']})")
    roots["default"] = os.path.join(_scratch(), "default")
    write_synth_dataset(roots["default"], progress=False)
    return roots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Method and usage: the module docstring; results: benchmarks/RESULTS.md.",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--rows", type=int, help="training rows (default 40000; quick 4000)")
    parser.add_argument("--size", type=int, default=24, help="image side (default: %(default)s)")
    parser.add_argument(
        "--shard-mb", type=float, help="shard size in MiB (default 16; quick 2): several shards"
    )
    parser.add_argument("--epochs", type=int, help="epochs per pipeline (default 4; quick 2)")
    parser.add_argument("--repeats", type=int, default=3, help="pyarrow repeats (default 3)")
    parser.add_argument("--batch-size", type=int, default=64, help="per worker (default 64)")
    parser.add_argument(
        "--prefetch-batches",
        type=int,
        nargs="+",
        default=[1],
        help="iter_torch_batches prefetch_batches values to try (default: 1, Ray's default "
        "and loop.py's)",
    )
    parser.add_argument(
        "--train-epochs",
        type=int,
        help="epochs of the instrumented training run (default 3; quick 1; 0 skips it)",
    )
    parser.add_argument(
        "--train-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for the training run (repeatable), e.g. data.in_memory_mb=0",
    )
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 measurements")
    parser.add_argument(
        "--write-mb",
        type=float,
        help="MiB written in process and by parallel Ray tasks (default 512; quick 32; 0 skips)",
    )
    parser.add_argument(
        "--write-shard-mb", type=float, help="shard size of that write (default 64; quick 4)"
    )
    parser.add_argument(
        "--out", default=str(RESULTS_DIR / "io_bench.json"), help="JSON (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    args.rows = args.rows or (4000 if args.quick else 40000)
    args.shard_mb = args.shard_mb or (2.0 if args.quick else 16.0)
    args.epochs = args.epochs or (2 if args.quick else 4)
    if args.write_mb is None:
        args.write_mb = 32.0 if args.quick else 512.0
    args.write_shard_mb = args.write_shard_mb or (4.0 if args.quick else 64.0)
    if args.train_epochs is None:
        args.train_epochs = 1 if args.quick else 3

    if not os.environ.get("OSMD_VERBOSE"):
        logging.getLogger("ray").setLevel(logging.ERROR)
    info = machine()
    say(machine_line(info))
    server = None if args.no_s3 else start_s3()
    try:
        results = run(args, info, with_s3=server is not None)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(_scratch(), ignore_errors=True)
    out = _common.write_json(args.out, results)
    print(results["table"])
    say(f"wrote {out}")
    return 0


def run(args: argparse.Namespace, info: dict[str, Any], with_s3: bool) -> dict[str, Any]:
    import ray
    import ray.data

    from osmd_ray import cluster
    from osmd_ray.data.reading import read_split
    from osmd_ray.data.schema import read_manifest
    from osmd_ray.train.runner import in_memory_dataset

    roots = make_datasets(args, with_s3)
    limits = {}
    for where in [w for w in ("local", "s3") if w in roots]:
        rates = pyarrow_rates(roots[where], args.repeats)
        limits[where] = {"samples_per_s_runs": rates, "samples_per_s": median(rates)}
        say(f"pyarrow limit ({where}): {median(rates):.0f} samples/s")

    started = time.perf_counter()
    cluster.ensure_ray(worker_cpus=2, use_gpu=False)
    ray_start_s = time.perf_counter() - started
    say(f"Ray started in {ray_start_s:.1f} s")
    writes = None
    if args.write_mb > 0:
        say(f"writing {args.write_mb:g} MiB in {args.write_shard_mb:g} MiB shards ...")
        writes = write_rates(args.write_mb, args.write_shard_mb)
        writes["ray_start_s"] = ray_start_s
        say(
            f"  in process {writes['serial_s']:.1f} s, in Ray tasks {writes['parallel_s']:.1f} s "
            f"({writes['shards']} shards; starting Ray took {ray_start_s:.1f} s)"
        )
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.execution_options.preserve_order = True  # as build_trainer sets it
    pipelines = {}
    for where in [w for w in ("local", "s3") if w in roots]:
        root = roots[where]
        manifest = read_manifest(root)
        cfg = _common.load_cfg(DEFAULT_CONFIG, [f"data.root={root}"])
        for prefetch in args.prefetch_batches:
            for path in ("streamed", "in-memory"):
                name = f"{where} {path} prefetch={prefetch}"
                if path == "streamed":
                    dataset = read_split(
                        root, "train", COLUMNS, manifest=manifest, shuffle_files=True, seed=0
                    )
                else:
                    dataset = in_memory_dataset(cfg, manifest, "train", COLUMNS)
                say(f"ray pipeline: {name} ...")
                result = pipeline_rates(
                    name.replace(" ", "_").replace("=", ""),
                    dataset,
                    args.epochs,
                    args.batch_size,
                    prefetch,
                )
                result["ratio_to_pyarrow"] = (
                    result["samples_per_s"] / limits[where]["samples_per_s"]
                )
                pipelines[name] = result
                say(
                    f"  {result['samples_per_s']:.0f} samples/s "
                    f"({100 * result['ratio_to_pyarrow']:.0f}% of pyarrow)"
                )

    wait = None
    if args.train_epochs > 0:
        say(f"instrumented training run, {args.train_epochs} epoch(s) ...")
        wait = data_wait(roots["default"], args.train_epochs, args.train_override)
        say(
            f"  data wait {100 * wait['data_wait_share']:.1f}% of step time "
            f"({100 * wait['data_wait_share_without_first_batches']:.1f}% without the first "
            "batch of each epoch)"
        )
    ray.shutdown()

    rows = [
        ["pyarrow limit", where, "-", f"{v['samples_per_s']:.0f}", "100%"]
        for where, v in limits.items()
    ]
    for name, r in pipelines.items():
        where, path, prefetch = name.split(" ")
        rows.append(
            [
                f"ray {path}, 2 workers",
                where,
                prefetch.split("=")[1],
                f"{r['samples_per_s']:.0f}",
                f"{100 * r['ratio_to_pyarrow']:.0f}%",
            ]
        )
    table = markdown_table(
        ["reader", "storage", "prefetch_batches", "samples/s", "of pyarrow limit"], rows
    )
    if wait is not None:
        table += (
            f"\n\nData wait in training ({wait['path']}, {wait['epochs']} epoch(s), "
            f"{wait['steps_per_rank']} steps per rank, {wait['step_time_ms']:.0f} ms per step): "
            f"{100 * wait['data_wait_share']:.1f}% of step time "
            f"({100 * wait['data_wait_share_without_first_batches']:.1f}% without the first "
            "batch of each epoch)"
        )
    if writes is not None:
        table += (
            f"\n\nWriting {writes['mib']:g} MiB ({writes['rows']} rows, {writes['shards']} "
            f"shards): in process {writes['serial_s']:.1f} s, parallel Ray tasks "
            f"{writes['parallel_s']:.1f} s (+ {writes['ray_start_s']:.1f} s to start Ray)"
        )
    table += f"\n\n{machine_line(info)}"
    return {
        "machine": info,
        "settings": {k: v for k, v in vars(args).items()},
        "pyarrow_limit": limits,
        "pipelines": pipelines,
        "data_wait": wait,
        "write": writes,
        "table": table,
    }


if __name__ == "__main__":
    sys.exit(main())
