"""``osmd sweep``: a Ray Tune search over training-config fields, each trial a full run.

A sweep spec (YAML) names a base training config, overrides for every trial, the search
space (any config key), the metric, the scheduler, the search algorithm and each trial's
resources::

    base: osmd_synth.yaml              # relative to this file's folder, else the cwd
    overrides: [train.epochs=6]
    space:
      loss.w_recon: {loguniform: [1, 30]}      # log scale: both bounds > 0
      train.lr: {uniform: [3.0e-4, 3.0e-3]}
      model.depth: {int: [2, 4]}                # integers, both bounds included
      model.fusion: {choice: [ctn, concat, sum]}
    metric: val.deploy.accuracy        # any key of the per-epoch report (val.<path>.<metric>)
    mode: max
    num_samples: 8
    max_concurrent_trials: 2
    scheduler: {type: asha, grace_period: 1, reduction_factor: 3}   # or: none
    search: {algorithm: optuna, seed: 0}                           # or: random
    resources: {num_workers: 2, cpus_per_worker: 1, gpus_per_worker: 0}

Every trial is an ordinary training run (Ray Train workers under DeepSpeed, DESIGN §6) in
``DIR/trials/<trial id>``, with a Tune trial as its driver; the workers' per-epoch reports
reach Tune through ``TuneReportCallback``, so ASHA can stop a trial after any epoch. Tune's
own state lives in ``DIR/tune``: rerunning the same command (or ``--resume``) continues an
interrupted sweep: finished trials are kept, unfinished and errored ones run again and resume
from their last checkpoint. Then ``DIR/trials.csv``, ``DIR/best.yaml`` and ``DIR/summary.png``
are written.
"""

from __future__ import annotations

import csv
import difflib
import json
import math
import os
import posixpath
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from osmd_ray import cluster, storage
from osmd_ray.config import (
    Config,
    DataConfig,
    apply_overrides,
    check_against_manifest,
    config_from_dict,
    config_to_dict,
    dump_yaml,
    flatten_keys,
    load_config,
)
from osmd_ray.data.checker import verify_dataset
from osmd_ray.errors import ConfigError, SweepSpecError
from osmd_ray.experiments.main_job import ensure_synthetic_data
from osmd_ray.experiments.spec_file import read_spec, reject_unknown, spec_base
from osmd_ray.figures import save_png
from osmd_ray.methods import check_config
from osmd_ray.ray_private_api import on_worker_group_start
from osmd_ray.train.runner import InMemoryData, finished_run_metrics, read_in_memory, train

SPEC_KEYS = (
    "base",
    "overrides",
    "space",
    "metric",
    "mode",
    "num_samples",
    "max_concurrent_trials",
    "scheduler",
    "search",
    "resources",
)
DOMAINS = ("loguniform", "uniform", "int", "choice")
SCHEDULERS = ("asha", "none")
SEARCHERS = ("optuna", "random")
SCHEDULER_KEYS = ("type", "grace_period", "reduction_factor")
SEARCH_KEYS = ("algorithm", "seed")
RESOURCE_KEYS = ("num_workers", "cpus_per_worker", "gpus_per_worker")
# Keys the sweep sets on every trial itself.
RESERVED_KEYS = {
    "tracking.group": "the sweep names the wandb group after its output folder",
    "scaling.num_workers": "set resources.num_workers instead",
    "scaling.cpus_per_worker": "set resources.cpus_per_worker instead",
    "scaling.use_gpu": "set resources.gpus_per_worker instead",
}
DEFAULT_METRIC = "val.deploy.accuracy"
METRIC_PATTERN = re.compile(r"val\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+")
TUNE_DIR = "tune"
SPEC_COPY = "sweep.yaml"
CSV_FILE = "trials.csv"
BEST_FILE = "best.yaml"
PLOT_FILE = "summary.png"


