"""``osmd compare``: a grid of variants x seeds (x datasets), each a normal training run.

A compare spec (YAML) names a base training config, overrides for every run, the variants
(a name and overrides each, e.g. ``method=logit_kd`` or ``loss.w_jan=0``), the seeds, optionally
several dataset roots, the two reference variants of gap closure (DESIGN §3) and the target
variant the others are compared against::

    base: osmd_synth.yaml                  # relative to this file's folder, else the cwd
    overrides: [train.epochs=10]
    variants:
      - {name: ordinary_only, overrides: [method=ordinary_only]}
      - {name: full_multimodal, overrides: [method=full_multimodal]}
      - {name: osmd, overrides: [method=osmd]}
    seeds: 3                               # 0, 1, 2 (or a list: [0, 4, 7])
    datasets: [{name: synth, root: data/synth_cls}]   # optional; default the base's data.root
    reference: {lower: ordinary_only, upper: full_multimodal}
    target: osmd
    tune: 8                                # optional: each variant's own sweep first (tuning.py)
    train_sizes: [250, 500, 1000]          # optional: a learning curve (data.train_rows)

Every (dataset, variant, seed) trains into ``DIR/runs/<dataset>/<variant>/seed<k>``; a run
whose folder already holds metrics.json, deploy/ and the same config.yaml is not trained
again, so rerunning the command completes an interrupted compare. Then ``DIR/results.csv``
(one row per run), ``DIR/summary.md``, ``DIR/summary.csv`` (one row per dataset and variant)
and ``DIR/summary.png`` are written (:mod:`osmd_ray.experiments.summary`).

Runs with ``scaling.num_workers: 0`` (the shipped synthetic specs) train in-process: one Ray
instance for the compare, each dataset root checked and read once into Ray's object store,
each run in a Ray task of its own, and by default as many at once as the cores allow. Runs
on Ray Train workers (``scaling.num_workers >= 1``) go one at a time unless
``--max-concurrent`` says otherwise.
"""

from __future__ import annotations

import functools
import json
import os
import re
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from osmd_ray import cluster, storage
from osmd_ray.config import (
    Config,
    DataConfig,
    apply_overrides,
    check_against_manifest,
    dump_yaml,
    flatten_keys,
    load_config,
    saved_config_matches,
)
from osmd_ray.data.checker import verify_dataset
from osmd_ray.data.schema import read_manifest
from osmd_ray.deploy import load_deploy
from osmd_ray.errors import ConfigError, SpecError, describe
from osmd_ray.experiments.main_job import ensure_synthetic_data
from osmd_ray.experiments.spec_file import read_spec, reject_unknown, spec_base
from osmd_ray.experiments.summary import (
    format_csv,
    format_learning_curve,
    format_learning_curve_csv,
    format_summary,
    format_summary_csv,
    plot_learning_curve,
    plot_summary,
)
from osmd_ray.experiments.tuning import (
    TUNE_FOLDER,
    Tuned,
    format_tuning,
    tune_variant,
    variant_sweep,
)
from osmd_ray.methods import check_config
from osmd_ray.train import runner
from osmd_ray.train.local import split_columns
from osmd_ray.train.stopping import task_metric

SPEC_KEYS = (
    "base",
    "overrides",
    "variants",
    "seeds",
    "datasets",
    "reference",
    "target",
    "tune",
    "train_sizes",
)
VARIANT_KEYS = ("name", "overrides")
DATASET_KEYS = ("name", "root")
REFERENCE_KEYS = ("lower", "upper")
# Keys the grid itself sets: an override of them would silently collapse the grid.
GRID_KEYS = {"seed": "seeds: in the spec or --seeds"}
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

TrainFn = Callable[[Config, str], Mapping[str, Any]]
MeasureFn = Callable[[str], "DeployStats"]


# ---------------------------------------------------------------------------------------------
# The spec
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    root: str | None
    """None: the base config's data.root (after the overrides)."""


