"""The main job (``make run``): ordinary_only, full_multimodal and osmd on the default data."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from osmd_ray import storage
from osmd_ray.config import apply_overrides, load_config
from osmd_ray.data.synth import write_synth_dataset
from osmd_ray.experiments.stats import gap_closure
from osmd_ray.train.runner import train

METHODS_IN_TABLE = ("ordinary_only", "full_multimodal", "osmd")


def ensure_synthetic_data(root: str) -> None:
    """Generate the default synthetic RGB-D set into ``root`` unless a dataset is there."""
    if os.path.exists(os.path.join(root, "manifest.json")):
        return

    print(f"[osmd] generating the default synthetic RGB-D set into {root}")
    write_synth_dataset(root)


def results_table(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method: deployment accuracy on test, privileged at test, gap closure,
    the epochs trained and the one deployed."""
    acc = {m: r["test"]["deploy"]["accuracy"] for m, r in results.items()}
    rows = []
    for method, metrics in results.items():
        rows.append(
            {
                "method": method,
                "test_deploy_accuracy": acc[method],
                "privileged_at_test": bool(metrics["privileged_at_test"]),
                "gap_closure": gap_closure(
                    acc[method], acc["ordinary_only"], acc["full_multimodal"]
                ),
                "epochs": metrics.get("epochs"),
                "deployed_epoch": metrics.get("deployed_epoch"),
                "train_time_s": metrics["train_time_s"],
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table (printed and written to summary.md)."""
    lines = [
        "| method | test accuracy (deployment path) | privileged at test | gap closure | "
        "epochs trained / deployed | train time (s) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['test_deploy_accuracy']:.4f} | "
            f"{'yes' if r['privileged_at_test'] else 'no'} | {r['gap_closure']:.2f} | "
            f"{r['epochs']} / {r['deployed_epoch']} | {r['train_time_s']:.0f} |"
        )
    return "\n".join(lines)


def run_main_job(config_path: str, out: str, overrides: Sequence[str] = ()) -> list[dict]:
    """Train the three methods into ``out/<method>`` and print and save the table."""

    base = load_config(config_path, overrides)
    ensure_synthetic_data(base.data.root)
    results = {}
    for method in METHODS_IN_TABLE:
        print(
            f"[osmd] training {method} ({base.train.epochs} epochs, "
            f"{base.scaling.num_workers} workers)",
            flush=True,
        )
        results[method] = train(
            apply_overrides(base, [f"method={method}"]), os.path.join(out, method)
        )
    rows = results_table(results)
    table = format_table(rows)
    summary = f"# Main job: {config_path} {' '.join(overrides)}\n\n{table}\n"
    storage.write_bytes(os.path.join(out, "summary.md"), summary.encode("utf-8"))
    print("\n" + table + "\n")
    print(f"runs and summary.md in {os.path.abspath(out)}")
    return rows