# ---------------------------------------------------------------------------------------------
# The spec
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One searched config key and its domain."""

    key: str
    domain: str
    low: float | int | None = None
    high: float | int | None = None
    values: tuple[Any, ...] = ()

    def tune_domain(self) -> Any:
        from ray import tune

        if self.domain == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.domain == "uniform":
            return tune.uniform(self.low, self.high)
        if self.domain == "int":
            return tune.randint(self.low, self.high + 1)  # Tune's upper bound is exclusive
        return tune.choice(list(self.values))

    def extremes(self) -> list[Any]:
        """The values that bound what a trial can get: each must make a valid config."""
        return list(self.values) if self.domain == "choice" else [self.low, self.high]

    @property
    def log_scale(self) -> bool:
        return self.domain == "loguniform"


@dataclass(frozen=True)
class SweepSpec:
    path: str
    base: str
    overrides: tuple[str, ...]
    space: tuple[Param, ...]
    metric: str
    """Dotted, as in the spec (val.deploy.accuracy); Tune sees it with '/' (val/deploy/...)."""
    mode: str
    num_samples: int
    max_concurrent_trials: int
    scheduler: str
    grace_period: int
    reduction_factor: float
    search: str
    search_seed: int
    num_workers: int
    """0: every trial trains in its Tune trial's own process; more: on that many Ray Train
    workers under DeepSpeed."""
    cpus_per_worker: float
    gpus_per_worker: float

    @property
    def tune_metric(self) -> str:
        return self.metric.replace(".", "/")

    @property
    def in_process(self) -> bool:
        return self.num_workers == 0

    def trial_resources(self) -> dict[str, float]:
        """What Tune reserves for an in-process trial: the trial is the worker."""
        return {"CPU": self.cpus_per_worker, "GPU": self.gpus_per_worker}

    def resource_overrides(self) -> list[str]:
        return [
            f"scaling.num_workers={self.num_workers}",
            f"scaling.cpus_per_worker={self.cpus_per_worker}",
            f"scaling.use_gpu={'true' if self.gpus_per_worker > 0 else 'false'}",
        ]


def load_sweep_spec(path: str | os.PathLike[str]) -> SweepSpec:
    """Read and check a sweep spec (the space against the base config too)."""
    path = str(path)
    data = read_spec(path, "sweep spec", "configs/sweep_synth.yaml", SweepSpecError)
    return parse_sweep_spec(data, path)


def parse_sweep_spec(data: Any, path: str) -> SweepSpec:
    """Check a loaded spec's structure; every problem is a SweepSpecError naming the key."""

    def fail(key: str, problem: str) -> SweepSpecError:
        return SweepSpecError(f"sweep spec '{path}': key {key!r} {problem}", key)

    base = spec_base(data, path, SPEC_KEYS, "sweep spec", SweepSpecError, fail)
    overrides = _override_list(data.get("overrides"), fail)

    raw_space = data.get("space")
    if not isinstance(raw_space, Mapping) or not raw_space:
        raise fail(
            "space",
            "must be a non-empty mapping of config keys to domains, e.g. "
            "{loss.w_jan: {loguniform: [0.01, 1]}}",
        )
    space = tuple(_param(str(key), value, fail) for key, value in raw_space.items())

    metric = data.get("metric", DEFAULT_METRIC)
    if not isinstance(metric, str) or not METRIC_PATTERN.fullmatch(metric):
        raise fail(
            "metric",
            f"must be a validation metric val.<path>.<metric>, e.g. {DEFAULT_METRIC}; got "
            f"{metric!r} (test metrics are reported once, after the last epoch, so a sweep "
            "cannot select on them)",
        )
    mode = data.get("mode", "max")
    if mode not in ("max", "min"):
        raise fail("mode", f"must be max or min; got {mode!r}")
    num_samples = _positive_int(data.get("num_samples", 8), "num_samples", fail)
    concurrent = _positive_int(data.get("max_concurrent_trials", 1), "max_concurrent_trials", fail)

    scheduler, grace, factor = _scheduler(data.get("scheduler", "asha"), fail)
    search, search_seed = _search(data.get("search", "optuna"), fail)
    workers, cpus, gpus = _resources(data.get("resources", {}), fail)
    return SweepSpec(
        path=path,
        base=base,
        overrides=overrides,
        space=space,
        metric=metric,
        mode=mode,
        num_samples=num_samples,
        max_concurrent_trials=concurrent,
        scheduler=scheduler,
        grace_period=grace,
        reduction_factor=factor,
        search=search,
        search_seed=search_seed,
        num_workers=workers,
        cpus_per_worker=cpus,
        gpus_per_worker=gpus,
    )