@dataclass(frozen=True)
class CompareSpec:
    path: str
    base: str
    """The base training config, resolved to an existing file."""
    overrides: tuple[str, ...]
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...]
    datasets: tuple[DatasetEntry, ...]
    lower: str | None
    upper: str | None
    target: str | None
    tune: int = 0
    """Trials of each variant's own sweep before its seeds run (0: untuned; tuning.py)."""
    train_sizes: tuple[int, ...] = ()
    """Training-set sizes (data.train_rows) of a learning curve: each dataset runs once per
    size, as dataset ``<name>_n<size>``; empty: the whole training split only."""

    @property
    def stem(self) -> str:
        return Path(self.path).stem


@dataclass(frozen=True)
class PlannedRun:
    dataset: str
    variant: str
    seed: int
    cfg: Config
    run_dir: str
    source: str = ""
    """The dataset's own name, without the ``_n<size>`` of a learning curve's point."""

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.variant}/seed{self.seed}"


def load_spec(
    path: str | os.PathLike[str], seeds: int | None = None, tune: int | None = None
) -> CompareSpec:
    """Read and check a compare spec; ``seeds`` (``--seeds N``) replaces its seeds by 0..N-1."""
    path = str(path)
    data = read_spec(path, "compare spec", "configs/compare_synth.yaml", SpecError)
    return parse_spec(data, path, seeds, tune)


def parse_spec(
    data: Any, path: str, seeds: int | None = None, tune: int | None = None
) -> CompareSpec:
    """Check the structure of a loaded spec (its training configs are checked by plan_runs)."""

    def fail(key: str, problem: str) -> SpecError:
        return SpecError(f"compare spec '{path}': key {key!r} {problem}", key)

    base = spec_base(data, path, SPEC_KEYS, "compare spec", SpecError, fail)
    overrides = _overrides(data.get("overrides"), "overrides", fail)

    raw_variants = data.get("variants")
    if not isinstance(raw_variants, list) or not raw_variants:
        raise fail(
            "variants",
            "must be a non-empty list of {name, overrides}, e.g. "
            "[{name: osmd, overrides: [method=osmd]}]",
        )
    variants = []
    for i, item in enumerate(raw_variants):
        key = f"variants[{i}]"
        if not isinstance(item, Mapping):
            raise fail(key, f"must be a mapping with name and overrides; got {item!r}")
        reject_unknown(item, VARIANT_KEYS, key, fail, "compare spec")
        name = _name(item.get("name"), f"{key}.name", fail)
        if name in (v.name for v in variants):
            raise fail(f"{key}.name", f"repeats the variant name {name!r}; names must be unique")
        variants.append(Variant(name, _overrides(item.get("overrides"), f"{key}.overrides", fail)))
    names = [v.name for v in variants]

    if seeds is not None:
        if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
            raise SpecError(f"--seeds must be a positive integer; got {seeds!r}", "seeds")
        seed_list: tuple[int, ...] = tuple(range(seeds))
    else:
        seed_list = _seeds(data.get("seeds", 1), fail)

    datasets = _datasets(data.get("datasets"), fail)

    reference = data.get("reference")
    lower = upper = None
    if reference is not None:
        if not isinstance(reference, Mapping):
            raise fail("reference", "must be a mapping {lower: VARIANT, upper: VARIANT}")
        reject_unknown(reference, REFERENCE_KEYS, "reference", fail, "compare spec")
        for part in REFERENCE_KEYS:
            if part not in reference:
                raise fail(f"reference.{part}", "is missing; name one of the variants")
        lower = _variant_ref(reference["lower"], "reference.lower", names, fail)
        upper = _variant_ref(reference["upper"], "reference.upper", names, fail)
        if lower == upper:
            raise fail("reference.upper", f"names the same variant as reference.lower ({lower!r})")
    target = data.get("target")
    if target is not None:
        target = _variant_ref(target, "target", names, fail)
    from_flag = tune is not None
    tune = tune if from_flag else data.get("tune", 0)
    if isinstance(tune, bool) or not isinstance(tune, int) or tune < 0:
        if from_flag:
            raise SpecError(f"--tune must be an integer >= 0; got {tune!r}", "tune")
        raise fail("tune", f"must be the trials of each variant's sweep, >= 0; got {tune!r}")
    return CompareSpec(
        path=path,
        base=base,
        overrides=overrides,
        variants=tuple(variants),
        seeds=seed_list,
        datasets=datasets,
        lower=lower,
        upper=upper,
        target=target,
        tune=tune,
        train_sizes=_train_sizes(data.get("train_sizes"), fail),
    )


