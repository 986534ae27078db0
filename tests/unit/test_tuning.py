"""`osmd compare --tune`: the search space of each method, the spec key and the flag, and
tuned values reaching every seed's run (the sweeps themselves: tests/integration)."""

from __future__ import annotations

import pytest
import yaml

from osmd_ray.config import load_config
from osmd_ray.errors import SpecError
from osmd_ray.experiments.compare import load_spec, plan_runs
from osmd_ray.experiments.tuning import SPREAD, Tuned, format_tuning, search_space, tuned_keys


def _cfg(configs_dir, *overrides):
    return load_config(configs_dir / "osmd_synth.yaml", list(overrides))


def test_each_method_searches_its_learning_rate_and_only_the_weights_it_uses(configs_dir):
    assert tuned_keys(_cfg(configs_dir, "method=ordinary_only")) == ["train.lr"]
    assert tuned_keys(_cfg(configs_dir, "method=labels_only")) == ["train.lr"]
    assert tuned_keys(_cfg(configs_dir, "method=logit_kd")) == [
        "train.lr",
        "baselines.kd_temperature",
    ]
    osmd = _cfg(configs_dir, "method=osmd", "loss.w_jan=0", "loss.w_mimic=0.5")
    keys = tuned_keys(osmd)
    assert keys[0] == "train.lr" and "loss.w_mimic" in keys
    assert "loss.w_jan" not in keys  # a zero weight is a term left out, not searched
    assert "loss.w_deploy" not in keys  # the label term sets the scale


def test_the_space_spans_a_third_to_three_times_the_untuned_values(configs_dir):
    space = search_space(_cfg(configs_dir, "method=osmd", "train.lr=0.002", "loss.w_kd=1.5"))
    by_key = {p.key: p for p in space}
    assert all(p.domain == "loguniform" for p in space)
    assert (by_key["train.lr"].low, by_key["train.lr"].high) == pytest.approx(
        (0.002 / SPREAD, 0.002 * SPREAD)
    )
    assert (by_key["loss.w_kd"].low, by_key["loss.w_kd"].high) == pytest.approx((0.5, 4.5))


def _spec(tmp_path, **extra) -> str:
    path = tmp_path / "spec.yaml"
    data = {
        "base": "osmd_synth.yaml",
        "variants": [
            {"name": "ordinary_only", "overrides": ["method=ordinary_only"]},
            {"name": "osmd", "overrides": ["method=osmd"]},
        ],
        "seeds": 2,
        **extra,
    }
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_the_budget_comes_from_the_spec_or_the_flag_and_bad_ones_are_refused(
    tmp_path, configs_dir, monkeypatch
):
    monkeypatch.chdir(configs_dir)  # the spec's base is relative
    assert load_spec(_spec(tmp_path)).tune == 0
    assert load_spec(_spec(tmp_path, tune=6)).tune == 6
    assert load_spec(_spec(tmp_path, tune=6), tune=3).tune == 3  # the flag wins
    with pytest.raises(SpecError, match="'tune'"):
        load_spec(_spec(tmp_path, tune="many"))
    with pytest.raises(SpecError, match="--tune must be an integer >= 0"):
        load_spec(_spec(tmp_path), tune=-1)


def test_tuned_values_reach_every_seed_of_their_variant_only(tmp_path, configs_dir, monkeypatch):
    monkeypatch.chdir(configs_dir)
    spec = load_spec(_spec(tmp_path))
    runs = plan_runs(
        spec, str(tmp_path / "out"), tuned={("synth_cls", "osmd"): ["train.lr=0.0025"]}
    )
    lrs = {(r.variant, r.seed): r.cfg.train.lr for r in runs}
    assert lrs == {
        ("ordinary_only", 0): 1e-3,
        ("ordinary_only", 1): 1e-3,
        ("osmd", 0): 0.0025,
        ("osmd", 1): 0.0025,
    }


def test_summary_states_the_budget_and_each_choice():
    lines = format_tuning(
        {("synth", "osmd"): Tuned(("train.lr",), ("train.lr=0.002",), "abc", 0.91)}, trials=8
    )
    text = "\n".join(lines)
    assert "8 trials of `osmd sweep`" in text
    assert "| synth | osmd | train.lr | `train.lr=0.002` | 0.9100 |" in text


def test_a_saved_tuning_stays_valid_when_a_newer_config_adds_a_key_with_its_default():
    from osmd_ray.config import Config, config_to_dict
    from osmd_ray.experiments.tuning import same_sweep

    record = yaml.safe_dump(
        {"metric": "val.deploy.accuracy", "base_config": config_to_dict(Config())}
    )
    older = yaml.safe_load(record)
    del older["base_config"]["data"]["train_rows"]  # written before the key existed
    assert same_sweep(yaml.safe_dump(older), record)
    older["base_config"]["train"]["lr"] = 0.5
    assert not same_sweep(yaml.safe_dump(older), record)
    assert not same_sweep(None, record)