def _override_list(value: Any, fail) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise fail("overrides", f"must be a list of key=value strings; got {value!r}")
    return tuple(value)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _param(key: str, value: Any, fail) -> Param:
    where = f"space.{key}"
    if key in RESERVED_KEYS:
        raise fail(where, f"cannot be searched: {RESERVED_KEYS[key]}")
    if not isinstance(value, Mapping) or len(value) != 1:
        raise fail(
            where,
            "must be one domain, e.g. {loguniform: [1.0e-4, 1.0e-2]}, {uniform: [0, 1]}, "
            f"{{int: [2, 4]}} or {{choice: [a, b]}}; got {value!r}",
        )
    ((domain, args),) = value.items()
    if domain not in DOMAINS:
        close = difflib.get_close_matches(str(domain), DOMAINS, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise fail(where, f"has domain {domain!r}{hint}; valid: {', '.join(DOMAINS)}")
    if domain == "choice":
        if not isinstance(args, list) or not args:
            raise fail(where, f"choice must be a non-empty list of values; got {args!r}")
        if len({repr(v) for v in args}) != len(args):
            raise fail(where, f"choice lists a value more than once: {args!r}")
        return Param(key, domain, values=tuple(args))
    if not isinstance(args, list) or len(args) != 2 or not all(_number(a) for a in args):
        raise fail(where, f"{domain} must be [low, high], two finite numbers; got {args!r}")
    low, high = args
    if domain == "int":
        if not all(isinstance(a, int) for a in args):
            raise fail(where, f"int bounds must be integers; got {args!r}")
        if low > high:
            raise fail(where, f"int bounds must satisfy low <= high; got {args!r}")
    elif low >= high:
        raise fail(where, f"{domain} bounds must satisfy low < high; got {args!r}")
    if domain == "loguniform" and low <= 0:
        raise fail(where, f"loguniform bounds must be > 0 (a log scale); got {args!r}")
    return Param(key, domain, low=low, high=high)


def _positive_int(value: Any, key: str, fail) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise fail(key, f"must be a positive integer; got {value!r}")
    return value


def _scheduler(value: Any, fail) -> tuple[str, int, float]:
    if isinstance(value, str) or value is None:
        value = {"type": value or "none"}
    if not isinstance(value, Mapping):
        raise fail("scheduler", f"must be asha, none or {{type: asha, ...}}; got {value!r}")
    reject_unknown(value, SCHEDULER_KEYS, "scheduler", fail, "sweep spec")
    kind = value.get("type", "asha")
    if kind not in SCHEDULERS:
        raise fail("scheduler.type", f"must be one of {', '.join(SCHEDULERS)}; got {kind!r}")
    grace = _positive_int(value.get("grace_period", 1), "scheduler.grace_period", fail)
    factor = value.get("reduction_factor", 3)
    if not _number(factor) or factor <= 1:
        raise fail("scheduler.reduction_factor", f"must be a number > 1; got {factor!r}")
    return kind, grace, float(factor)


def _search(value: Any, fail) -> tuple[str, int]:
    if isinstance(value, str):
        value = {"algorithm": value}
    if not isinstance(value, Mapping):
        raise fail("search", f"must be optuna, random or {{algorithm, seed}}; got {value!r}")
    reject_unknown(value, SEARCH_KEYS, "search", fail, "sweep spec")
    algorithm = value.get("algorithm", "optuna")
    if algorithm not in SEARCHERS:
        raise fail("search.algorithm", f"must be one of {', '.join(SEARCHERS)}; got {algorithm!r}")
    seed = value.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise fail("search.seed", f"must be an integer >= 0; got {seed!r}")
    return algorithm, seed


def _resources(value: Any, fail) -> tuple[int, float, float]:
    if not isinstance(value, Mapping):
        raise fail("resources", f"must be a mapping {{{', '.join(RESOURCE_KEYS)}}}; got {value!r}")
    reject_unknown(value, RESOURCE_KEYS, "resources", fail, "sweep spec")
    workers = value.get("num_workers", 0)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise fail(
            "resources.num_workers",
            f"must be 0 (each trial in its own process) or a number of Ray Train workers; "
            f"got {workers!r}",
        )
    cpus = value.get("cpus_per_worker", 1)
    if not _number(cpus) or cpus <= 0:
        raise fail("resources.cpus_per_worker", f"must be a number > 0; got {cpus!r}")
    gpus = value.get("gpus_per_worker", 0)
    if not _number(gpus) or not 0 <= gpus <= 1:
        raise fail("resources.gpus_per_worker", f"must be a number from 0 to 1; got {gpus!r}")
    if workers and gpus not in (0, 1):
        # A Ray Train worker takes a whole GPU (scaling.use_gpu); an in-process trial is one
        # process on one device, which Ray can share between trials.
        raise fail(
            "resources.gpus_per_worker",
            f"is {gpus!r}, a fraction of a GPU, with resources.num_workers={workers}: Ray "
            "Train workers take whole GPUs (0 or 1). Set resources.num_workers: 0 to run each "
            "trial in its own process, where several trials can share one GPU",
        )
    return workers, float(cpus), float(gpus)


# ---------------------------------------------------------------------------------------------
# Trials
# ---------------------------------------------------------------------------------------------


def format_value(value: Any) -> str:
    """A sampled value as an override (YAML) text: floats keep full precision."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return str(value)


def param_overrides(params: Mapping[str, Any]) -> list[str]:
    return [f"{key}={format_value(_plain(value))}" for key, value in params.items()]


def _plain(value: Any) -> Any:
    """numpy scalars (Tune's samplers return them) as Python numbers."""
    item = getattr(value, "item", None)
    return item() if callable(item) and not isinstance(value, (list, tuple, str)) else value


def base_config(spec: SweepSpec, out: str, overrides: Sequence[str] = ()) -> Config:
    """The config every trial starts from: base file, spec overrides, resources, the command
    line's overrides and the wandb group; then every domain's bounds are checked against it."""
    for text in overrides:
        name = text.split("=", 1)[0].strip()
        if name in RESERVED_KEYS:
            raise ConfigError(f"override {text!r}: {RESERVED_KEYS[name]}", name)
        if name in {p.key for p in spec.space}:
            raise ConfigError(
                f"override {text!r}: {name!r} is searched (space.{name}); remove it from the "
                "space or from the command line",
                name,
            )
    group = re.sub(r"[^A-Za-z0-9_.-]", "_", storage.split(storage.normalize(out))[1])
    try:
        cfg = load_config(
            spec.base,
            [*spec.overrides, *spec.resource_overrides(), *overrides, f"tracking.group={group}"],
        )
    except ConfigError as e:
        raise ConfigError(f"sweep spec '{spec.path}', base and overrides: {e}", e.key) from None
    if "://" not in cfg.data.root:
        # Tune runs each trial in a working directory of its own: a relative root would
        # point nowhere there.
        cfg = apply_overrides(cfg, [f"data.root={os.path.abspath(cfg.data.root)}"])
    try:
        check_config(cfg)
    except ConfigError as e:
        raise ConfigError(f"sweep spec '{spec.path}', base and overrides: {e}", e.key) from None
    check_space(spec, cfg)
    return cfg


def check_space(spec: SweepSpec, cfg: Config) -> None:
    """Every searched key exists and each domain's bounds (or choices) make a valid config.

    A combination of in-range values can still contradict another key; such a trial ends
    with a ConfigError naming it, in trials.csv.
    """
    for param in spec.space:
        for value in param.extremes():
            try:
                check_config(apply_overrides(cfg, [f"{param.key}={format_value(value)}"]))
            except ConfigError as e:
                raise SweepSpecError(
                    f"sweep spec '{spec.path}': key 'space.{param.key}': value {value!r} "
                    f"is not valid: {e}",
                    f"space.{param.key}",
                ) from None


def trial_driver(
    params: dict[str, Any], base: dict[str, Any], out: str, data: InMemoryData | None = None
) -> None:
    """One Tune trial: a full training run into ``out/trials/<trial id>``.

    With ``data`` (the sweep's dataset, read once and shared through the object store) the
    run trains in this trial's own process and reports each epoch to Tune itself. Without,
    it runs on Ray Train workers that the trial drives; their per-epoch reports reach Tune
    through ``TuneReportCallback``, and the controller and workers share the trial's fate,
    so ASHA stopping the trial stops them too. A trial that Tune runs again after an
    interruption resumes its run folder from the last checkpoint; one whose run had already
    finished (the driver was killed before Tune saved that) reports its epochs from
    history.json instead of training again.
    """
    import ray.tune

    entered = time.perf_counter()
    cfg = apply_overrides(config_from_dict(base), param_overrides(params))
    trial_id = ray.tune.get_context().get_trial_id()
    run_dir = storage.join(out, "trials", trial_id)
    if _finished_run(run_dir, cfg):
        for record in json.loads(storage.read_text(storage.join(run_dir, "history.json"))):
            # Trained before the driver was killed: its epochs again, marked as not timed here.
            metrics = {"epoch": record["epoch"], "replayed": True}
            ray.tune.report({**metrics, **epoch_metrics(record["val"])})
        return
    if data is not None:
        train(cfg, run_dir, data=data, on_epoch=_tune_reporter(entered))
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    train(
        cfg,
        run_dir,
        callbacks=[TuneReportCallback(), placement_group_recorder(_pg_record(out, trial_id))],
    )


def _tune_reporter(entered: float) -> Any:
    """An in-process run's epoch hook: the epoch's validation metrics to Tune, with where the
    trial's seconds went so far: in the trial function (``trial_s``), in its epochs (training
    and validation), in saving (checkpoints; after the last epoch the test pass, the
    deployment model and the run's files) and in setting up before the first epoch."""
    import ray.tune

    spent = {"trial_s": 0.0, "epochs_s": 0.0, "save_s": 0.0, "setup_s": math.nan}

    def report(record: dict[str, Any], metrics: dict[str, Any] | None) -> None:
        epoch_s = record["epoch_time_s"] + record["val_time_s"]
        spent["trial_s"] = time.perf_counter() - entered
        if math.isnan(spent["setup_s"]):
            spent["setup_s"] = spent["trial_s"] - epoch_s - record["save_time_s"]
        spent["epochs_s"] += epoch_s
        spent["save_s"] += record["save_time_s"]
        ray.tune.report({"epoch": record["epoch"], **spent, **epoch_metrics(record["val"])})

    return report


TRIAL_WALL_S: dict[str, float] = {}
"""Trial id -> seconds from Tune starting the trial to its end, in this driver process.
A table of the module, not of the callback: Tuner.restore runs the callbacks that were
pickled with the sweep's state (by value, with what they refer to), copies of the object
run_sweep made; the callback looks the module up by name to reach the real table."""


def trial_progress(spec: SweepSpec, out: str) -> Any:
    """A Tune callback: one line per ended trial (id, metric, epochs, status, seconds), and
    each trial's wall time, from Tune starting it to its end, in TRIAL_WALL_S."""
    from ray.tune import Callback

    class TrialProgress(Callback):
        def __init__(self) -> None:
            self.started: dict[str, float] = {}
            self.ended = 0

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.started[trial.trial_id] = time.perf_counter()

        # A trial that a resumed sweep runs again is restored, not started.
        on_trial_restore = on_trial_start

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._line(trial, error=False)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._line(trial, error=True)

        def _line(self, trial: Any, error: bool) -> None:
            self.ended += 1
            start = self.started.get(trial.trial_id)
            elapsed = time.perf_counter() - start if start is not None else math.nan
            result = trial.last_result or {}
            if not result.get("replayed"):
                import osmd_ray.experiments.sweep as this_module

                this_module.TRIAL_WALL_S[trial.trial_id] = elapsed
            value = result.get(spec.tune_metric)
            shown = f"{value:.4f}" if isinstance(value, (int, float)) else "-"
            status = _trial_status(out, trial.trial_id, error)
            print(
                f"[sweep {self.ended}/{spec.num_samples}] {trial.trial_id}  {spec.metric}={shown}"
                f"  epochs={result.get('epoch', 0)}  {status.lower()}  {elapsed:.1f} s",
                flush=True,
            )

    return TrialProgress()


def _trial_status(out: str, trial_id: str, error: bool) -> str:
    if error:
        return "ERROR"
    if storage.exists(storage.join(out, "trials", trial_id, "metrics.json")):
        return "COMPLETED"  # trained every epoch and exported its deployment model
    # ASHA stopped it, possibly at a rung on its last epoch, before the export.
    return "STOPPED_EARLY"


# When ASHA stops a trial, Tune kills its driver actor and, with it, the Ray Train controller
# that the driver owns. The controller's placement group (the workers' CPUs and GPUs) outlives
# it: Ray removes a placement group with its creator only when the creator's job ends too (the
# sweep's), and Ray Train's own cleaner needs Ray's state API (the dashboard, ray[default]). A
# few stopped trials would hold every CPU and the next trial would wait forever. So each trial
# records its workers' placement group, and the sweep removes it once the trial has ended.


def _pg_record(out: str, trial_id: str) -> str:
    """The folder (or prefix) of a trial's placement-group records: one empty file per
    group, named by its hex id (objects on S3 cannot be appended to)."""
    return storage.join(out, ".placement_groups", trial_id)


def placement_group_recorder(path: str) -> Any:
    """A Ray Train callback that writes the hex id of the worker group's placement group."""
    return on_worker_group_start(
        lambda group_id: storage.write_bytes(storage.join(path, group_id), b"")
    )


def placement_group_cleaner(out: str) -> Any:
    """A Tune callback that removes the placement groups an ended trial left behind."""
    from ray.tune import Callback

    class RemoveTrialPlacementGroups(Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            remove_recorded_placement_groups(_pg_record(out, trial.trial_id))

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            remove_recorded_placement_groups(_pg_record(out, trial.trial_id))

    return RemoveTrialPlacementGroups()


def remove_recorded_placement_groups(path: str) -> int:
    """Remove the placement groups listed in ``path`` that still exist; returns how many."""
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table

    fs, folder = storage.url_to_fs(path)
    if not fs.exists(folder):
        return 0
    removed = 0
    for name in sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(folder, detail=False)):
        group = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(name)))
        if placement_group_table(group).get("state") not in (None, "REMOVED"):
            ray.util.remove_placement_group(group)
            removed += 1
    return removed