def _train_sizes(value: Any, fail: Callable) -> tuple[int, ...]:
    if value is None:
        return ()
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in value)
        or len(set(value)) != len(value)
    ):
        raise fail(
            "train_sizes",
            f"must be a list of distinct training-set sizes > 0, e.g. [250, 500, 1000]; got "
            f"{value!r}",
        )
    return tuple(sorted(value))


def _overrides(value: Any, key: str, fail: Callable) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise fail(key, f"must be a list of key=value strings, e.g. [loss.w_jan=0]; got {value!r}")
    for text in value:
        name = text.split("=", 1)[0].strip()
        if name in GRID_KEYS:
            raise fail(key, f"sets {name!r}, which the grid sets per run ({GRID_KEYS[name]})")
    return tuple(value)


def _name(value: Any, key: str, fail: Callable) -> str:
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise fail(
            key,
            f"must be a name made of letters, digits, '_', '.' and '-' (it becomes a folder "
            f"name); got {value!r}",
        )
    return value


def _seeds(value: Any, fail: Callable) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise fail(
                "seeds", f"must be a positive number of seeds or a list of seeds; got {value}"
            )
        return tuple(range(value))
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value)
    ):
        raise fail("seeds", f"must be N (seeds 0..N-1) or a list of seeds >= 0; got {value!r}")
    if len(set(value)) != len(value):
        raise fail("seeds", f"lists a seed more than once: {value}")
    return tuple(value)


def _datasets(value: Any, fail: Callable) -> tuple[DatasetEntry, ...]:
    if value is None:
        return (DatasetEntry(name="", root=None),)  # named after the base's root in plan_runs
    if not isinstance(value, list) or not value:
        raise fail("datasets", "must be a non-empty list of {name, root}")
    entries: list[DatasetEntry] = []
    for i, item in enumerate(value):
        key = f"datasets[{i}]"
        if not isinstance(item, Mapping):
            raise fail(key, f"must be a mapping {{name, root}}; got {item!r}")
        reject_unknown(item, DATASET_KEYS, key, fail, "compare spec")
        root = item.get("root")
        if not isinstance(root, str) or not root.strip():
            raise fail(f"{key}.root", f"must be a dataset folder; got {root!r}")
        name = _name(item.get("name", _dataset_name(root)), f"{key}.name", fail)
        if name in (e.name for e in entries):
            raise fail(f"{key}.name", f"repeats the dataset name {name!r}; names must be unique")
        entries.append(DatasetEntry(name=name, root=root))
    return tuple(entries)


def _dataset_name(root: str) -> str:
    name = os.path.basename(root.rstrip("/")) or "data"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip("._-") or "data"


def _variant_ref(value: Any, key: str, names: Sequence[str], fail: Callable) -> str:
    if value not in names:
        raise fail(key, f"names {value!r}, which is not a variant; variants: {', '.join(names)}")
    return str(value)


# ---------------------------------------------------------------------------------------------
# The grid of runs
# ---------------------------------------------------------------------------------------------


def plan_runs(
    spec: CompareSpec,
    out: str,
    overrides: Sequence[str] = (),
    tuned: Mapping[tuple[str, str], Sequence[str]] | None = None,
) -> list[PlannedRun]:
    """Every run's validated config and folder, seeds outermost (a finished seed is useful).

    Overrides apply in this order, later wins: the spec's, the dataset's root, the variant's,
    the command line's, the values tuning chose for the (dataset, variant) in ``tuned``,
    then the seed. A config that does not validate raises ConfigError prefixed by the
    variant, before anything runs.
    """
    for text in overrides:
        name = text.split("=", 1)[0].strip()
        if name in GRID_KEYS:
            raise ConfigError(
                f"override {text!r}: {name!r} is set per run by the grid ({GRID_KEYS[name]})",
                name,
            )
        if name == "method":
            raise ConfigError(
                f"override {text!r}: the method is set per variant; change the spec's variants",
                name,
            )
    try:
        base = load_config(spec.base, spec.overrides)
    except ConfigError as e:
        raise ConfigError(f"compare spec '{spec.path}', base and overrides: {e}", e.key) from None
    runs = []
    sizes: tuple[int | None, ...] = spec.train_sizes or (None,)
    for dataset in spec.datasets:
        root_override = [f"data.root={dataset.root}"] if dataset.root is not None else []
        for size in sizes:
            size_override = [f"data.train_rows={size}"] if size is not None else []
            for seed in spec.seeds:
                for variant in spec.variants:
                    try:
                        cfg = apply_overrides(
                            base, [*root_override, *variant.overrides, *overrides, *size_override]
                        )
                        source = dataset.name or _dataset_name(cfg.data.root)
                        name = f"{source}_n{size}" if size is not None else source
                        chosen = (tuned or {}).get((name, variant.name), ())
                        cfg = apply_overrides(cfg, [*chosen, f"seed={seed}"])
                        check_config(cfg)
                    except ConfigError as e:
                        raise ConfigError(f"variant {variant.name!r}: {e}", e.key) from None
                    if not cfg.tracking.group:  # wandb shows a compare's runs together
                        cfg = apply_overrides(cfg, [f"tracking.group={spec.stem}"])
                    run_dir = storage.join(out, "runs", name, variant.name, f"seed{seed}")
                    runs.append(PlannedRun(name, variant.name, seed, cfg, run_dir, source))
    return runs


