"""``osmd data ...``: write a synthetic dataset, import NPZ files or NYU Depth V2, check a
dataset.

Each command function takes the parsed arguments and returns an exit code: 0 success,
1 a check found problems, 2 bad input (a DataError, printed without a traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from functools import wraps

from osmd_ray.data.checker import check_dataset
from osmd_ray.data.importer import import_npz
from osmd_ray.data.nyuv2 import import_nyuv2, parse_size
from osmd_ray.data.schema import Manifest, read_manifest
from osmd_ray.data.synth import SYNTH_DEFAULTS, write_synth_dataset
from osmd_ray.data.writer import DEFAULT_SHARD_MB, PARALLEL_MIN_BYTES, shard_bytes
from osmd_ray.errors import DataError, StorageError
from osmd_ray.storage import check_bucket

# Help texts keep their own line breaks (RawDescriptionHelpFormatter), so they stay narrow.
_EPILOG_LAYOUT = """\
A dataset is a folder (or s3:// prefix) holding manifest.json and
<split>/part-*.parquet; see DESIGN.md section 4."""

_SHARD_MB_HELP = (
    "target shard size in MiB of uncompressed rows; on a Ray cluster (RAY_ADDRESS), a "
    f"dataset of several shards and at least {PARALLEL_MIN_BYTES // 2**20} MiB is written "
    "by parallel Ray tasks (default: %(default)s)"
)

_SYNTH_DESCRIPTION = """\
Generate the procedural RGB-D scenes of osmd_ray.data.synth (ordinary
modality rgb, privileged modality depth) and write them as a dataset.
--task segmentation writes the depth-band scenes of osmd_ray.data.synth_seg
instead (a label per pixel: background, near, mid, far); the defaults
below are those of classification, segmentation uses 1000/500/1000 rows of
32x32 images."""

_IMPORT_DESCRIPTION = """\
Import NPZ files (np.savez) into a dataset, one file per split. Each holds:
  <modality>      one array per modality, samples on the first axis; the
                  per-sample shape gives the kind: C x H x W image,
                  C x T sequence, D vector
  label           integers: (N,) classification, (N, H, W) segmentation
  has_<modality>  optional (N,) bool: the modality is missing where false
  sample_id       optional (N,) strings
Without --val, a seeded slice of the training file (stratified by class)
becomes the validation split."""

_NYUV2_DESCRIPTION = """\
Import NYU Depth V2 as a segmentation dataset: modalities rgb (3xHxW
uint8, resized bilinearly) and depth (1xHxW float32 = millimetres/10000
clipped to [0, 1], 0 = no reading; resized nearest), label HxW with
classes 1..K stored as 0..K-1 and unlabelled (0) as -100, the ignore
index; labels resized nearest. The layout of --src is detected:
  PNG folders   rgb/, depth/ (uint16 mm), label13/ or label40/ (mode L,
                0 = unlabelled), files named by NYU index (0001.png),
                the same names in every folder. No official split:
                frame i of the index-sorted list goes to train when
                i%4 is 0 or 1, val when 2, test when 3 (8 frames: 4/2/2).
  official .mat nyu_depth_v2_labeled.mat (HDF5) with splits.mat beside
                it: test = testNdxs; val = the last 10% (at least 1) of
                trainNdxs, in their order; train = the rest. Its 894 raw
                classes need --mapping."""

_CHECK_DESCRIPTION = """\
Check a dataset against its manifest. Prints every problem found, each
naming the file (exit 1), or OK with a summary (exit 0). The full check
hashes every shard and scans labels and values; --quick checks existence,
sizes, Parquet schemas and row counts only."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {value}")
    return value


def _image_size(text: str) -> tuple[int, int]:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_write_options(parser: argparse.ArgumentParser) -> None:
    """--shard-mb and --overwrite, the options of every command that writes a dataset."""
    parser.add_argument(
        "--shard-mb",
        type=_positive_float,
        default=DEFAULT_SHARD_MB,
        metavar="MB",
        help=_SHARD_MB_HELP,
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a dataset already at --out"
    )


def _wrote(out: str, manifest: Manifest) -> int:
    """Say what a command wrote (its summary) and return exit code 0."""
    print(f"wrote {out}")
    print(summary(manifest))
    return 0