def epoch_metrics(val: Mapping[str, Any]) -> dict[str, Any]:
    """The validation part of the workers' per-epoch report, keyed as they key it."""
    return flatten_keys({"val": val}, "/")


def _finished_run(run_dir: str, cfg: Config) -> bool:
    """The trial's run folder holds this run, finished (history.json is written before
    metrics.json, so it is there too)."""

    return finished_run_metrics(cfg, run_dir) is not None


# ---------------------------------------------------------------------------------------------
# Running the sweep
# ---------------------------------------------------------------------------------------------


@dataclass
class SweepResult:
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    resumed: bool


def run_sweep(
    spec: SweepSpec, out: str, overrides: Sequence[str] = (), resume: bool = False
) -> SweepResult:
    """Run (or continue) the sweep and write trials.csv, best.yaml and summary.png.

    ``out`` is a local folder or an ``s3://`` prefix: Tune's state (through Ray's
    ``storage_filesystem``), the trials' runs and the outputs all go there.
    """
    out = storage.normalize(out)
    cfg = base_config(spec, out, overrides)
    if storage.is_remote(out):
        storage.set_endpoint(cfg.storage.endpoint_url or None)
        storage.check_bucket(out, "--out")  # in seconds, naming the bucket, before Ray
    state = storage.join(out, TUNE_DIR)
    existing = storage.exists(state)
    if resume and not existing:
        raise ConfigError(f"--resume: {out} holds no sweep to continue (no {TUNE_DIR}/)", "")
    _check_data(cfg)
    spec_text = spec_record(spec, cfg)
    _check_same_sweep(out, spec_text)
    # In-process trials share one read of the dataset, checked once, through the object store.
    data = read_in_memory(cfg) if spec.in_process else None
    storage.write_bytes(storage.join(out, SPEC_COPY), spec_text.encode("utf-8"))

    _start_ray(spec)
    import ray.tune

    trainable = ray.tune.with_parameters(trial_driver, base=config_to_dict(cfg), out=out, data=data)
    if spec.in_process:
        trainable = ray.tune.with_resources(trainable, spec.trial_resources())
    progress = trial_progress(spec, out)
    # Ray takes a remote location as a pyarrow filesystem and the path inside it.
    tune_fs, tune_root = storage.pyarrow_fs(out)
    tune_state = posixpath.join(tune_root, TUNE_DIR) if tune_fs is not None else state
    restored = existing and ray.tune.Tuner.can_restore(tune_state, storage_filesystem=tune_fs)
    started = time.perf_counter()
    if restored:
        print(f"[sweep] continuing the sweep in {out}", flush=True)
        tuner = ray.tune.Tuner.restore(
            tune_state,
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=tune_fs,
        )
    else:
        tuner = ray.tune.Tuner(
            trainable,
            param_space={p.key: p.tune_domain() for p in spec.space},
            tune_config=search_config(spec, cfg),
            run_config=ray.tune.RunConfig(
                name=TUNE_DIR,
                storage_path=tune_root,
                storage_filesystem=tune_fs,
                # Trials keep going when one fails; errored ones are retried on resume.
                failure_config=ray.tune.FailureConfig(max_failures=0, fail_fast=False),
                callbacks=[placement_group_cleaner(out), progress],
                verbose=0,  # the progress callback prints a line per ended trial
            ),
        )
    grid = tuner.fit()
    wall = time.perf_counter() - started
    rows = trial_rows(grid, spec, cfg, out, TRIAL_WALL_S)
    best = pick_best(rows, spec, cfg)
    write_outputs(rows, best, spec, cfg, out)
    print(f"[sweep] {len(rows)} trials in {wall:.0f} s ({_status_counts(rows)})", flush=True)
    return SweepResult(rows=rows, best=best, resumed=bool(restored))


