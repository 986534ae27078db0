"""``osmd compare --tune N``: every variant tuned with the same budget before its seeds run.

No method should win a comparison by being tuned more. So each (dataset, variant) of a
compare gets an ``osmd sweep`` of its own with the same budget: N trials over its own
learning rate and loss weights (``train.lr`` and the method's ``tuned_weights`` that the
config gives weight), each searched log-uniformly from a third to three times the value the
variant would otherwise train with, by the same searcher (Optuna, seed 0) and scheduler
(ASHA) on the validation split of the compare's first seed. The best trial's values then
become overrides of every seed's run of that variant. The sweep of a variant lives in
``OUT/tune/<dataset>/<variant>`` (trials.csv, best.yaml, summary.png), and ``tuned.json``
there records what it chose: a rerun of the compare with the same spec and budget reuses
it instead of searching again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from osmd_ray import storage
from osmd_ray.config import Config, config_from_dict, config_to_dict, flatten_keys
from osmd_ray.errors import ConfigError
from osmd_ray.experiments.sweep import (
    Param,
    SweepSpec,
    base_config,
    param_overrides,
    run_sweep,
    spec_record,
)
from osmd_ray.methods import get_method

TUNE_FOLDER = "tune"
CHOICE_FILE = "tuned.json"
SPREAD = 3.0
"""Each searched value ranges from 1/SPREAD to SPREAD times the variant's own value."""
GRACE_PERIOD = 1
REDUCTION_FACTOR = 3.0
SEARCH_SEED = 0


@dataclass(frozen=True)
class Tuned:
    """What one variant's sweep chose."""

    keys: tuple[str, ...]
    """The searched config keys."""
    overrides: tuple[str, ...]
    """The best trial's values, as overrides (empty when no trial finished)."""
    trial: str
    metric: float


def tuned_keys(cfg: Config) -> list[str]:
    """``train.lr`` and the method's own weights that ``cfg`` gives a positive value."""
    values = flatten_keys(config_to_dict(cfg))
    weights = [k for k in get_method(cfg.method).tuned_weights if float(values[k]) > 0]
    return ["train.lr", *weights]


def search_space(cfg: Config) -> tuple[Param, ...]:
    """Every tuned key, log-uniform over [value / SPREAD, value x SPREAD]."""
    values = flatten_keys(config_to_dict(cfg))
    return tuple(
        Param(key, "loguniform", float(values[key]) / SPREAD, float(values[key]) * SPREAD)
        for key in tuned_keys(cfg)
    )


def variant_sweep(
    spec_path: str,
    base: str,
    overrides: Sequence[str],
    cfg: Config,
    metric: str,
    trials: int,
    max_concurrent: int,
) -> SweepSpec:
    """The sweep of one variant: ``overrides`` (the compare spec's, the dataset's and the
    variant's) on ``base``; ``cfg`` is the variant's config, whose resources the trials use;
    ``metric`` the validation metric of the deployment path (accuracy, or miou)."""
    scaling = cfg.scaling
    return SweepSpec(
        path=spec_path,
        base=base,
        overrides=tuple(overrides),
        space=search_space(cfg),
        metric=f"val.deploy.{metric}",
        mode="max",
        num_samples=trials,
        max_concurrent_trials=max_concurrent,
        scheduler="asha",
        grace_period=GRACE_PERIOD,
        reduction_factor=REDUCTION_FACTOR,
        search="optuna",
        search_seed=SEARCH_SEED,
        num_workers=scaling.num_workers,
        cpus_per_worker=scaling.cpus_per_worker,
        gpus_per_worker=1.0 if scaling.use_gpu else 0.0,
    )


def tune_variant(
    sweep_spec: SweepSpec,
    folder: str,
    overrides: Sequence[str],
    label: str,
    reuse_only: bool = False,
) -> Tuned | None:
    """Run (or reuse) one variant's sweep into ``folder``; returns what it chose.
    ``reuse_only``: never search; None when no finished tuning of this sweep is there."""
    record = spec_record(sweep_spec, base_config(sweep_spec, folder, overrides))
    keys = tuple(p.key for p in sweep_spec.space)
    choice_path = storage.join(folder, CHOICE_FILE)
    saved = storage.read_text(choice_path)
    if saved is not None:
        previous = json.loads(saved)
        if same_sweep(previous.get("sweep"), record):
            print(f"[compare] {label}: tuned earlier ({previous['trial']}), reused", flush=True)
            return Tuned(keys, tuple(previous["overrides"]), previous["trial"], previous["metric"])
    if reuse_only:
        return None
    print(
        f"[compare] tuning {label}: {sweep_spec.num_samples} trials over {', '.join(keys)}",
        flush=True,
    )
    result = run_sweep(sweep_spec, folder, overrides)
    if result.best is None:
        raise ConfigError(
            f"tuning {label}: no trial of the sweep in {folder} reported a validation metric "
            f"(see {folder}/trials.csv); fix the failing trials or run without --tune",
            "tune",
        )
    params = {key: result.best[f"param.{key}"] for key in keys}
    tuned = Tuned(
        keys,
        tuple(param_overrides(params)),
        result.best["trial_id"],
        result.best["selected_metric"],
    )
    choice = {
        "trial": tuned.trial,
        "metric": tuned.metric,
        "overrides": list(tuned.overrides),
        "sweep": record,
    }
    storage.write_bytes(choice_path, json.dumps(choice, indent=2).encode("utf-8"))
    return tuned


def same_sweep(saved: str | None, record: str) -> bool:
    """Whether a saved sweep record is this sweep's, with keys that a newer version added
    to the config taken at their defaults (a new key must not invalidate finished tuning)."""
    if saved is None:
        return False

    def normal(text: str) -> Any:
        tree = yaml.safe_load(text) or {}
        if isinstance(tree.get("base_config"), dict):
            tree["base_config"] = config_to_dict(config_from_dict(tree["base_config"]))
        return tree

    return normal(saved) == normal(record)


def format_tuning(tuned: Mapping[tuple[str, str], Tuned], trials: int) -> list[str]:
    """summary.md's section on the tuning: the budget and what each variant chose."""
    lines = [
        "## Tuning",
        "",
        f"Every variant was tuned with the same budget before its seeds ran: {trials} trials "
        f"of `osmd sweep` over `train.lr` and its own loss weights, each log-uniform from "
        f"1/{SPREAD:g} to {SPREAD:g} times its untuned value, Optuna (seed {SEARCH_SEED}) "
        f"with ASHA (grace period {GRACE_PERIOD}, reduction factor {REDUCTION_FACTOR:g}), "
        "on the validation split of the first seed. The best trial's values train every "
        "seed. Sweeps: OUT/tune/<dataset>/<variant>.",
        "",
        "| dataset | variant | searched | chosen | best trial's val |",
        "| --- | --- | --- | --- | --- |",
    ]
    for (dataset, variant), t in tuned.items():
        chosen = ", ".join(f"`{o}`" for o in t.overrides) or "-"
        lines.append(f"| {dataset} | {variant} | {', '.join(t.keys)} | {chosen} | {t.metric:.4f} |")
    return lines