def check_datasets(runs: Sequence[PlannedRun]) -> None:
    """Each dataset exists and has every configured modality (DataError/ConfigError if not).

    The default synthetic set is generated when it is missing, as ``osmd main`` does.
    """

    manifests: dict[str, Any] = {}
    for run in runs:
        root = run.cfg.data.root
        if root not in manifests:
            if os.path.normpath(root) == os.path.normpath(DataConfig().root):
                ensure_synthetic_data(root)
            manifests[root] = verify_dataset(root, deep=False)
        try:
            check_against_manifest(run.cfg, manifests[root])
        except ConfigError as e:
            raise ConfigError(f"variant {run.variant!r}: {e}", e.key) from None


def run_state(run: PlannedRun) -> str:
    """'new', 'finished', 'partial' (same config, not finished: train resumes it) or
    'conflict' (the folder holds a run with another configuration)."""
    if storage.is_remote(run.run_dir):
        saved = storage.read_text(storage.join(run.run_dir, "config.yaml"))
        same = None if saved is None else saved == dump_yaml(run.cfg)
    else:
        same = saved_config_matches(os.path.join(run.run_dir, "config.yaml"), run.cfg)
    if same is None:
        return "new"
    if not same:
        return "conflict"
    finished = storage.exists(storage.join(run.run_dir, "metrics.json")) and storage.exists(
        storage.join(run.run_dir, "deploy", "meta.json")
    )
    return "finished" if finished else "partial"