def _check_data(cfg: Config) -> None:

    if not storage.is_remote(cfg.data.root) and os.path.normpath(cfg.data.root) == os.path.normpath(
        DataConfig().root
    ):
        ensure_synthetic_data(cfg.data.root)
    check_against_manifest(cfg, verify_dataset(cfg.data.root, deep=False))


def spec_record(spec: SweepSpec, cfg: Config) -> str:
    """What identifies a sweep: its base config and search settings. A rerun into the same
    folder must match it, or Tune would continue one search with another's settings."""
    record = {
        "space": {
            p.key: {p.domain: list(p.values) if p.domain == "choice" else [p.low, p.high]}
            for p in spec.space
        },
        "metric": spec.metric,
        "mode": spec.mode,
        "num_samples": spec.num_samples,
        "scheduler": {
            "type": spec.scheduler,
            "grace_period": spec.grace_period,
            "reduction_factor": spec.reduction_factor,
        },
        "search": {"algorithm": spec.search, "seed": spec.search_seed},
        "base_config": yaml.safe_load(dump_yaml(cfg)),
    }
    return (
        "# The sweep this folder holds (written by osmd sweep; rerunning it continues it).\n"
        + yaml.safe_dump(record, sort_keys=False)
    )


def _check_same_sweep(out: str, spec_text: str) -> None:
    text = storage.read_text(storage.join(out, SPEC_COPY))
    if text is None:
        return
    old = yaml.safe_load(text) or {}
    new = yaml.safe_load(spec_text)
    if old != new:
        a, b = flatten_keys(old), flatten_keys(new)
        diffs = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        raise ConfigError(
            f"{out} holds another sweep (differs in {', '.join(diffs[:4])}); rerun with the "
            "spec and overrides that made it, or choose another --out",
            "",
        )


