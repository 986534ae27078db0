"""What ``osmd compare`` reports of its finished runs: statistics per dataset and variant,
and the text of results.csv, summary.md and summary.csv, and summary.png.

Rows are :func:`osmd_ray.experiments.compare.collect_rows`'s, one per finished run.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from osmd_ray.experiments.stats import (
    HEADLINE_SEEDS,
    PAIRED_TEST,
    Stat,
    gap_closure,
    paired_difference,
)
from osmd_ray.figures import save_png

CSV_COLUMNS = (
    "dataset",
    "source",
    "train_rows",
    "variant",
    "method",
    "seed",
    "test_deploy_accuracy",
    "test_teacher_accuracy",
    "test_deploy_miou",
    "test_teacher_miou",
    "epochs",
    "deployed_epoch",
    "train_time_s",
    "wall_time_s",
    "deploy_params",
    "latency_ms_b1",
    "latency_ms_b64",
    "run_dir",
)
"""results.csv: one row per finished run."""
SUMMARY_COLUMNS = (
    "dataset",
    "variant",
    "method",
    "metric",
    "n",
    "mean",
    "std",
    "lo",
    "hi",
    "diff_n",
    "diff_mean",
    "diff_std",
    "diff_lo",
    "diff_hi",
    "diff_excludes_zero",
    "gap_closure_n",
    "gap_closure_mean",
    "gap_closure_std",
    "gap_closure_lo",
    "gap_closure_hi",
    "epochs_mean",
    "deployed_epoch_mean",
)
"""summary.csv: one row per dataset and variant. Without a prefix: the deployment metric over
seeds; ``diff_``: the difference from the target paired by seed (PAIRED_TEST); ``gap_closure_``:
gap closure per seed. ``lo``/``hi``: the 95% t-interval of that mean, empty with n < 2.
``epochs_mean``, ``deployed_epoch_mean``: the epochs the runs trained (early stopping may end
them before train.epochs) and the epoch they deployed (their best, by default)."""
METRIC_LABELS = {
    "test_deploy_accuracy": "test accuracy (deploy)",
    "test_deploy_miou": "test mIoU (deploy)",
}


class Named(Protocol):
    @property
    def name(self) -> str: ...


class SummarySpec(Protocol):
    """What the summary reads of a compare spec (compare.CompareSpec); a protocol, since
    compare imports this module and not the other way round."""

    @property
    def path(self) -> str: ...
    @property
    def base(self) -> str: ...
    @property
    def overrides(self) -> Sequence[str]: ...
    @property
    def variants(self) -> Sequence[Named]: ...
    @property
    def seeds(self) -> Sequence[int]: ...
    @property
    def lower(self) -> str | None: ...
    @property
    def upper(self) -> str | None: ...
    @property
    def target(self) -> str | None: ...


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def metric_key(rows: Sequence[Mapping[str, Any]]) -> str:
    """The deployment metric of a dataset's rows: ``test_deploy_miou`` when every run has a
    mIoU (segmentation), else ``test_deploy_accuracy``."""
    if rows and all(r.get("test_deploy_miou") is not None for r in rows):
        return "test_deploy_miou"
    return "test_deploy_accuracy"


def gap_closures(
    rows: Sequence[Mapping[str, Any]], dataset: str, variant: str, lower: str, upper: str
) -> list[float]:
    """Gap closure of ``variant`` per seed: seed k against seed k of lower and upper, on the
    dataset's :func:`metric_key`.

    Seeds missing from any of the three are left out, as are seeds where upper == lower.
    """
    mine = [r for r in rows if r["dataset"] == dataset]
    key = metric_key(mine)
    acc = {(r["variant"], r["seed"]): float(r[key]) for r in mine}
    values = []
    for (name, seed), value in sorted(acc.items(), key=lambda kv: kv[0][1]):
        if name != variant or (lower, seed) not in acc or (upper, seed) not in acc:
            continue
        closure = gap_closure(value, acc[(lower, seed)], acc[(upper, seed)])
        if not math.isnan(closure):
            values.append(closure)
    return values


def summarize(
    spec: SummarySpec, rows: Sequence[Mapping[str, Any]]
) -> dict[str, list[dict[str, Any]]]:
    """Per dataset, one entry per variant (spec order) with its statistics: ``accuracy``
    (the deployment metric), ``gap_closure`` and ``vs_target`` (the paired difference from
    the target) are :class:`Stat` or None where the spec defines no such thing."""
    out: dict[str, list[dict[str, Any]]] = {}
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    for dataset in datasets:
        mine = [r for r in rows if r["dataset"] == dataset]
        key = metric_key(mine)
        per_seed = {
            v.name: {r["seed"]: r[key] for r in mine if r["variant"] == v.name}
            for v in spec.variants
        }
        entries = []
        for v in spec.variants:
            runs = [r for r in mine if r["variant"] == v.name]
            entry: dict[str, Any] = {
                "variant": v.name,
                "method": runs[0]["method"] if runs else "",
                "metric": key,
                "accuracy": Stat.of(r[key] for r in runs),
                "gap_closure": None,
                "vs_target": None,
                "deploy_params": _first(r["deploy_params"] for r in runs),
                "latency_ms_b1": Stat.of(r["latency_ms_b1"] for r in runs),
                "latency_ms_b64": Stat.of(r["latency_ms_b64"] for r in runs),
                "train_time_s": Stat.of(r["train_time_s"] for r in runs),
                "epochs": Stat.of(r.get("epochs") for r in runs),
                "deployed_epoch": Stat.of(r.get("deployed_epoch") for r in runs),
            }
            if spec.lower and spec.upper:
                entry["gap_closure"] = Stat.of(
                    gap_closures(mine, dataset, v.name, spec.lower, spec.upper)
                )
            if spec.target and v.name != spec.target and runs:
                entry["vs_target"] = paired_difference(per_seed[v.name], per_seed[spec.target])
            entries.append(entry)
        out[dataset] = entries
    return out


def _first(values: Iterable[Any]) -> Any:
    return next((v for v in values if v is not None), None)


# ---------------------------------------------------------------------------------------------
# summary.md
# ---------------------------------------------------------------------------------------------


def format_summary(
    spec: SummarySpec,
    overrides: Sequence[str],
    rows: Sequence[Mapping[str, Any]],
    failures: Mapping[str, str],
) -> str:
    lines = [
        f"# Compare: {spec.path}",
        "",
        f"Base config `{spec.base}`; spec overrides: {_code(spec.overrides)}; command-line "
        f"overrides: {_code(overrides)}; seeds: {', '.join(map(str, spec.seeds))}.",
        "",
        "Deployment metric: test accuracy of the deployment path, or its test mIoU for "
        "segmentation datasets (ordinary modalities only; "
        "`full_multimodal` also reads the privileged ones at test). Mean ± sample standard "
        "deviation over seeds; n = number of finished seeds. Latency: median of 7 calls of "
        "the deployed model (RUN/deploy) on a random batch of 1 or 64, one CPU thread.",
    ]
    if spec.lower and spec.upper:
        lines += [
            "",
            f"Gap closure = (variant - {spec.lower}) / ({spec.upper} - {spec.lower}), computed "
            f"per seed (seed k against seed k of {spec.lower} and {spec.upper}), then mean ± "
            "std over those seeds and the 95% Student-t interval (CI) of that mean.",
        ]
    if spec.target:
        lines += ["", f"Versus `{spec.target}`, the test used: {PAIRED_TEST}."]
    lines += [
        "",
        f"Figures from fewer than {HEADLINE_SEEDS} seeds are not headline figures "
        "(each table says so below it).",
    ]
    for dataset, entries in summarize(spec, rows).items():
        lines += ["", f"## {dataset}", ""]
        lines += _table(spec, entries)
        fewest = _fewest_seeds(spec, entries)
        if fewest is not None and fewest < HEADLINE_SEEDS:
            paired = f" paired with `{spec.target}`" if spec.target else ""
            lines += [
                "",
                f"**Fewer than {HEADLINE_SEEDS} seeds: not a headline figure** (fewest seeds"
                f"{paired} here: {fewest}).",
            ]
    if not rows:
        lines += ["", "No run has finished yet."]
    if failures:
        lines += ["", "## Failed runs", ""]
        lines += [f"- `{name}`: {error}" for name, error in failures.items()]
    return "\n".join(lines) + "\n"


def _table(spec: SummarySpec, entries: Sequence[Mapping[str, Any]]) -> list[str]:
    metric = entries[0]["metric"] if entries else "test_deploy_accuracy"
    header = ["variant", "method", "n", METRIC_LABELS[metric]]
    if spec.lower and spec.upper:
        header.append("gap closure")
    if spec.target:
        header.append(f"vs {spec.target} (paired by seed)")
    header += [
        "epochs trained / deployed",
        "deploy params",
        "latency b1 / b64 (ms)",
        "train time (s)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for e in entries:
        cells = [e["variant"], e["method"] or "-", str(e["accuracy"].n), e["accuracy"].fmt()]
        if spec.lower and spec.upper:
            cells.append(_with_interval(e["gap_closure"], 2))
        if spec.target:
            cells.append(_vs_target(e, spec.target))
        params = e["deploy_params"]
        cells += [
            f"{_num(e['epochs'].mean, 1)} / {_num(e['deployed_epoch'].mean, 1)}",
            f"{params:,}" if params is not None else "n/a",
            f"{_num(e['latency_ms_b1'].mean, 2)} / {_num(e['latency_ms_b64'].mean, 2)}",
            _num(e["train_time_s"].mean, 0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _fewest_seeds(spec: SummarySpec, entries: Sequence[Mapping[str, Any]]) -> int | None:
    """The fewest seeds behind a figure of the table: the paired differences where there is
    a target, else the means (variants without a finished run have no figure)."""
    if spec.target:
        counts = [e["vs_target"].n for e in entries if e["vs_target"] is not None]
    else:
        counts = [e["accuracy"].n for e in entries if e["accuracy"].n > 0]
    return min(counts, default=None)


def _with_interval(stat: Stat, digits: int) -> str:
    """mean ± std, then the 95% interval where there are 2 seeds or more."""
    if stat.n < 2:
        return stat.fmt(digits)
    lo, hi = stat.interval
    return f"{stat.fmt(digits)}, CI [{lo:.{digits}f}, {hi:.{digits}f}]"


def _vs_target(entry: Mapping[str, Any], target: str) -> str:
    """The paired difference from the target: mean ± std, 95% CI, seeds and the verdict."""
    if entry["variant"] == target:
        return "(target)"
    diff: Stat | None = entry["vs_target"]
    if diff is None or diff.n == 0:
        return "n/a"
    if diff.n == 1:
        return f"{diff.mean:+.4f} (1 seed: not judged)"
    lo, hi = diff.interval
    if diff.excludes_zero:
        verdict = "higher" if lo > 0 else "lower"
    else:
        verdict = "interval contains 0: not distinguishable"
    return (
        f"{diff.mean:+.4f} ± {diff.std:.4f}, CI [{lo:+.4f}, {hi:+.4f}], {diff.n} seeds ({verdict})"
    )


def _num(value: float, digits: int) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _code(items: Sequence[str]) -> str:
    return " ".join(f"`{item}`" for item in items) if items else "none"


# ---------------------------------------------------------------------------------------------
# results.csv and summary.csv
# ---------------------------------------------------------------------------------------------


def format_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """results.csv: one row per run, CSV_COLUMNS; a value the run lacks is empty."""
    return _csv_text(CSV_COLUMNS, rows)


def summary_rows(spec: SummarySpec, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """summary.csv's rows (SUMMARY_COLUMNS): the figures of summary.md, unrounded."""
    table = []
    for dataset, entries in summarize(spec, rows).items():
        for e in entries:
            diff: Stat | None = e["vs_target"]
            table.append(
                {
                    "dataset": dataset,
                    "variant": e["variant"],
                    "method": e["method"],
                    "metric": e["metric"],
                    **_stat_columns("", e["accuracy"]),
                    **_stat_columns("diff_", diff),
                    **_stat_columns("gap_closure_", e["gap_closure"]),
                    "diff_excludes_zero": None if diff is None else diff.excludes_zero,
                    "epochs_mean": _mean_or_none(e["epochs"]),
                    "deployed_epoch_mean": _mean_or_none(e["deployed_epoch"]),
                }
            )
    return table


