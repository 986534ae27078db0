"""data.train_rows: training on a nested subset of the training split (learning curves)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from osmd_ray.config import load_config
from osmd_ray.data.reading import subset_rows
from osmd_ray.data.schema import read_manifest
from osmd_ray.errors import ConfigError
from osmd_ray.train import runner
from osmd_ray.train.runner import train


def test_subsets_are_nested_sorted_and_the_same_whatever_the_run():
    small, large = subset_rows(1000, 250), subset_rows(1000, 500)
    assert len(small) == 250 and len(set(small)) == 250
    assert set(small) <= set(large)
    assert (np.diff(small) > 0).all()
    assert (subset_rows(1000, 250) == small).all()
    assert (subset_rows(1000, 0) == np.arange(1000)).all()
    assert (subset_rows(1000, 1000) == np.arange(1000)).all()


def _cfg(configs_dir, tiny_synth, fast, *overrides):
    return load_config(
        configs_dir / "osmd_synth.yaml",
        [*fast, f"data.root={tiny_synth}", "scaling.num_workers=0", *overrides],
    )


def test_more_rows_than_the_split_holds_are_refused_by_name(configs_dir, tiny_synth, fast):
    from osmd_ray.config import check_against_manifest

    cfg = _cfg(configs_dir, tiny_synth, fast, "data.train_rows=257")  # the split holds 256
    with pytest.raises(ConfigError, match=r"'data.train_rows' is 257.*has 256 rows"):
        check_against_manifest(cfg, read_manifest(tiny_synth))
    with pytest.raises(ConfigError, match="data.train_rows"):
        _cfg(configs_dir, tiny_synth, fast, "data.train_rows=-1")


def test_an_in_process_run_trains_on_the_subset_and_scores_val_and_test_whole(
    configs_dir, tiny_synth, fast, tmp_path
):
    cfg = _cfg(configs_dir, tiny_synth, fast, "data.train_rows=96", "train.epochs=2")
    metrics = train(cfg, str(tmp_path / "run"))
    assert metrics["rows"] == {"train": 96, "val": 64, "test": 64}
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["step"] for h in history] == [3, 6]  # 96 rows // batch 32 = 3 steps an epoch


def test_workers_get_the_subset_read_into_memory(configs_dir, tiny_synth, fast, tmp_path):
    cfg = _cfg(configs_dir, tiny_synth, fast, "data.train_rows=100", "scaling.num_workers=2")
    cfg.data.in_memory_mb = 0  # would stream every split; the subset is read whole
    trainer = runner.build_trainer(cfg, read_manifest(tiny_synth), str(tmp_path / "run"))
    assert trainer.datasets["train"].count() == 100
    assert trainer.datasets["val"].count() == 64