def _start_ray(spec: SweepSpec) -> None:
    """A local instance with room for the concurrent trials: an in-process trial's CPUs, or
    a trial's driver (1 CPU), its workers and their data tasks; or the cluster in
    RAY_ADDRESS."""
    per_trial = (
        spec.cpus_per_worker if spec.in_process else spec.num_workers * spec.cpus_per_worker + 1
    )
    cluster.ensure_ray(per_trial * spec.max_concurrent_trials, use_gpu=spec.gpus_per_worker > 0)


def search_config(spec: SweepSpec, cfg: Config) -> Any:
    """The spec's search as a Tune TuneConfig: metric, budget, concurrency, ASHA, searcher."""
    import ray.tune

    return ray.tune.TuneConfig(
        metric=spec.tune_metric,
        mode=spec.mode,
        num_samples=spec.num_samples,
        max_concurrent_trials=spec.max_concurrent_trials,
        scheduler=_build_scheduler(spec, cfg),
        search_alg=_build_searcher(spec),
        trial_dirname_creator=lambda trial: trial.trial_id,
        # An in-process trial's actor has imported torch and the package: the next trial
        # reuses it (every trial asks for the same resources).
        reuse_actors=spec.in_process,
    )


def _build_scheduler(spec: SweepSpec, cfg: Config) -> Any:
    if spec.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # Time is the epoch the workers report (not Tune's iteration count), so a trial resumed
    # from its checkpoint is judged at the right epoch. ASHA stops every trial that reaches
    # max_t at once, before its run could export the deployment model and write metrics.json;
    # one epoch more than any trial trains lets a trial that survived every rung finish.
    return ASHAScheduler(
        time_attr="epoch",
        max_t=cfg.train.epochs + 1,
        grace_period=min(spec.grace_period, cfg.train.epochs),
        reduction_factor=spec.reduction_factor,
    )