def format_summary_csv(spec: SummarySpec, rows: Sequence[Mapping[str, Any]]) -> str:
    return _csv_text(SUMMARY_COLUMNS, summary_rows(spec, rows))


def _mean_or_none(stat: Stat) -> float | None:
    return None if math.isnan(stat.mean) else stat.mean


def _stat_columns(prefix: str, stat: Stat | None) -> dict[str, float | int | None]:
    """n, mean, std, lo, hi of ``stat`` under ``prefix``; None (an empty cell) for what is
    undefined (no such statistic, or nan)."""
    if stat is None:
        return {f"{prefix}{part}": None for part in ("n", "mean", "std", "lo", "hi")}
    lo, hi = stat.interval
    values = {"mean": stat.mean, "std": stat.std, "lo": lo, "hi": hi}
    return {
        f"{prefix}n": stat.n,
        **{f"{prefix}{k}": None if math.isnan(v) else v for k, v in values.items()},
    }


def _csv_text(columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# The learning curve (train_sizes)
# ---------------------------------------------------------------------------------------------

LEARNING_CURVE_COLUMNS = ("source", "variant", "train_rows", "n", "mean", "std", "lo", "hi")


def learning_curves(
    spec: SummarySpec, rows: Sequence[Mapping[str, Any]]
) -> dict[str, dict[str, list[tuple[int, Stat]]]]:
    """Per dataset (``source``) and variant: (training rows, the deployment metric over
    seeds) for every size, smallest first."""
    curves: dict[str, dict[str, list[tuple[int, Stat]]]] = {}
    for source in dict.fromkeys(r.get("source") or r["dataset"] for r in rows):
        mine = [r for r in rows if (r.get("source") or r["dataset"]) == source]
        key = metric_key(mine)
        sizes = sorted({int(r["train_rows"]) for r in mine if r.get("train_rows")})
        curves[source] = {
            v.name: [
                (
                    size,
                    Stat.of(
                        r[key] for r in mine if r["variant"] == v.name and r["train_rows"] == size
                    ),
                )
                for size in sizes
            ]
            for v in spec.variants
        }
    return curves


def rows_worth(curve: Sequence[tuple[int, Stat]], value: float) -> float:
    """The training rows at which ``curve`` (the lower reference's) reaches ``value``,
    interpolated linearly in log(rows) between its sizes; inf beyond its largest, nan below
    its smallest."""
    points = [(n, s.mean) for n, s in curve if not math.isnan(s.mean)]
    for (n0, m0), (n1, m1) in zip(points, points[1:], strict=False):
        if m0 <= value <= m1 and m1 > m0:
            t = (value - m0) / (m1 - m0)
            return math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0)))
    if points and value > max(m for _, m in points):
        return math.inf
    return math.nan


