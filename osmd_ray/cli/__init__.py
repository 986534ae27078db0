"""The ``osmd`` command line: data, train, lab, predict, the main job, compare and sweep.

Every command takes ``key.sub=value`` overrides where it takes a config; errors in the
input (config, data, run folder) end with a one-line message and exit code 2, never a
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from osmd_ray.errors import INPUT_ERRORS, describe
from osmd_ray.version import __version__

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train one run (OS-MD or a baseline) on a local Ray instance or a cluster",
        description=(
            "Train one run with Ray Train workers under DeepSpeed and write the run folder: "
            "config.yaml, metrics.json, history.json, Ray checkpoints, deploy/ and plots/. "
            "Rerunning with the same --out resumes from the last checkpoint. Connects to the "
            "cluster in RAY_ADDRESS when set, else starts a local Ray instance."
        ),
        epilog="example: osmd train --config configs/osmd_synth.yaml --out runs/a "
        "method=ordinary_only train.epochs=5 loss.w_jan=0.5",
    )
    p.add_argument("--config", required=True, help="YAML training config (see configs/)")
    p.add_argument(
        "--out", required=True, help="run folder or s3:// prefix (created; reused to resume)"
    )
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. seed=1")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from osmd_ray import storage
    from osmd_ray.config import load_config
    from osmd_ray.train.runner import train

    cfg = load_config(args.config, args.overrides)
    metrics = train(cfg, args.out)
    print(_metrics_line(metrics))
    print(f"run folder: {storage.normalize(args.out)}")
    return 0


def _metrics_line(metrics: dict) -> str:
    parts = [f"method={metrics['method']}"]
    for split in ("val", "test"):
        for path, values in metrics.get(split, {}).items():
            parts.append(f"{split}.{path}.accuracy={values['accuracy']:.4f}")
            if "miou" in values:  # segmentation: accuracy is the pixel accuracy
                parts.append(f"{split}.{path}.miou={values['miou']:.4f}")
    parts.append(f"train_time_s={metrics['train_time_s']:.1f}")
    return "  ".join(parts)


def _add_lab(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "lab",
        help="train one config in this process (no Ray, no DeepSpeed) and print its figures",
        description=(
            "The in-process engine, for method work at lab speed: the workers' own network, "
            "epoch, optimiser, schedule and evaluation in this one process, the dataset in "
            "memory, global batch data.batch_size x scaling.num_workers. Writes nothing; "
            "prints one JSON line: test_deploy, val_deploy, train_deploy (the deployment "
            "path on the training split), test_teacher where the method has a teacher path, "
            "and train_s. Accuracy, or mIoU for a segmentation dataset."
        ),
        epilog="example: osmd lab --config configs/osmd_synth.yaml method=labels_only seed=1",
    )
    p.add_argument("--config", required=True, help="YAML training config (see configs/)")
    p.add_argument(
        "--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)"
    )
    p.add_argument("--quiet", action="store_true", help="no per-epoch progress lines on stderr")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. seed=1")
    p.set_defaults(func=_cmd_lab)


def _cmd_lab(args: argparse.Namespace) -> int:
    import json

    import torch

    from osmd_ray.config import load_config
    from osmd_ray.train.local import train_in_process

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)

    def say(line: str) -> None:
        print(f"[osmd lab {cfg.method}] {line}", file=sys.stderr, flush=True)

    _, figures = train_in_process(cfg, say=None if args.quiet else say)
    print(json.dumps({"overrides": list(args.overrides), **figures}), flush=True)
    return 0


def _add_predict(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="predict a split of a dataset with a deployment model",
        description=(
            "Load RUN/deploy (safetensors + meta.json, no code executed), read the ordinary "
            "modalities of one split of a dataset, and write sample_id, prediction and class "
            "probabilities (and the label, when the data has one) to a Parquet file. "
            "Segmentation models write a label map per image (H x W int16, no probabilities) "
            "and print pixel accuracy and mIoU; --viz DIR draws RGB | depth | ground truth | "
            "prediction for the first images."
        ),
    )
    p.add_argument("--model", required=True, help="deployment model folder (RUN/deploy)")
    p.add_argument("--data", required=True, help="dataset folder with manifest.json")
    p.add_argument("--split", default="test", help="split to predict (default: test)")
    p.add_argument("--out", required=True, help="output Parquet file")
    p.add_argument("--batch-size", type=int, default=256, help="rows per forward (default 256)")
    p.add_argument(
        "--viz",
        metavar="DIR",
        help="segmentation: write PNG pictures (RGB | depth | ground truth | prediction) here",
    )
    p.add_argument(
        "--viz-count",
        type=int,
        default=8,
        metavar="N",
        help="how many images --viz draws, the split's first (default: %(default)s)",
    )
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args: argparse.Namespace) -> int:
    from osmd_ray.predict import predict_split

    summary = predict_split(
        args.model,
        args.data,
        args.split,
        args.out,
        args.batch_size,
        viz_dir=args.viz,
        viz_count=args.viz_count,
    )
    print(summary)
    return 0


def _add_main(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "main",
        help="the main job: synthetic data, ordinary_only / full_multimodal / osmd, a table",
        description=(
            "Generate the default synthetic RGB-D set if it is missing, train ordinary_only, "
            "full_multimodal and osmd with the same encoders and budget on the configured "
            "workers, and print deployment accuracy on test with gap closure."
        ),
    )
    p.add_argument("--config", default="configs/osmd_synth.yaml", help="base training config")
    p.add_argument("--out", default="runs/main", help="folder for the three runs")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides for every run")
    p.set_defaults(func=_cmd_main)


def _cmd_main(args: argparse.Namespace) -> int:
    from osmd_ray.experiments.main_job import run_main_job

    run_main_job(args.config, args.out, args.overrides)
    return 0


def _add_compare(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare",
        help="a grid of methods/ablations x seeds: results.csv, summary.md/.csv, summary.png",
        description=(
            "Train every (dataset, variant, seed) of a compare spec as a normal run under "
            "OUT/runs/<dataset>/<variant>/seed<k>, then write OUT/results.csv (one row per run: "
            "deployment and teacher accuracy, and mIoU for segmentation, train time, "
            "deployment parameters and CPU latency), OUT/summary.md (per variant the "
            "deployment metric, mIoU for segmentation, as mean ± std over seeds, gap closure, and "
            "the difference from the target paired by seed with its 95% t-interval, marked "
            "where the interval contains 0), OUT/summary.csv (the same figures per dataset and "
            "variant) and OUT/summary.png. "
            "The spec and every run's config are checked before the first run starts. "
            "Rerunning the same command skips finished runs and completes the rest; a failed "
            "run is reported, the others go on, and the exit code is 1."
        ),
        epilog="example: osmd compare --config configs/compare_synth.yaml --out runs/compare "
        "--seeds 3 train.epochs=5   (spec format: osmd_ray/experiments/compare.py, "
        "configs/compare_synth.yaml)",
    )
    p.add_argument(
        "--config", required=True, help="compare spec YAML (e.g. configs/compare_synth.yaml)"
    )
    p.add_argument(
        "--out",
        help="output folder or s3:// prefix (default: runs/<spec name>); reused to resume",
    )
    p.add_argument(
        "--seeds", type=int, metavar="N", help="run seeds 0..N-1 instead of the spec's seeds"
    )
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        metavar="N",
        help="runs trained at once; N given always wins. Default: with scaling.num_workers=0 "
        "(every run in a Ray task of its own, the dataset read once) as many as the cores "
        "allow, CPU count // scaling.cpus_per_worker; otherwise 1, since one run already "
        "uses several CPU workers: raise it only on a cluster with room for N runs' workers",
    )
    p.add_argument(
        "--tune",
        type=int,
        default=None,
        metavar="N",
        help="before the seeds run, tune every variant with the same budget: an osmd sweep of "
        "N trials over train.lr and the method's own loss weights (a third to three times "
        "their untuned values, Optuna + ASHA, on the first seed's validation split), into "
        "OUT/tune/<dataset>/<variant>; the best trial's values then train every seed. "
        "Default: the spec's tune (0: untuned). A rerun reuses finished tuning",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train and tune nothing: write results.csv, summary.md/.csv and the charts from "
        "the runs finished so far (e.g. while the compare still runs elsewhere)",
    )
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides for every run")
    p.set_defaults(func=_cmd_compare)


def _cmd_compare(args: argparse.Namespace) -> int:
    from osmd_ray.experiments.compare import compare

    out = args.out or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
    result = compare(
        args.config,
        out,
        args.overrides,
        args.seeds,
        args.max_concurrent,
        args.tune,
        args.report_only,
    )
    return EXIT_FAILED if result.failures else 0


def _add_sweep(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="a Ray Tune search over config fields (ASHA + Optuna): trials.csv, best.yaml",
        description=(
            "Run a Ray Tune search over any training-config fields (loss weights, learning "
            "rate, architecture, ZeRO stage, ...). Each trial is a full distributed training "
            "run in OUT/trials/<trial id> whose per-epoch validation metrics reach Tune, so "
            "ASHA stops poor trials early. Writes OUT/trials.csv (one row per trial: parameters, "
            "final and best metric, epochs run, status), OUT/best.yaml (a complete training "
            "config: osmd train --config OUT/best.yaml --out RUN) and OUT/summary.png. The spec "
            "and the search space are checked before any trial starts. Rerunning the same "
            "command (or --resume) continues an interrupted sweep: finished trials are kept, "
            "unfinished and errored ones run again from their last checkpoint. Exit code 1 when "
            "a trial failed."
        ),
        epilog="example: osmd sweep --config configs/sweep_synth.yaml --out runs/sweep "
        "train.epochs=4   (spec format: osmd_ray/experiments/sweep.py, configs/sweep_synth.yaml)",
    )
    p.add_argument(
        "--config", required=True, help="sweep spec YAML (e.g. configs/sweep_synth.yaml)"
    )
    p.add_argument(
        "--out",
        help="output folder or s3:// prefix (default: runs/<spec name>); reused to resume",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the sweep in --out, and fail if there is none (rerunning without "
        "--resume continues it too, or starts one)",
    )
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides for every trial")
    p.set_defaults(func=_cmd_sweep)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from osmd_ray.experiments.sweep import sweep

    out = args.out or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
    result = sweep(args.config, out, args.overrides, resume=args.resume)
    return EXIT_FAILED if any(row["status"] == "ERROR" for row in result.rows) else 0


def build_parser() -> argparse.ArgumentParser:
    from osmd_ray.cli.data import add_data_commands

    parser = argparse.ArgumentParser(
        prog="osmd",
        description=(
            "One-stage modality distillation on Ray Train + DeepSpeed: train with privileged "
            "modalities (depth, IR, ...), deploy on the ordinary ones."
        ),
    )
    parser.add_argument("--version", action="version", version=f"osmd_ray {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_data_commands(subparsers)
    _add_train(subparsers)
    _add_lab(subparsers)
    _add_predict(subparsers)
    _add_main(subparsers)
    _add_compare(subparsers)
    _add_sweep(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except INPUT_ERRORS as error:
        print(f"osmd {args.command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(
            f"osmd {args.command}: interrupted; rerun the same command to resume.", file=sys.stderr
        )
        return 130
    except Exception as error:  # a failed distributed run: show the root cause, not Ray's stack
        print(f"osmd {args.command}: failed: {describe(error, one_line=False)}", file=sys.stderr)
        if os.environ.get("OSMD_DEBUG"):
            raise
        return EXIT_FAILED