def _build_searcher(spec: SweepSpec) -> Any:
    if spec.search == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=spec.search_seed)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=spec.search_seed))


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


def trial_rows(
    grid: Any,
    spec: SweepSpec,
    cfg: Config,
    out: str,
    elapsed: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """One row per trial: parameters, final and best metric, epochs run, status, and its
    seconds: wall (``elapsed``, from Tune starting the trial to its end; empty for trials
    that ended before a resume), in epochs (training and validation), the rest overhead."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or os.path.basename(result.path)
        frame = result.metrics_dataframe
        values = (
            [float(v) for v in frame[spec.tune_metric].dropna()]
            if frame is not None and spec.tune_metric in frame
            else []
        )
        epochs = int(metrics.get("epoch", 0) or 0)
        status = _trial_status(out, trial_id, result.error is not None)
        wall = (elapsed or {}).get(trial_id, math.nan)
        epochs_s = float(metrics.get("epochs_s", math.nan))
        best = (max if spec.mode == "max" else min)(values) if values else math.nan
        run_dir = posixpath.join("trials", trial_id)
        row: dict[str, Any] = {"trial_id": trial_id}
        row.update({f"param.{p.key}": _plain(result.config.get(p.key)) for p in spec.space})
        row.update(
            {
                "final_metric": values[-1] if values else math.nan,
                "best_metric": best,
                "deployed_metric": deployed_metric(spec, storage.join(out, run_dir)),
                "epochs": epochs,
                "status": status,
                "wall_s": round(wall, 2),
                "epochs_s": round(epochs_s, 2),
                "overhead_s": round(wall - epochs_s, 2),
                **{
                    key: round(float(metrics.get(key, math.nan)), 2)
                    for key in ("setup_s", "save_s", "trial_s")
                },
                "error": _first_line(result.error) if result.error is not None else "",
                "run_dir": run_dir,
            }
        )
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial_id"])


def deployed_metric(spec: SweepSpec, run_dir: str) -> float:
    """The sweep's metric as the trial's finished run deploys it (metrics.json's ``val``: its
    best epoch by default, train.deploy_epoch); NaN for a trial that did not finish."""
    text = storage.read_text(storage.join(run_dir, "metrics.json"))
    if text is None:
        return math.nan
    _, path, name = spec.metric.split(".")
    value = json.loads(text).get("val", {}).get(path, {}).get(name)
    return math.nan if value is None else float(value)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[-1][:300] if text else type(error).__name__


def pick_best(rows: Sequence[dict[str, Any]], spec: SweepSpec, cfg: Config) -> dict | None:
    """The best trial among those that finished their run (every epoch, or until early
    stopping), ranked by the metric their run deploys (``deployed_metric``), so that
    best.yaml, trained as is, reproduces the figure; an ASHA-stopped trial's figure is from
    fewer epochs. Falls back to every trial's final metric when none finished. The returned
    row has the figure it was ranked by as ``selected_metric``."""
    pool = [r for r in rows if r["status"] == "COMPLETED" and not math.isnan(r["deployed_metric"])]
    key = "deployed_metric"
    if not pool:
        pool, key = [r for r in rows if not math.isnan(r["final_metric"])], "final_metric"
    if not pool:
        return None
    choose = max if spec.mode == "max" else min
    best = choose(pool, key=lambda r: r[key])
    return {**best, "selected_metric": best[key]}


def write_outputs(
    rows: Sequence[dict[str, Any]], best: dict | None, spec: SweepSpec, cfg: Config, out: str
) -> None:
    """trials.csv, best.yaml and summary.png in ``out``, each written whole or not at all
    (a local temporary file renamed into place, or one S3 PUT)."""
    import io

    columns = list(rows[0]) if rows else ["trial_id"]
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    storage.write_bytes(storage.join(out, CSV_FILE), table.getvalue().encode("utf-8"))
    if best is not None:
        params = {p.key: best[f"param.{p.key}"] for p in spec.space}
        best_cfg = apply_overrides(cfg, param_overrides(params))
        best_path = storage.join(out, BEST_FILE)
        train_it = (
            f"osmd train --config {best_path} --out RUN"
            if not storage.is_remote(out)
            else f"copy it to a local file (aws s3 cp {best_path} best.yaml), then "
            "osmd train --config best.yaml --out RUN"
        )
        header = (
            f"# Best trial of the sweep in {out}: {best['trial_id']}, {spec.metric}="
            f"{best['selected_metric']:.4f} after {best['epochs']} epochs ({best['status']}).\n"
            f"# Train it as is: {train_it}\n"
        )
        storage.write_bytes(best_path, (header + dump_yaml(best_cfg)).encode("utf-8"))
    plot_summary(rows, spec, storage.join(out, PLOT_FILE))


def plot_summary(rows: Sequence[dict[str, Any]], spec: SweepSpec, path: str) -> None:
    """The metric (best over each trial's epochs) against each searched parameter."""
    import matplotlib.ticker
    from matplotlib.figure import Figure

    n = len(spec.space)
    cols = min(n, 3)
    fig = Figure(figsize=(4.2 * cols, 3.4 * math.ceil(n / cols)))
    axes = fig.subplots(math.ceil(n / cols), cols, squeeze=False)
    colors = {"COMPLETED": "tab:blue", "STOPPED_EARLY": "tab:orange", "ERROR": "tab:red"}
    for ax, param in zip(axes.flat, spec.space, strict=False):
        for status, color in colors.items():
            points = [
                (r[f"param.{param.key}"], r["best_metric"])
                for r in rows
                if r["status"] == status and not math.isnan(r["best_metric"])
            ]
            if not points:
                continue
            xs = [str(x) for x, _ in points] if param.domain == "choice" else [x for x, _ in points]
            ax.scatter(xs, [y for _, y in points], color=color, label=status.lower(), alpha=0.8)
        if param.log_scale:
            ax.set_xscale("log")
            # Minor-tick labels of a short log range overlap; the major ones suffice.
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(param.key)
        ax.set_ylabel(spec.metric)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper right", fontsize=8)
    fig.suptitle(f"{Path(spec.path).stem}: {len(rows)} trials")
    fig.tight_layout()
    save_png(fig, path)


def _status_counts(rows: Sequence[dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))


def sweep(
    spec_path: str, out: str, overrides: Sequence[str] = (), resume: bool = False
) -> SweepResult:
    """What ``osmd sweep`` runs: load the spec, run the sweep, print the outcome."""
    spec = load_sweep_spec(spec_path)
    result = run_sweep(spec, out, overrides, resume)
    out = storage.normalize(out)
    print(f"trials.csv, best.yaml and summary.png in {out}")
    if result.best is not None:
        print(
            f"best: {result.best['trial_id']} {spec.metric}={result.best['selected_metric']:.4f} "
            f"({result.best['status'].lower()}); train it with "
            f"osmd train --config {storage.join(out, BEST_FILE)} --out RUN"
        )
    return result