def _reports_data_errors(fn: Callable[[argparse.Namespace], int]) -> Callable[..., int]:
    """Turn a DataError or StorageError into a one-line message on stderr and exit code 2."""

    @wraps(fn)
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (DataError, StorageError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return run


def add_data_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``data`` with its commands synth, import, import-nyuv2 and check; return its
    parser."""
    data = subparsers.add_parser(
        "data",
        help="write, import and check datasets",
        description="Write, import and check datasets of the osmd_ray data contract.",
        epilog=_EPILOG_LAYOUT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    _add_synth_command(commands)
    _add_import_command(commands)
    _add_import_nyuv2_command(commands)
    _add_check_command(commands)
    return data


def _add_synth_command(commands: argparse._SubParsersAction) -> None:
    """``data synth``: its options, defaults from SYNTH_DEFAULTS, run by cmd_synth."""
    synth = commands.add_parser(
        "synth",
        help="write the synthetic RGB-D benchmark dataset",
        description=_SYNTH_DESCRIPTION,
        epilog="examples:\n  osmd data synth --out data/synth_cls\n"
        "  osmd data synth --task segmentation --out data/synth_seg",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    synth.add_argument("--out", required=True, metavar="DIR", help="dataset folder or s3:// URI")
    synth.add_argument(
        "--task",
        choices=["classification", "segmentation"],
        default="classification",
        help="prediction task (default: %(default)s); segmentation: depth-band scenes with a "
        "label per pixel, defaults 1000/500/1000 rows of 32x32",
    )
    for flag, key, what in (
        ("--train", "n_train", "number of training samples"),
        ("--val", "n_val", "number of validation samples"),
        ("--test", "n_test", "number of test samples"),
        ("--size", "size", "image side in pixels"),
    ):
        synth.add_argument(
            flag,
            dest=key,
            type=_positive_int,
            metavar="N",
            help=f"{what} (default: {SYNTH_DEFAULTS[key]})",
        )
    synth.add_argument(
        "--seed",
        type=int,
        metavar="K",
        help=f"random seed (default: {SYNTH_DEFAULTS['seed']})",
    )
    _add_write_options(synth)
    synth.set_defaults(func=cmd_synth)


def _add_import_command(commands: argparse._SubParsersAction) -> None:
    """``data import``: NPZ files, one per split, run by cmd_import."""
    imp = commands.add_parser(
        "import",
        help="import NPZ files (one per split) as a dataset",
        description=_IMPORT_DESCRIPTION,
        epilog="example:\n  osmd data import --out data/mine --train train.npz --test test.npz",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    imp.add_argument("--out", required=True, metavar="DIR", help="dataset folder or s3:// URI")
    imp.add_argument("--train", required=True, metavar="FILE", help="training split (.npz)")
    imp.add_argument(
        "--val", metavar="FILE", help="validation split (.npz; default: carved from --train)"
    )
    imp.add_argument("--test", required=True, metavar="FILE", help="test split (.npz)")
    imp.add_argument(
        "--task",
        choices=["classification", "segmentation"],
        default="classification",
        help="classification: label (N,); segmentation: label (N, H, W), -100 = unlabelled "
        "(default: %(default)s)",
    )
    imp.add_argument(
        "--val-fraction",
        type=_fraction,
        default=0.1,
        metavar="F",
        help="share of --train moved to val when --val is not given (default: %(default)s)",
    )
    imp.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="K",
        help="seed of the validation slice (default: %(default)s)",
    )
    _add_write_options(imp)
    imp.set_defaults(func=cmd_import)


def _add_import_nyuv2_command(commands: argparse._SubParsersAction) -> None:
    """``data import-nyuv2``: NYU Depth V2 for segmentation, run by cmd_import_nyuv2."""
    nyu = commands.add_parser(
        "import-nyuv2",
        help="import NYU Depth V2 (PNG folders or the official .mat) for segmentation",
        description=_NYUV2_DESCRIPTION,
        epilog=(
            "example:\n  osmd data import-nyuv2 --src ../shared/data/nyuv2-mini --out data/nyuv2"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    nyu.add_argument("--src", required=True, metavar="DIR", help="NYU Depth V2 source folder")
    nyu.add_argument("--out", required=True, metavar="DIR", help="dataset folder or s3:// URI")
    nyu.add_argument(
        "--classes",
        type=int,
        choices=[13, 40],
        default=13,
        help="label set: 13 or 40 classes (default: %(default)s)",
    )
    nyu.add_argument(
        "--size",
        type=_image_size,
        default="240x320",
        metavar="HxW",
        help="height x width of the written images (default: %(default)s)",
    )
    nyu.add_argument(
        "--mapping",
        metavar="FILE",
        help="official .mat only: .npy or .json array of 895 integers, raw class -> class "
        "0..K (0 = unlabelled)",
    )
    _add_write_options(nyu)
    nyu.set_defaults(func=cmd_import_nyuv2)


def _add_check_command(commands: argparse._SubParsersAction) -> None:
    """``data check``: a dataset against its manifest, run by cmd_check."""
    check = commands.add_parser(
        "check",
        help="check a dataset against its manifest",
        description=_CHECK_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("root", metavar="DIR", help="dataset folder or s3:// URI")
    check.add_argument(
        "--quick",
        action="store_true",
        help="skip checksums and value scans (default: full check)",
    )
    check.set_defaults(func=cmd_check)


@_reports_data_errors
def cmd_synth(args: argparse.Namespace) -> int:
    """Generate the synthetic dataset and write it."""
    params = {
        key: getattr(args, key)
        for key in ("n_train", "n_val", "n_test", "size", "seed")
        if getattr(args, key) is not None
    }
    check_bucket(args.out, "--out")  # fail in seconds, naming the bucket, not mid-write
    manifest = write_synth_dataset(
        args.out, overwrite=args.overwrite, shard_mb=args.shard_mb, task=args.task, **params
    )
    return _wrote(args.out, manifest)


@_reports_data_errors
def cmd_import(args: argparse.Namespace) -> int:
    """Import NPZ files."""
    check_bucket(args.out, "--out")
    manifest = import_npz(
        args.out,
        train=args.train,
        val=args.val,
        test=args.test,
        task=args.task,
        val_fraction=args.val_fraction,
        seed=args.seed,
        target_shard_bytes=shard_bytes(args.shard_mb),
        overwrite=args.overwrite,
    )
    return _wrote(args.out, manifest)


@_reports_data_errors
def cmd_import_nyuv2(args: argparse.Namespace) -> int:
    """Import NYU Depth V2."""
    check_bucket(args.out, "--out")
    manifest = import_nyuv2(
        args.src,
        args.out,
        classes=args.classes,
        size=args.size,
        mapping=args.mapping,
        target_shard_bytes=shard_bytes(args.shard_mb),
        overwrite=args.overwrite,
    )
    return _wrote(args.out, manifest)


@_reports_data_errors
def cmd_check(args: argparse.Namespace) -> int:
    """Check a dataset; exit 1 when it has problems."""
    check_bucket(args.root, "the dataset")
    problems = check_dataset(args.root, deep=not args.quick)
    if problems:
        print(f"{len(problems)} problem(s) in {args.root}:")
        for p in problems:
            print(f"  {p}")
        return 1
    depth = "quick check" if args.quick else "full check"
    print(f"OK {args.root} ({depth})")
    print(summary(read_manifest(args.root)))
    return 0


def summary(m: Manifest) -> str:
    """A few lines: task, splits with rows and shards, modalities with kind, shape, dtype."""
    lines = [f"  task: {m.task}, {m.num_classes} classes"]
    if m.class_names:
        lines[0] += f" ({', '.join(m.class_names)})"
    for split, shards in m.splits.items():
        lines.append(f"  {split}: {m.num_rows(split)} rows in {len(shards)} shard(s)")
    for name, spec in m.modalities.items():
        optional = ", optional (has_" + name + ")" if name in m.optional_modalities else ""
        shape = "x".join(str(d) for d in spec.shape)
        lines.append(f"  {name}: {spec.kind} {shape} {spec.dtype}{optional}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """A parser with just the data group (``data synth|import|check ...``), for tests."""
    parser = argparse.ArgumentParser(prog="osmd", description="osmd_ray data commands")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_data_commands(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