def config_differences(run: PlannedRun) -> list[str]:
    """``key: old -> new`` for each key where the folder's config.yaml differs from the run's."""
    old = flatten_keys(
        yaml.safe_load(storage.read_text(storage.join(run.run_dir, "config.yaml")) or "") or {}
    )
    # Parsed the same way as the saved file, so YAML's reading of numbers cannot differ.
    new = flatten_keys(yaml.safe_load(dump_yaml(run.cfg)))
    return [
        f"{key}: {old.get(key, '(absent)')!r} -> {new.get(key, '(absent)')!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]


# ---------------------------------------------------------------------------------------------
# Running the grid
# ---------------------------------------------------------------------------------------------


@dataclass
class CompareResult:
    rows: list[dict[str, Any]]
    failures: dict[str, str] = field(default_factory=dict)
    """Run name -> error, for runs that failed in this invocation."""
    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    tuned: dict[tuple[str, str], Tuned] = field(default_factory=dict)
    """(dataset, variant) -> what its sweep chose, with --tune."""


def run_compare(
    spec: CompareSpec,
    out: str,
    overrides: Sequence[str] = (),
    max_concurrent: int | None = None,
    train_fn: TrainFn | None = None,
    measure_fn: MeasureFn | None = None,
    report_only: bool = False,
) -> CompareResult:
    """Train what is not finished, then write results.csv, summary.md, summary.csv and
    summary.png.

    Every input problem (spec, configs, datasets, a run folder holding another config) is
    raised before the first run starts. A run that fails is recorded and the others go on.

    Runs with ``scaling.num_workers: 0`` train in-process, each in a Ray task of its own
    (``scaling.cpus_per_worker`` CPUs, a GPU with ``scaling.use_gpu``) on its dataset read
    and checked once for the whole compare (:func:`read_shared_data`) and shared through
    Ray's object store; ``max_concurrent`` None then runs as many at once as this machine's
    cores allow (:func:`default_concurrency`). Runs on Ray Train workers train one at a
    time unless ``max_concurrent`` says otherwise. ``train_fn`` (tests) replaces both:
    each run is then ``train_fn(cfg, run_dir)`` in this process.
    """
    if max_concurrent is not None and max_concurrent < 1:
        raise ConfigError(f"--max-concurrent must be >= 1; got {max_concurrent}", "max_concurrent")
    runs = plan_runs(spec, out, overrides)
    if runs:
        storage.set_endpoint(runs[0].cfg.storage.endpoint_url)
    storage.check_bucket(out, "--out")  # in seconds, naming the bucket, before any run
    check_datasets(runs)
    tuned: dict[tuple[str, str], Tuned] = {}
    if spec.tune:
        tuned = tune_variants(spec, out, overrides, runs, reuse_only=report_only)
        runs = plan_runs(spec, out, overrides, {k: t.overrides for k, t in tuned.items()})
    conflicts = [r for r in runs if run_state(r) == "conflict"]
    if conflicts:
        details = "; ".join(
            f"{r.run_dir} ({', '.join(config_differences(r)[:3]) or 'formatting'})"
            for r in conflicts[:3]
        )
        raise ConfigError(
            f"{len(conflicts)} run folder(s) under {out} hold runs with another configuration: "
            f"{details}. Rerun with the spec and overrides that made them, delete those "
            "folders, or choose another --out",
            "",
        )
    result = CompareResult(rows=[], tuned=tuned)
    todo = []
    for r in runs:
        if run_state(r) == "finished":
            result.skipped.append(r.name)
        else:
            todo.append(r)
    if report_only:
        print(
            f"[compare] report only: {len(result.skipped)} of {len(runs)} runs finished; "
            "training none",
            flush=True,
        )
        result.rows = collect_rows(runs, out, measure_fn or measure_deploy)
        write_outputs(spec, out, overrides, result)
        return result
    if max_concurrent is None:
        max_concurrent = default_concurrency(todo)
    print(
        f"[compare] {len(runs)} runs: {len(result.skipped)} finished earlier, {len(todo)} to train"
        + (f", up to {max_concurrent} at once" if len(todo) > 1 else ""),
        flush=True,
    )
    if train_fn is None and todo:
        # Read and checked before Ray starts: a bad shard stops the compare in seconds.
        shared = read_shared_data([r for r in todo if r.cfg.scaling.num_workers == 0])
        _start_ray(_largest_run(todo), min(max_concurrent, len(todo)))
        train_fn = _engine(shared)
    _train_all(todo, train_fn or runner.train, max_concurrent, result)
    result.rows = collect_rows(runs, out, measure_fn or measure_deploy)
    write_outputs(spec, out, overrides, result)
    return result


def tune_variants(
    spec: CompareSpec,
    out: str,
    overrides: Sequence[str],
    runs: Sequence[PlannedRun],
    reuse_only: bool = False,
) -> dict[tuple[str, str], Tuned]:
    """One sweep of ``spec.tune`` trials per (dataset, variant), on its first seed's config
    (:mod:`osmd_ray.experiments.tuning`); returns what each chose. ``reuse_only``: only
    the finished tunings (a report of what is done so far)."""
    firsts: dict[tuple[str, str], PlannedRun] = {}
    for run in runs:
        firsts.setdefault((run.dataset, run.variant), run)
    variants = {v.name: v for v in spec.variants}
    tuned = {}
    for (dataset, variant), run in firsts.items():
        metric = task_metric(read_manifest(run.cfg.data.root).task)
        sweep_spec = variant_sweep(
            spec.path,
            spec.base,
            [
                *spec.overrides,
                f"data.root={run.cfg.data.root}",
                f"data.train_rows={run.cfg.data.train_rows}",
                *variants[variant].overrides,
            ],
            run.cfg,
            metric,
            spec.tune,
            default_concurrency([run]),
        )
        folder = storage.join(out, TUNE_FOLDER, dataset, variant)
        chosen = tune_variant(sweep_spec, folder, overrides, f"{dataset}/{variant}", reuse_only)
        if chosen is not None:
            tuned[(dataset, variant)] = chosen
    return tuned


def _run_cpus(cfg: Config) -> float:
    """Logical CPUs one run holds: its in-process task's, or all its Ray Train workers'."""
    return max(1, cfg.scaling.num_workers) * cfg.scaling.cpus_per_worker


def default_concurrency(todo: Sequence[PlannedRun]) -> int:
    """Runs at once when --max-concurrent is not given: for in-process runs as many as the
    cores allow (``cpu_count // scaling.cpus_per_worker``), else 1 (one run on Ray Train
    workers already holds two CPUs and DeepSpeed's processes)."""
    if not todo or any(r.cfg.scaling.num_workers != 0 for r in todo):
        return 1
    cpus = max(r.cfg.scaling.cpus_per_worker for r in todo)
    return max(1, int((os.cpu_count() or 1) // cpus))


def _largest_run(todo: Sequence[PlannedRun]) -> Config:
    return max((r.cfg for r in todo), key=lambda cfg: (_run_cpus(cfg), cfg.scaling.use_gpu))


def _start_ray(cfg: Config, concurrent: int) -> None:
    """Ray sized for ``concurrent`` runs like ``cfg`` at once: each run's in-process task or
    workers (ensure_ray adds room for their data tasks)."""
    cluster.ensure_ray(_run_cpus(cfg) * concurrent, cfg.scaling.use_gpu)


def read_shared_data(runs: Sequence[PlannedRun]) -> dict[str, runner.InMemoryData]:
    """Per dataset root of ``runs`` (in-process runs), the dataset checked in full and read
    into memory once (:func:`osmd_ray.train.runner.read_in_memory`), with the columns every
    run of that root reads; each run is checked against its manifest (ConfigError naming the
    variant) before anything trains."""
    by_root: dict[str, list[PlannedRun]] = {}
    for run in runs:
        by_root.setdefault(run.cfg.data.root, []).append(run)
    shared = {}
    for root, mine in by_root.items():
        print(f"[compare] reading {root} once for its {len(mine)} in-process run(s)", flush=True)
        data = runner.read_in_memory(mine[0].cfg, also=[r.cfg for r in mine[1:]])
        for run in mine:
            try:
                check_against_manifest(run.cfg, data.manifest)
            except ConfigError as e:
                raise ConfigError(f"variant {run.variant!r}: {e}", e.key) from None
        shared[root] = data
    return shared


def _engine(shared: Mapping[str, runner.InMemoryData]) -> TrainFn:
    """How each run trains: an in-process run in a Ray task on its root's shared read (put
    in the object store once here), any other on Ray Train workers (runner.train)."""
    refs = {root: _share(data) for root, data in shared.items()}

    def train_one(cfg: Config, run_dir: str) -> Mapping[str, Any]:
        if cfg.scaling.num_workers == 0:
            return _run_in_task(cfg, run_dir, refs[cfg.data.root])
        return runner.train(cfg, run_dir)  # looked up per run, so that tests can stand in

    return train_one


def _share(data: runner.InMemoryData) -> Any:
    """``data`` in Ray's object store (its arrays are then read zero-copy by every task)."""
    import ray

    return ray.put(data)


def _run_in_task(cfg: Config, run_dir: str, data: Any) -> Mapping[str, Any]:
    """:func:`train_in_task` as a Ray task holding the run's CPUs (and a GPU); waits for it.

    Ray resolves ``data``, an ObjectRef, to the InMemoryData in the task's process. A task
    whose process dies is retried ``train.max_failures`` times (it resumes from the run's
    last epoch); an error raised by training is not.
    """
    import ray

    task = _remote_train().options(
        num_cpus=cfg.scaling.cpus_per_worker,
        num_gpus=1 if cfg.scaling.use_gpu else 0,
        max_retries=cfg.train.max_failures,
        name=f"compare {'/'.join(Path(run_dir).parts[-3:])}",
    )
    return ray.get(task.remote(cfg, run_dir, data))


@functools.cache
def _remote_train() -> Any:
    import ray

    return ray.remote(train_in_task)


def train_in_task(cfg: Config, run_dir: str, data: runner.InMemoryData) -> Mapping[str, Any]:
    """The body of a compare's in-process run (in its Ray task's process): ``runner.train``
    on the compare's read of the dataset, narrowed to the columns this run reads."""
    columns = split_columns(cfg, data.manifest)
    arrays = {split: {c: cols[c] for c in columns} for split, cols in data.arrays.items()}
    return runner.train(cfg, run_dir, data=runner.InMemoryData(data.manifest, arrays))


def _train_all(
    todo: Sequence[PlannedRun], train_fn: TrainFn, max_concurrent: int, result: CompareResult
) -> None:
    """Train ``todo`` with up to ``max_concurrent`` runs at once, each in its own thread.

    Even one run at a time trains in a thread: Ray Train registers a SIGINT handler when fit()
    runs in the main thread, and Ctrl-C would then abort only the current run and let the
    grid go on. Here Ctrl-C reaches the main thread, which stops Ray (the runs in flight, on
    Ray Train workers or in Ray tasks, resume from their last checkpoint next time) and
    raises KeyboardInterrupt. A thread whose run is an in-process one waits on its Ray task.
    """
    pending = list(enumerate(todo))
    lock = threading.Lock()
    interrupted = threading.Event()

    def one(index: int, run: PlannedRun) -> None:
        print(f"[compare {index + 1}/{len(todo)}] {run.name}: training", flush=True)
        started = time.perf_counter()
        try:
            train_fn(run.cfg, run.run_dir)
        except Exception as error:  # recorded; the other runs go on
            if interrupted.is_set():
                return
            message = describe(error)
            result.failures[run.name] = message
            print(f"[compare] {run.name}: FAILED: {message}", flush=True)
            return
        result.trained.append(run.name)
        print(f"[compare] {run.name}: done in {time.perf_counter() - started:.0f} s", flush=True)

    def worker() -> None:
        while not interrupted.is_set():
            with lock:
                if not pending:
                    return
                index, run = pending.pop(0)
            one(index, run)

    # Daemon threads: an interrupted compare must not wait for them at exit.
    threads = [
        threading.Thread(target=worker, name=f"compare-{i}", daemon=True)
        for i in range(min(max_concurrent, len(todo)))
    ]
    for thread in threads:
        thread.start()
    try:
        while any(thread.is_alive() for thread in threads):
            for thread in threads:
                thread.join(timeout=0.5)
    except KeyboardInterrupt:
        interrupted.set()
        print("[compare] interrupted: stopping the runs in flight", flush=True)
        cluster.stop_ray()
        raise


# ---------------------------------------------------------------------------------------------
# Deployment size and latency
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeployStats:
    params: int
    latency_ms_b1: float
    latency_ms_b64: float


def measure_deploy(run_dir: str, repeats: int = 7) -> DeployStats:
    """Parameters of RUN/deploy and its CPU latency (median ms) at batch 1 and 64.

    Inputs are random, shaped and typed like the model's inputs (the ordinary modalities; for
    full_multimodal the privileged ones too); one untimed call warms up each batch size. Torch
    runs on one thread: the figures compare models, and one thread is what a loaded machine
    (or Ray's other processes) reliably leaves free.
    """
    import numpy as np
    import torch

    model = load_deploy(os.path.join(run_dir, "deploy"))
    params = sum(p.numel() for p in model.net.parameters())
    rng = np.random.default_rng(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        latencies = [_median_latency(model, rows, rng, repeats) for rows in (1, 64)]
    finally:
        torch.set_num_threads(threads)
    return DeployStats(int(params), latencies[0], latencies[1])


def _median_latency(model: Any, rows: int, rng: Any, repeats: int) -> float:
    """Median ms of ``model.predict`` on one random batch of ``rows`` rows, after a warm-up."""
    import numpy as np

    batch = {}
    for spec in model.input_modalities:
        shape = (rows, *spec.shape)
        if np.dtype(spec.dtype).kind in "iu":
            batch[spec.name] = rng.integers(0, 256, size=shape).astype(spec.dtype)
        else:
            batch[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    model.predict(batch, batch_size=rows)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model.predict(batch, batch_size=rows)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# Rows of the finished runs, and the output files (their text: experiments/summary.py)
# ---------------------------------------------------------------------------------------------


def collect_rows(
    runs: Sequence[PlannedRun], out: str, measure_fn: MeasureFn
) -> list[dict[str, Any]]:
    """One row per finished run (failed or missing runs have none)."""
    rows = []
    for run in runs:
        if run_state(run) != "finished":
            continue
        metrics = json.loads(storage.read_text(storage.join(run.run_dir, "metrics.json")) or "{}")
        test = metrics.get("test", {})
        row: dict[str, Any] = {
            "dataset": run.dataset,
            "source": run.source or run.dataset,
            "train_rows": (metrics.get("rows") or {}).get("train") or run.cfg.data.train_rows,
            "variant": run.variant,
            "method": metrics.get("method", run.cfg.method),
            "seed": run.seed,
            "test_deploy_accuracy": test["deploy"]["accuracy"],
            "test_teacher_accuracy": test.get("teacher", {}).get("accuracy"),
            # Segmentation runs: accuracy is the pixel accuracy, mIoU the deployment metric.
            "test_deploy_miou": test["deploy"].get("miou"),
            "test_teacher_miou": test.get("teacher", {}).get("miou"),
            "epochs": metrics.get("epochs"),
            "deployed_epoch": metrics.get("deployed_epoch"),
            "train_time_s": metrics.get("train_time_s"),
            "wall_time_s": metrics.get("wall_time_s"),
            "deploy_params": None,
            "latency_ms_b1": None,
            "latency_ms_b64": None,
            "run_dir": _relative(run.run_dir, out),
        }
        try:
            stats = measure_fn(run.run_dir)
            row.update(
                deploy_params=stats.params,
                latency_ms_b1=stats.latency_ms_b1,
                latency_ms_b64=stats.latency_ms_b64,
            )
        except Exception as error:  # the accuracy stands without the latency
            print(f"[compare] {run.name}: cannot measure deploy/: {describe(error)}", flush=True)
        rows.append(row)
    return rows


def _relative(run_dir: str, out: str) -> str:
    if storage.is_remote(out):
        return run_dir[len(out.rstrip("/")) + 1 :]
    return os.path.relpath(run_dir, out)


def write_outputs(
    spec: CompareSpec, out: str, overrides: Sequence[str], result: CompareResult
) -> None:
    """results.csv, summary.md, summary.csv and summary.png in ``out``, each written whole or
    not at all (:func:`osmd_ray.storage.write_bytes`: one PUT on an object store)."""
    sections = [format_tuning(result.tuned, spec.tune)] if result.tuned else []
    if spec.train_sizes:
        sections.append(format_learning_curve(spec, result.rows))
    summary = format_summary(spec, overrides, result.rows, result.failures)
    texts = {
        "results.csv": format_csv(result.rows),
        "summary.md": summary + "".join("\n" + "\n".join(lines) + "\n" for lines in sections),
        "summary.csv": format_summary_csv(spec, result.rows),
    }
    if spec.train_sizes:
        texts["learning_curve.csv"] = format_learning_curve_csv(spec, result.rows)
    for name, text in texts.items():
        storage.write_bytes(storage.join(out, name), text.encode("utf-8"))
    plot_summary(spec, result.rows, storage.join(out, "summary.png"))
    if spec.train_sizes:
        plot_learning_curve(spec, result.rows, storage.join(out, "learning_curve.png"))


def compare(
    spec_path: str,
    out: str,
    overrides: Sequence[str] = (),
    seeds: int | None = None,
    max_concurrent: int | None = None,
    tune: int | None = None,
    report_only: bool = False,
) -> CompareResult:
    """What ``osmd compare`` runs: load the spec, run the grid, write and print the summary.
    ``tune``: trials of each variant's sweep (--tune; None: the spec's ``tune``);
    ``report_only``: summarise the finished runs, train nothing (--report-only)."""
    spec = load_spec(spec_path, seeds, tune)
    result = run_compare(spec, out, overrides, max_concurrent, report_only=report_only)
    print()
    print(storage.read_text(storage.join(out, "summary.md")))
    print(
        f"results.csv, summary.md, summary.csv, summary.png and runs/ in {storage.normalize(out)}"
    )
    if result.failures:
        print(f"[compare] {len(result.failures)} run(s) failed:")
        for name, error in result.failures.items():
            print(f"  {name}: {error}")
    return result
