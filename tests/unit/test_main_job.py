"""The main job's table: gap closure and formatting (the training itself is integration)."""

from __future__ import annotations

import math

import pytest

from osmd_ray.experiments.main_job import format_table, results_table
from osmd_ray.experiments.stats import gap_closure


def test_gap_closure_definition():
    assert gap_closure(0.7, 0.6, 0.8) == pytest.approx(0.5)
    assert gap_closure(0.6, 0.6, 0.8) == pytest.approx(0.0)
    assert gap_closure(0.5, 0.6, 0.8) == pytest.approx(-0.5)
    assert math.isnan(gap_closure(0.7, 0.6, 0.6))


def _metrics(acc: float, privileged: bool) -> dict:
    return {
        "test": {"deploy": {"accuracy": acc}},
        "privileged_at_test": privileged,
        "train_time_s": 12.0,
        "epochs": 14 if privileged else 10,
        "deployed_epoch": 11 if privileged else 10,
    }


def test_results_table_rows_and_markdown():
    rows = results_table(
        {
            "ordinary_only": _metrics(0.60, False),
            "full_multimodal": _metrics(0.90, True),
            "osmd": _metrics(0.75, False),
        }
    )
    by_method = {r["method"]: r for r in rows}
    assert by_method["osmd"]["gap_closure"] == pytest.approx(0.5)
    assert by_method["ordinary_only"]["gap_closure"] == pytest.approx(0.0)
    assert by_method["full_multimodal"]["gap_closure"] == pytest.approx(1.0)
    text = format_table(rows)
    assert "| osmd | 0.7500 | no | 0.50 | 10 / 10 | 12 |" in text
    assert "| full_multimodal | 0.9000 | yes | 1.00 | 14 / 11 | 12 |" in text