def format_learning_curve(spec: SummarySpec, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """summary.md's learning-curve section: the metric per variant and size (mean, 95%
    t-interval over seeds) and, with a target and a lower reference (reference.lower, else
    the ordinary_only variant), how many training rows the lower reference needs to match
    the target at each size."""
    lines = ["## Learning curve", ""]
    for source, curve in learning_curves(spec, rows).items():
        sizes = [n for n, _ in next(iter(curve.values()), [])]
        lines += [f"### {source}", ""]
        lines += ["| variant | " + " | ".join(f"{n} rows" for n in sizes) + " |"]
        lines += ["|" + " --- |" * (len(sizes) + 1)]
        for variant, points in curve.items():
            lines.append(
                f"| {variant} | " + " | ".join(_with_interval(s, 4) for _, s in points) + " |"
            )
        lower = spec.lower or next(
            (r["variant"] for r in rows if r.get("method") == "ordinary_only"), None
        )
        if spec.target and lower and spec.target in curve and lower in curve:
            worth = []
            for n, target in curve[spec.target]:
                rows_needed = rows_worth(curve[lower], target.mean)
                shown = (
                    f"more than {sizes[-1]}"
                    if math.isinf(rows_needed)
                    else "fewer than the smallest size"
                    if math.isnan(rows_needed)
                    else f"{rows_needed:.0f}"
                )
                worth.append(f"{n}: {shown}")
            lines += [
                "",
                f"Rows of `{lower}` that match `{spec.target}`'s mean at each size "
                f"(interpolated in log rows between the sizes): {'; '.join(worth)}.",
            ]
        lines.append("")
    return lines


def format_learning_curve_csv(spec: SummarySpec, rows: Sequence[Mapping[str, Any]]) -> str:
    table = [
        {"source": source, "variant": variant, "train_rows": n, **_stat_columns("", stat)}
        for source, curve in learning_curves(spec, rows).items()
        for variant, points in curve.items()
        for n, stat in points
    ]
    return _csv_text(LEARNING_CURVE_COLUMNS, table)


def plot_learning_curve(spec: SummarySpec, rows: Sequence[Mapping[str, Any]], path: str) -> None:
    """Per dataset: the deployment metric against training rows (log scale) for every
    variant, error bars = 95% t-interval over seeds."""
    from matplotlib.figure import Figure

    curves = learning_curves(spec, rows)
    fig = Figure(figsize=(6.0 * max(1, len(curves)), 4.2))
    axes = fig.subplots(1, max(1, len(curves)), squeeze=False)[0]
    for ax, (source, curve) in zip(axes, curves.items(), strict=False):
        for variant, points in curve.items():
            points = [(n, s) for n, s in points if s.n]
            if not points:
                continue
            means = [s.mean for _, s in points]
            halves = [
                0.0 if math.isnan(s.interval[0]) else s.mean - s.interval[0] for _, s in points
            ]
            style = {"lw": 2.5} if variant == spec.target else {"lw": 1.2}
            ax.errorbar(
                [n for n, _ in points],
                means,
                yerr=halves,
                marker="o",
                capsize=3,
                label=variant,
                **style,
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training rows")
        ax.set_ylabel(METRIC_LABELS.get(metric_key(rows), "test metric"))
        ax.set_title(f"{source} (mean, 95% CI over seeds)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)


# ---------------------------------------------------------------------------------------------
# summary.png
# ---------------------------------------------------------------------------------------------


def plot_summary(spec: SummarySpec, rows: Sequence[Mapping[str, Any]], path: str) -> None:
    """Per dataset: deployment accuracy (and gap closure) per variant, error bars = std."""
    from matplotlib.figure import Figure

    summary = summarize(spec, rows)
    panels = 2 if spec.lower and spec.upper else 1
    columns = max(1, len(summary))
    width = max(5.0, 0.7 * len(spec.variants) + 2)
    fig = Figure(figsize=(width * columns, 3.6 * panels))
    axes = fig.subplots(panels, columns, squeeze=False)
    for col, (dataset, entries) in enumerate(summary.items() or [("no runs", [])]):
        names = [e["variant"] for e in entries]
        xs = range(len(names))
        metric = entries[0]["metric"] if entries else "test_deploy_accuracy"
        plots = [("accuracy", METRIC_LABELS[metric])]
        if panels == 2:
            plots.append(("gap_closure", "gap closure"))
        for row, (key, label) in enumerate(plots):
            ax = axes[row][col]
            means = [e[key].mean for e in entries]
            errs = [0.0 if math.isnan(e[key].std) else e[key].std for e in entries]
            colors = ["tab:red" if n == spec.target else "tab:blue" for n in names]
            ax.bar(xs, means, yerr=errs, capsize=4, color=colors)
            ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
            ax.set_ylabel(label)
            if key == "gap_closure":
                ax.axhline(0, color="grey", lw=0.8)
                ax.axhline(1, color="grey", lw=0.8, ls="--")
            if row == 0:
                ax.set_title(f"{dataset} (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    save_png(fig, path)
