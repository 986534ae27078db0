"""`osmd compare` without Ray: the spec, the grid, statistics, output files and resuming.

Training is replaced by a fake that writes what a finished run folder holds (config.yaml,
metrics.json, deploy/meta.json); the deployment measurement by a fake as well, except in the
one test that measures a real export.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml

from osmd_ray.cli import main
from osmd_ray.config import dump_yaml, load_config
from osmd_ray.errors import ConfigError, SpecError
from osmd_ray.experiments import compare as compare_mod
from osmd_ray.experiments.compare import DeployStats, load_spec, plan_runs, run_compare
from osmd_ray.experiments.summary import (
    CSV_COLUMNS,
    SUMMARY_COLUMNS,
    format_summary,
    format_summary_csv,
    gap_closures,
    metric_key,
    summarize,
)

REPO = Path(__file__).resolve().parents[2]
BASE = str(REPO / "configs" / "osmd_synth.yaml")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def spec_dict(**changes) -> dict:
    spec = {
        "base": BASE,
        "variants": [
            {"name": "ordinary_only", "overrides": ["method=ordinary_only"]},
            {"name": "full_multimodal", "overrides": ["method=full_multimodal"]},
            {"name": "osmd", "overrides": ["method=osmd"]},
        ],
        "seeds": 2,
        "reference": {"lower": "ordinary_only", "upper": "full_multimodal"},
        "target": "osmd",
    }
    spec.update(changes)
    return spec


def write_spec(tmp_path: Path, **changes) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_dict(**changes)))
    return str(path)


# ---------------------------------------------------------------------------------------------
# The spec
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "key", "words"),
    [
        ({"variantz": []}, "variantz", ["did you mean 'variants'"]),
        ({"variants": []}, "variants", ["non-empty list"]),
        (
            {"reference": {"lower": "ordinary_only", "upper": "multimodal"}},
            "reference.upper",
            ["'multimodal'", "full_multimodal"],
        ),
        ({"reference": {"lower": "ordinary_only"}}, "reference.upper", ["missing"]),
        ({"target": "osmdd"}, "target", ["not a variant"]),
        ({"seeds": 0}, "seeds", ["positive"]),
        ({"seeds": [0, 1, 1]}, "seeds", ["more than once"]),
        ({"seeds": ["a"]}, "seeds", ["list of seeds"]),
        ({"overrides": ["seed=3"]}, "overrides", ["'seed'", "seeds"]),
        ({"base": "no_such.yaml"}, "base", ["no_such.yaml", "not a file"]),
        (
            {"datasets": [{"name": "a", "root": "x"}, {"name": "a", "root": "y"}]},
            "datasets[1].name",
            ["repeats"],
        ),
        ({"datasets": [{"name": "a", "rot": "x"}]}, "datasets[0].rot", ["did you mean 'root'"]),
    ],
)
def test_spec_errors_name_the_key(tmp_path, changes, key, words):
    with pytest.raises(SpecError) as info:
        load_spec(write_spec(tmp_path, **changes))
    assert info.value.key == key
    message = str(info.value)
    assert repr(key) in message
    for word in words:
        assert word in message


def test_duplicate_and_badly_named_variants_are_refused(tmp_path):
    twice = [{"name": "osmd", "overrides": []}, {"name": "osmd", "overrides": ["loss.w_jan=0"]}]
    with pytest.raises(SpecError, match="repeats the variant name 'osmd'") as info:
        load_spec(write_spec(tmp_path, variants=twice, reference=None, target=None))
    assert info.value.key == "variants[1].name"
    with pytest.raises(SpecError, match="folder") as info:
        load_spec(write_spec(tmp_path, variants=[{"name": "a/b"}], reference=None, target=None))
    assert info.value.key == "variants[0].name"


def test_base_is_found_beside_the_spec_and_seeds_take_both_forms(tmp_path):
    (tmp_path / "train.yaml").write_text(Path(BASE).read_text())
    spec = load_spec(write_spec(tmp_path, base="train.yaml", seeds=[3, 7]))
    assert Path(spec.base) == tmp_path / "train.yaml"
    assert spec.seeds == (3, 7)
    assert load_spec(write_spec(tmp_path, seeds=3)).seeds == (0, 1, 2)
    assert load_spec(write_spec(tmp_path, seeds=3), seeds=2).seeds == (0, 1)  # --seeds wins
    with pytest.raises(SpecError, match="--seeds"):
        load_spec(write_spec(tmp_path), seeds=0)


def test_a_variant_whose_config_fails_is_named_before_anything_runs(tmp_path):
    variants = spec_dict()["variants"] + [
        {"name": "broken", "overrides": ["method=osmd", "loss.w_jann=0"]}
    ]
    spec = load_spec(write_spec(tmp_path, variants=variants))
    with pytest.raises(ConfigError) as info:
        plan_runs(spec, str(tmp_path / "out"))
    assert str(info.value).startswith("variant 'broken': ")
    assert "loss.w_jann" in str(info.value) and "loss.w_jan" in str(info.value)
    assert info.value.key == "loss.w_jann"
    assert not (tmp_path / "out").exists()


def test_the_grid_applies_overrides_in_order(tmp_path):
    spec = load_spec(
        write_spec(
            tmp_path,
            overrides=["train.epochs=3", "loss.w_jan=0.5"],
            variants=[
                {"name": "osmd", "overrides": ["method=osmd"]},
                {"name": "no_jmmd", "overrides": ["method=osmd", "loss.w_jan=0"]},
            ],
            reference=None,
            datasets=[{"name": "a", "root": "data/a"}, {"root": "other/b-set"}],
        )
    )
    runs = plan_runs(spec, "OUT", ["train.epochs=1"])
    assert [r.name for r in runs[:4]] == [
        "a/osmd/seed0",
        "a/no_jmmd/seed0",
        "a/osmd/seed1",
        "a/no_jmmd/seed1",
    ]
    assert len(runs) == 8 and runs[-1].name == "b-set/no_jmmd/seed1"
    by_name = {r.name: r for r in runs}
    assert by_name["a/osmd/seed1"].run_dir == os.path.join("OUT", "runs", "a", "osmd", "seed1")
    assert by_name["a/osmd/seed1"].cfg.seed == 1
    assert by_name["a/osmd/seed0"].cfg.loss.w_jan == 0.5  # the spec's overrides
    assert by_name["a/no_jmmd/seed0"].cfg.loss.w_jan == 0.0  # the variant's win over them
    assert all(r.cfg.train.epochs == 1 for r in runs)  # the command line's win over both
    assert by_name["b-set/osmd/seed0"].cfg.data.root == "other/b-set"
    assert all(r.cfg.tracking.group == "spec" for r in runs)


def test_command_line_may_not_set_what_the_grid_sets(tmp_path):
    spec = load_spec(write_spec(tmp_path))
    with pytest.raises(ConfigError, match="seeds"):
        plan_runs(spec, "OUT", ["seed=4"])
    with pytest.raises(ConfigError, match="variant"):
        plan_runs(spec, "OUT", ["method=osmd"])


@pytest.mark.parametrize(
    "name",
    ["compare_synth.yaml", "ablate_synth.yaml", "compare_synth_seg.yaml", "compare_e_h_synth.yaml"],
)
def test_shipped_compare_specs_validate(name):
    spec = load_spec(REPO / "configs" / name)
    runs = plan_runs(spec, "OUT")  # every variant's overrides through load_config
    assert len(runs) == len(spec.variants) * len(spec.seeds) * len(spec.datasets)
    assert spec.lower == "ordinary_only" and spec.upper == "full_multimodal"
    assert spec.target == "osmd"
    methods = {r.variant: r.cfg.method for r in runs}
    assert methods["osmd"] == "osmd" and methods["ordinary_only"] == "ordinary_only"


def test_e_h_sizes_change_only_the_hallucination_encoder():
    runs = plan_runs(load_spec(REPO / "configs/compare_e_h_synth.yaml"), "O")
    shapes = {
        r.variant: (r.cfg.model.hallucination_width, r.cfg.model.hallucination_depth)
        for r in runs
        if r.cfg.method == "osmd"
    }
    assert shapes == {"osmd_e_h_like_e_o": (1, 0), "osmd_e_h_narrow": (0.25, 0), "osmd": (0.25, 1)}


def test_ablations_change_exactly_their_piece():
    runs = {r.variant: r.cfg for r in plan_runs(load_spec(REPO / "configs/ablate_synth.yaml"), "O")}
    osmd = runs["osmd"]
    assert osmd.loss.w_jan == 0 and osmd.loss.w_recon > 0  # the project's defaults
    design = runs["design_s2"].loss
    assert design.w_jan == 1 and design.w_recon == 0 and design.w_kd == 0
    assert runs["with_jmmd"].loss.w_jan == 1 and runs["with_jmmd"].loss.alignment == "jmmd"
    assert runs["with_mmd"].loss.w_jan == 1 and runs["with_mmd"].loss.alignment == "mmd"
    assert runs["mimic_instead"].loss.w_mimic == 1 and runs["mimic_instead"].loss.w_recon == 0
    assert runs["no_recon"].loss.w_recon == 0
    assert osmd.loss.w_kd > 0 and osmd.loss.kd_source == "privileged"
    assert runs["no_kd"].loss.w_kd == 0
    assert runs["kd_from_teacher"].loss.kd_source == "teacher"
    assert runs["inverse_recon"].model.recon_target == "inverse"
    unet = runs["unet_disparity"].model
    assert (unet.hallucination, unet.recon_target) == ("unet", "inverse")
    assert (unet.hallucination_width, unet.hallucination_depth) == (1, 0)
    assert (osmd.model.hallucination, osmd.model.recon_target) == ("encoder", "input")
    assert runs["pooled_recon"].model.recon_mode == "pooled"
    assert runs["concat_fusion"].model.fusion == "concat"
    assert runs["sum_fusion"].model.fusion == "sum"
    assert runs["unshared_translator"].model.shared_translator is False
    assert runs["unshared_fusion"].model.share_fusion is False
    assert all(
        cfg.method == "osmd"
        for name, cfg in runs.items()
        if name not in ("ordinary_only", "full_multimodal")
    )


def _grads(cfg, model, batch) -> dict[str, torch.Tensor]:
    """Gradients of the run's whole objective on every parameter (zeros where none)."""
    from osmd_ray.train.epoch import batch_losses

    model.zero_grad(set_to_none=True)
    batch_losses(model(batch), batch, cfg)["total"].backward()
    return {
        name: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        for name, p in model.named_parameters()
    }


@pytest.mark.parametrize(
    "name, output_size", [("compare_synth.yaml", None), ("compare_synth_seg.yaml", (8, 8))]
)
def test_labels_only_control_trains_the_deployment_network_without_privileged_data(
    name, output_size, rgbd_batch
):
    """The control must learn the same whatever the privileged inputs hold (else it leaks
    what it is meant to exclude); osmd's deployment network must not. Every gradient counts,
    not only the deployment parameters': the global gradient-norm clipping (train.grad_clip)
    scales the deployment path's step by the norm over all of them."""
    from osmd_ray.methods import build_training_net

    runs = {r.variant: r.cfg for r in plan_runs(load_spec(REPO / "configs" / name), "O")}
    rgb, depth, batch = rgbd_batch(6, output_size or ())
    gen = torch.Generator().manual_seed(1)
    other_depth = dict(batch, depth=torch.rand(6, 1, 8, 8, generator=gen) * 4 + 1)
    changed, deploy_changed = {}, {}
    for variant in ("labels_only", "osmd"):
        cfg = runs[variant]
        cfg.model.width, cfg.model.depth, cfg.model.feature_dim = 4, 2, 8
        torch.manual_seed(0)
        model = build_training_net("osmd", [rgb], [depth], 3, cfg.model, None, output_size)
        first, second = _grads(cfg, model, batch), _grads(cfg, model, other_depth)
        deploy = {n for n, _ in model.deploy_module().named_parameters()}
        assert any(first[n].abs().sum() > 0 for n in deploy)
        changed[variant] = [k for k in first if not torch.allclose(first[k], second[k])]
        deploy_changed[variant] = [k for k in changed[variant] if k in deploy]
    assert changed["labels_only"] == []
    assert deploy_changed["osmd"], "osmd's deployment network should learn from depth"


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def _row(variant: str, seed: int, acc: float, dataset: str = "d") -> dict:
    return {"dataset": dataset, "variant": variant, "seed": seed, "test_deploy_accuracy": acc}


def test_gap_closure_pairs_seeds():
    rows = [
        _row("lo", 0, 0.5),
        _row("hi", 0, 0.9),
        _row("m", 0, 0.7),  # seed 0: 0.5
        _row("lo", 1, 0.6),
        _row("hi", 1, 0.8),
        _row("m", 1, 0.8),  # seed 1: 1.0
        _row("m", 2, 0.9),  # seed 2 has no references: left out
        _row("m", 0, 0.1, dataset="other"),  # another dataset: not mixed in
    ]
    assert gap_closures(rows, "d", "m", "lo", "hi") == pytest.approx([0.5, 1.0])
    # Pairing matters: the closure of the means would be (0.75-0.55)/(0.85-0.55) = 0.667.
    assert gap_closures(rows, "d", "lo", "lo", "hi") == pytest.approx([0.0, 0.0])


def test_segmentation_rows_are_ranked_and_closed_on_miou(tmp_path):
    rows = [
        {**_row("lo", 0, 0.9), "test_deploy_miou": 0.3},
        {**_row("hi", 0, 0.95), "test_deploy_miou": 0.7},
        {**_row("m", 0, 0.1), "test_deploy_miou": 0.6},  # pixel accuracy would give < 0
    ]
    assert metric_key(rows) == "test_deploy_miou"
    assert gap_closures(rows, "d", "m", "lo", "hi") == pytest.approx([0.75])
    # Classification rows (no mIoU) keep accuracy.
    assert metric_key([_row("lo", 0, 0.5)]) == "test_deploy_accuracy"
    for row in rows:
        row.update(method="osmd", deploy_params=None, latency_ms_b1=None, latency_ms_b64=None)
        row["train_time_s"] = 1.0
    spec = load_spec(
        write_spec(
            tmp_path,
            variants=[{"name": n, "overrides": []} for n in ("lo", "hi", "m")],
            reference={"lower": "lo", "upper": "hi"},
            target="m",
        )
    )
    entries = summarize(spec, rows)["d"]
    assert [e["accuracy"].mean for e in entries] == pytest.approx([0.3, 0.7, 0.6])
    assert "test mIoU (deploy)" in format_summary(spec, [], rows, {})


def _summary_rows(values: dict[str, list[float]]) -> list[dict]:
    """Finished-run rows of dataset d: variant -> its metric for seeds 0, 1, ..."""
    rows = []
    for variant, accs in values.items():
        for seed, acc in enumerate(accs):
            rows.append(
                {
                    **_row(variant, seed, acc),
                    "method": variant,
                    "deploy_params": None,
                    "latency_ms_b1": None,
                    "latency_ms_b64": None,
                    "train_time_s": 1.0,
                }
            )
    return rows


def _lo_hi_m_spec(tmp_path, seeds: int):
    return load_spec(
        write_spec(
            tmp_path,
            variants=[{"name": n, "overrides": []} for n in ("lo", "hi", "m")],
            reference={"lower": "lo", "upper": "hi"},
            target="m",
            seeds=seeds,
        )
    )


def test_summary_marks_intervals_containing_zero_and_states_the_test(tmp_path):
    # hi - m per seed spreads around 0 (the interval contains 0); lo - m about -0.3 (it does not).
    rows = _summary_rows(
        {
            "lo": [0.50, 0.51, 0.49, 0.50, 0.52],
            "hi": [0.79, 0.82, 0.78, 0.82, 0.80],
            "m": [0.80, 0.80, 0.80, 0.80, 0.80],
        }
    )
    md = format_summary(_lo_hi_m_spec(tmp_path, 5), [], rows, {})
    assert "paired t-interval over seeds, 95%, two-sided" in md  # the test is named
    hi_row = next(line for line in md.splitlines() if line.startswith("| hi |"))
    # hi - m: -0.01 +0.02 -0.02 +0.02 0: mean 0.002, std 0.0179, half-width
    # t(0.975, 4) * std / sqrt(5) = 2.7764 * 0.0179 / 2.2361 = 0.0222.
    assert "+0.0020 ± 0.0179, CI [-0.0202, +0.0242], 5 seeds" in hi_row
    assert "(interval contains 0: not distinguishable)" in hi_row
    lo_row = next(line for line in md.splitlines() if line.startswith("| lo |"))
    assert "5 seeds (lower)" in lo_row and "not distinguishable" not in lo_row
    assert "not a headline figure**" not in md  # 5 paired seeds: a headline figure


def test_summary_warns_below_five_seeds_and_does_not_judge_one(tmp_path):
    rows = _summary_rows({"lo": [0.5, 0.6, 0.7], "hi": [0.9, 0.9, 0.9], "m": [0.8, 0.8]})
    md = format_summary(_lo_hi_m_spec(tmp_path, 3), [], rows, {})
    assert (
        "**Fewer than 5 seeds: not a headline figure** (fewest seeds paired with `m` here: 2)" in md
    )
    one = _summary_rows({"lo": [0.5], "hi": [0.9], "m": [0.8]})
    md = format_summary(_lo_hi_m_spec(tmp_path, 1), [], one, {})
    assert "| lo | lo | 1 | 0.5000 (1 seed) | 0.00 (1 seed) | -0.3000 (1 seed: not judged) |" in md


def test_summary_csv_has_one_row_per_variant_with_intervals(tmp_path):
    rows = _summary_rows(
        {"lo": [0.5, 0.6, 0.5], "hi": [0.9, 1.0, 0.9], "m": [0.8, 0.9, 0.6], "x": [0.7]}
    )
    spec = load_spec(
        write_spec(
            tmp_path,
            variants=[{"name": n, "overrides": []} for n in ("lo", "hi", "m", "x")],
            reference={"lower": "lo", "upper": "hi"},
            target="m",
            seeds=3,
        )
    )
    table = list(csv.DictReader(io.StringIO(format_summary_csv(spec, rows))))
    assert tuple(table[0]) == SUMMARY_COLUMNS
    assert [(r["dataset"], r["variant"]) for r in table] == [
        ("d", "lo"),
        ("d", "hi"),
        ("d", "m"),
        ("d", "x"),
    ]
    lo, hi, m, x = table
    # lo - m per seed: -0.3 -0.3 -0.1: mean -0.2333, std 0.1155, t(0.975, 2) = 4.3027.
    half = 4.302653 * 0.115470 / math.sqrt(3)
    assert lo["diff_n"] == "3"
    assert float(lo["diff_mean"]) == pytest.approx(-0.233333, abs=1e-6)
    assert float(lo["diff_std"]) == pytest.approx(0.115470, abs=1e-6)
    assert float(lo["diff_lo"]) == pytest.approx(-0.233333 - half, abs=1e-5)
    assert float(lo["diff_hi"]) == pytest.approx(-0.233333 + half, abs=1e-5)
    assert lo["diff_excludes_zero"] == "False"  # hi = +0.053: the interval contains 0
    assert hi["diff_excludes_zero"] == "False"
    # m's gap closure per seed: 0.75, 0.75, 0.25: mean 0.5833, std 0.2887.
    assert m["gap_closure_n"] == "3"
    assert float(m["gap_closure_mean"]) == pytest.approx(0.583333, abs=1e-6)
    assert float(m["gap_closure_lo"]) == pytest.approx(
        0.583333 - 4.302653 * 0.288675 / math.sqrt(3), abs=1e-5
    )
    assert float(m["mean"]) == pytest.approx(0.766667, abs=1e-6) and m["n"] == "3"
    assert m["diff_n"] == m["diff_mean"] == m["diff_excludes_zero"] == ""  # the target itself
    # One seed: mean but no spread, no interval, not judged.
    assert x["n"] == "1" and x["std"] == x["lo"] == x["hi"] == ""
    assert x["diff_n"] == "1" and float(x["diff_mean"]) == pytest.approx(-0.1)
    assert x["diff_lo"] == x["diff_hi"] == x["diff_excludes_zero"] == ""


# ---------------------------------------------------------------------------------------------
# Running the grid with a fake trainer
# ---------------------------------------------------------------------------------------------

ACCURACY = {"ordinary_only": 0.60, "full_multimodal": 0.90, "osmd": 0.75}


class FakeTrain:
    """Writes a finished run folder; osmd's accuracy moves with the seed, others do not."""

    def __init__(self, fail: set[str] = frozenset()):
        self.calls: list[str] = []
        self.fail = fail

    def __call__(self, cfg, out):
        name = f"{cfg.method}/{cfg.seed}"
        self.calls.append(out)
        os.makedirs(out, exist_ok=True)
        Path(out, "config.yaml").write_text(dump_yaml(cfg))
        if name in self.fail:
            raise RuntimeError(f"workers died in {name}")
        acc = ACCURACY[cfg.method] + (0.05 * cfg.seed if cfg.method == "osmd" else 0.0)
        test = {"deploy": {"accuracy": acc}}
        if cfg.method == "osmd":
            test["teacher"] = {"accuracy": 0.88}
        metrics = {
            "method": cfg.method,
            "seed": cfg.seed,
            "test": test,
            "val": test,
            "train_time_s": 10.0 + cfg.seed,
            "wall_time_s": 20.0,
            "privileged_at_test": False,
            # osmd stopped early on seed 1: 8 epochs, its best the 5th.
            "epochs": 8 if cfg.method == "osmd" and cfg.seed == 1 else 10,
            "deployed_epoch": 5 if cfg.method == "osmd" and cfg.seed == 1 else 9,
        }
        Path(out, "metrics.json").write_text(json.dumps(metrics))
        os.makedirs(os.path.join(out, "deploy"), exist_ok=True)
        Path(out, "deploy", "meta.json").write_text("{}")
        return metrics


def fake_measure(run_dir: str) -> DeployStats:
    return DeployStats(params=1234, latency_ms_b1=1.5, latency_ms_b64=9.0)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> str:
    from osmd_ray.data.synth import write_synth_dataset

    root = str(tmp_path_factory.mktemp("data") / "tiny")
    # 64 training rows per worker: one batch of the default size each (config check).
    write_synth_dataset(root, n_train=128, n_val=16, n_test=16, size=8, seed=0, progress=False)
    return root


def read_csv(path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(Path(path).read_text())))


def test_compare_writes_rows_summary_and_chart(tmp_path, tiny_data):
    spec = load_spec(write_spec(tmp_path))
    out = str(tmp_path / "out")
    fake = FakeTrain()
    result = run_compare(
        spec, out, [f"data.root={tiny_data}"], train_fn=fake, measure_fn=fake_measure
    )
    assert len(fake.calls) == 6 and not result.failures

    rows = read_csv(os.path.join(out, "results.csv"))
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert len(rows) == 6
    by = {(r["variant"], r["seed"]): r for r in rows}
    assert float(by[("osmd", "1")]["test_deploy_accuracy"]) == pytest.approx(0.80)
    assert by[("osmd", "1")]["test_teacher_accuracy"] == "0.88"
    assert by[("ordinary_only", "0")]["test_teacher_accuracy"] == ""  # no teacher: empty
    assert by[("osmd", "0")]["dataset"] == "tiny" and by[("osmd", "0")]["method"] == "osmd"
    assert by[("osmd", "0")]["deploy_params"] == "1234"
    assert by[("osmd", "0")]["latency_ms_b64"] == "9.0"
    assert by[("osmd", "0")]["train_time_s"] == "10.0"
    assert (by[("osmd", "1")]["epochs"], by[("osmd", "1")]["deployed_epoch"]) == ("8", "5")
    assert by[("osmd", "0")]["run_dir"] == os.path.join("runs", "tiny", "osmd", "seed0")

    md = Path(out, "summary.md").read_text()
    assert "## tiny" in md
    # osmd: accuracies 0.75, 0.80; gap closures 0.5 and 0.6667 -> 0.58 ± 0.12, and with
    # 2 seeds (t = 12.706) the interval 0.58 ± 1.06.
    assert (
        "| osmd | osmd | 2 | 0.7750 ± 0.0354 | 0.58 ± 0.12, CI [-0.48, 1.64] | (target) "
        "| 9.0 / 7.0 | 1,234 |" in md
    )
    # ordinary_only - osmd per seed: -0.15, -0.20; 2 seeds leave the interval wide.
    assert (
        "| ordinary_only | ordinary_only | 2 | 0.6000 ± 0.0000 | 0.00 ± 0.00, CI [0.00, 0.00] | "
        "-0.1750 ± 0.0354, CI [-0.4927, +0.1427], 2 seeds "
        "(interval contains 0: not distinguishable) |" in md
    )
    assert "+0.1250 ± 0.0354, CI [-0.1927, +0.4427], 2 seeds" in md
    assert "paired t-interval over seeds, 95%, two-sided" in md  # the test is stated
    assert "Fewer than 5 seeds: not a headline figure" in md
    summary = read_csv(os.path.join(out, "summary.csv"))
    assert [r["variant"] for r in summary] == ["ordinary_only", "full_multimodal", "osmd"]
    assert float(summary[0]["diff_lo"]) == pytest.approx(-0.4927, abs=1e-4)
    assert (
        float(summary[2]["epochs_mean"]) == 9.0 and float(summary[2]["deployed_epoch_mean"]) == 7.0
    )
    assert Path(out, "summary.png").read_bytes().startswith(PNG_SIGNATURE)
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]


def test_rerun_skips_finished_runs_and_redoes_deleted_ones(tmp_path, tiny_data):
    import shutil

    spec = load_spec(write_spec(tmp_path))
    out = str(tmp_path / "out")
    overrides = [f"data.root={tiny_data}"]
    run_compare(spec, out, overrides, train_fn=FakeTrain(), measure_fn=fake_measure)

    again = FakeTrain()
    result = run_compare(spec, out, overrides, train_fn=again, measure_fn=fake_measure)
    assert again.calls == [] and len(result.skipped) == 6
    assert len(read_csv(os.path.join(out, "results.csv"))) == 6

    shutil.rmtree(os.path.join(out, "runs", "tiny", "osmd", "seed1"))
    os.remove(os.path.join(out, "runs", "tiny", "full_multimodal", "seed0", "metrics.json"))
    third = FakeTrain()
    result = run_compare(spec, out, overrides, train_fn=third, measure_fn=fake_measure)
    assert sorted(third.calls) == sorted(
        os.path.join(out, "runs", "tiny", v, s)
        for v, s in [("osmd", "seed1"), ("full_multimodal", "seed0")]
    )
    assert len(result.skipped) == 4


def test_a_failed_run_is_reported_and_the_others_finish(tmp_path, tiny_data):
    spec = load_spec(write_spec(tmp_path))
    out = str(tmp_path / "out")
    fake = FakeTrain(fail={"osmd/0"})
    result = run_compare(
        spec, out, [f"data.root={tiny_data}"], train_fn=fake, measure_fn=fake_measure
    )
    assert len(fake.calls) == 6  # the failure did not stop the grid
    assert list(result.failures) == ["tiny/osmd/seed0"]
    assert "RuntimeError: workers died in osmd/0" in result.failures["tiny/osmd/seed0"]
    rows = read_csv(os.path.join(out, "results.csv"))
    assert len(rows) == 5
    md = Path(out, "summary.md").read_text()
    assert "## Failed runs" in md and "tiny/osmd/seed0" in md
    assert "| osmd | osmd | 1 | 0.8000 (1 seed) |" in md
    assert "(1 seed: not judged)" in md  # one osmd seed to pair with: no verdict


def test_when_every_run_fails_the_files_say_so(tmp_path, tiny_data):
    spec = load_spec(write_spec(tmp_path, seeds=1))
    out = tmp_path / "out"
    fail = {"ordinary_only/0", "full_multimodal/0", "osmd/0"}
    result = run_compare(
        spec, str(out), [f"data.root={tiny_data}"], train_fn=FakeTrain(fail), measure_fn=None
    )
    assert len(result.failures) == 3 and result.rows == []
    assert read_csv(out / "results.csv") == []
    header = "dataset,source,train_rows,variant,method,seed,"
    assert (out / "results.csv").read_text().startswith(header)
    md = (out / "summary.md").read_text()
    assert "No run has finished yet." in md and md.count("RuntimeError") == 3
    assert (out / "summary.png").read_bytes().startswith(PNG_SIGNATURE)


def test_a_run_folder_with_another_config_stops_before_training(tmp_path, tiny_data):
    spec = load_spec(write_spec(tmp_path))
    out = str(tmp_path / "out")
    run_compare(
        spec, out, [f"data.root={tiny_data}"], train_fn=FakeTrain(), measure_fn=fake_measure
    )
    fake = FakeTrain()
    with pytest.raises(ConfigError, match=r"another configuration.*train\.lr"):
        run_compare(
            spec,
            out,
            [f"data.root={tiny_data}", "train.lr=0.5"],
            train_fn=fake,
            measure_fn=fake_measure,
        )
    assert fake.calls == []


def test_a_missing_dataset_stops_before_training(tmp_path):
    from osmd_ray.errors import DataError

    fake = FakeTrain()
    with pytest.raises(DataError, match="nowhere"):
        run_compare(
            load_spec(write_spec(tmp_path)),
            str(tmp_path / "out"),
            [f"data.root={tmp_path / 'nowhere'}"],
            train_fn=fake,
        )
    assert fake.calls == []


# ---------------------------------------------------------------------------------------------
# In-process runs (scaling.num_workers=0): one read of each dataset, runs in Ray tasks
# ---------------------------------------------------------------------------------------------


def test_in_process_runs_of_a_dataset_share_one_read(tmp_path, tiny_data, monkeypatch):
    """Without a train_fn, in-process runs go through Ray: here ray.put and the Ray task are
    stood in for (the task's body, train_in_task, runs as it is). Each dataset root is
    checked and read once, with the columns of all its runs; every run gets that read,
    narrowed to its own columns without copying; Ray is sized for the runs the cores allow."""
    import shutil

    import osmd_ray.train.runner as runner
    from osmd_ray.train.local import split_columns

    other = str(tmp_path / "other")
    shutil.copytree(tiny_data, other)
    spec = load_spec(
        write_spec(
            tmp_path,
            overrides=["scaling.num_workers=0"],
            variants=[
                {"name": "osmd", "overrides": ["method=osmd"]},
                {"name": "rgb", "overrides": ["method=ordinary_only", "data.privileged=[]"]},
                {
                    "name": "depth",
                    "overrides": [
                        "method=ordinary_only",
                        "data.ordinary=[depth]",
                        "data.privileged=[]",
                    ],
                },
            ],
            reference=None,
            datasets=[{"name": "a", "root": tiny_data}, {"name": "b", "root": other}],
        )
    )
    reads = {}
    real_read = runner.read_in_memory

    def counting_read(cfg, **kwargs):
        assert cfg.data.root not in reads, f"{cfg.data.root} read twice"
        reads[cfg.data.root] = real_read(cfg, **kwargs)
        return reads[cfg.data.root]

    started, seen, fake = [], {}, FakeTrain()

    def fake_train(cfg, out, data=None):
        seen[out] = (cfg, data)
        return fake(cfg, out)

    monkeypatch.setattr(runner, "read_in_memory", counting_read)
    monkeypatch.setattr(runner, "train", fake_train)
    monkeypatch.setattr(compare_mod, "_start_ray", lambda cfg, n: started.append((cfg, n)))
    monkeypatch.setattr(compare_mod, "_share", lambda data: ("ref", data))  # ray.put
    monkeypatch.setattr(
        compare_mod,
        "_run_in_task",
        lambda cfg, run_dir, ref: compare_mod.train_in_task(cfg, run_dir, ref[1]),
    )
    monkeypatch.setattr(os, "cpu_count", lambda: 4)

    result = run_compare(spec, str(tmp_path / "out"), measure_fn=fake_measure)

    assert not result.failures and len(result.trained) == 12 == len(seen)
    assert sorted(reads) == sorted([tiny_data, other])
    for data in reads.values():  # one read serves rgb, depth and both roles of depth
        assert {"rgb", "depth", "label"} <= set(data.arrays["train"])
    # Default: as many at once as the cores allow (4 cores, 1 CPU per run).
    assert [(cfg.scaling.num_workers, n) for cfg, n in started] == [(0, 4)]
    for cfg, data in seen.values():
        read = reads[cfg.data.root]
        assert data.manifest is read.manifest
        assert set(data.arrays["train"]) == set(split_columns(cfg, read.manifest))
        for split, columns in data.arrays.items():
            assert all(array is read.arrays[split][c] for c, array in columns.items())
    widths = {len(data.arrays["val"]) for cfg, data in seen.values()}
    assert widths == {2, 3}  # rgb/label, depth/label; rgb/depth/label (osmd)

    # A rerun trains and reads nothing, and starts no Ray.
    reads.clear()
    again = run_compare(spec, str(tmp_path / "out"), measure_fn=fake_measure)
    assert again.trained == [] and len(again.skipped) == 12
    assert reads == {} and len(started) == 1


def test_runs_at_once_default_and_explicit(tmp_path, tiny_data, monkeypatch):
    from osmd_ray.experiments.compare import default_concurrency

    monkeypatch.setattr(os, "cpu_count", lambda: 5)
    spec = load_spec(write_spec(tmp_path, overrides=["scaling.num_workers=0"]))
    in_process = plan_runs(spec, "OUT", ["scaling.cpus_per_worker=2"])
    assert default_concurrency(in_process) == 2  # 5 cores // 2 CPUs a run
    assert default_concurrency(plan_runs(load_spec(write_spec(tmp_path)), "OUT")) == 1  # workers

    started = []
    monkeypatch.setattr(compare_mod, "_start_ray", lambda cfg, n: started.append(n))
    monkeypatch.setattr(compare_mod, "_engine", lambda shared: FakeTrain())
    run_compare(spec, str(tmp_path / "out"), [f"data.root={tiny_data}"], 1, measure_fn=fake_measure)
    assert started == [1]  # an explicit --max-concurrent wins


# ---------------------------------------------------------------------------------------------
# The command line and a real deployment measurement
# ---------------------------------------------------------------------------------------------


def test_cli_help_and_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["compare", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "--max-concurrent" in text and "results.csv" in text and "--seeds" in text

    bad = write_spec(tmp_path, variants=[])
    assert main(["compare", "--config", bad, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "osmd compare: error:" in err and "'variants'" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_cli_exits_1_when_a_run_fails_after_writing_the_files(
    tmp_path, tiny_data, monkeypatch, capsys
):
    import osmd_ray.train.runner as runner

    monkeypatch.setattr(runner, "train", FakeTrain(fail={"ordinary_only/1"}))
    monkeypatch.setattr(compare_mod, "_start_ray", lambda cfg, n: None)
    monkeypatch.setattr(compare_mod, "measure_deploy", fake_measure)
    out = tmp_path / "o"
    code = main(
        [
            "compare",
            "--config",
            write_spec(tmp_path),
            "--out",
            str(out),
            "--seeds",
            "2",
            f"data.root={tiny_data}",
        ]
    )
    assert code == 1
    assert len(read_csv(out / "results.csv")) == 5
    assert "ordinary_only/seed1: RuntimeError" in capsys.readouterr().out


def test_measure_deploy_counts_parameters_and_times_both_batch_sizes(tmp_path):
    import torch

    from osmd_ray.config import ModelConfig
    from osmd_ray.data.schema import ModalitySpec
    from osmd_ray.deploy import export_deploy
    from osmd_ray.methods import build_training_net

    rgb = ModalitySpec("rgb", "image", (3, 8, 8), "uint8")
    depth = ModalitySpec("depth", "image", (1, 8, 8), "float32")
    stats = {
        "rgb": {"mean": [100.0] * 3, "std": [50.0] * 3},
        "depth": {"mean": [3.0], "std": [1.0]},
    }
    cfg = ModelConfig(width=4, depth=2, feature_dim=8)
    torch.manual_seed(0)
    model = build_training_net("osmd", [rgb], [depth], 3, cfg, stats).eval()
    export_deploy(
        model,
        str(tmp_path / "deploy"),
        method="osmd",
        ordinary=[rgb],
        privileged=[depth],
        num_classes=3,
        model_cfg=cfg,
        normalization=stats,
    )
    stats_out = compare_mod.measure_deploy(str(tmp_path), repeats=2)
    expected = sum(p.numel() for p in model.deploy_module().parameters())
    assert stats_out.params == expected > 0
    assert 0 < stats_out.latency_ms_b1 and 0 < stats_out.latency_ms_b64


def test_config_key_of_load_config_is_unchanged_by_the_prefix(tmp_path):
    """The prefixed error keeps ConfigError's key (the CLI and tests rely on it)."""
    with pytest.raises(ConfigError) as direct:
        load_config(BASE, ["model.fusion=nope"])
    spec = load_spec(
        write_spec(
            tmp_path,
            variants=[{"name": "v", "overrides": ["model.fusion=nope"]}],
            reference=None,
            target=None,
        )
    )
    with pytest.raises(ConfigError) as prefixed:
        plan_runs(spec, "OUT")
    assert prefixed.value.key == direct.value.key == "model.fusion"
    assert str(prefixed.value) == f"variant 'v': {direct.value}"


class CurveTrain(FakeTrain):
    """A fake whose accuracy grows with the training rows: ordinary_only 0.5 + rows/1000,
    osmd 0.1 above it (what ordinary_only reaches with more rows)."""

    def __call__(self, cfg, out):
        metrics = super().__call__(cfg, out)
        rows = cfg.data.train_rows
        acc = 0.5 + rows / 1000 + (0.1 if cfg.method == "osmd" else 0.0) + 0.001 * cfg.seed
        metrics["test"] = {"deploy": {"accuracy": acc}}
        metrics["rows"] = {"train": rows, "val": 16, "test": 16}
        Path(out, "metrics.json").write_text(json.dumps(metrics))
        return metrics


def test_train_sizes_run_every_variant_per_size_and_write_the_learning_curve(tmp_path, tiny_data):
    variants = [
        {"name": "ordinary_only", "overrides": ["method=ordinary_only"]},
        {"name": "osmd", "overrides": ["method=osmd"]},
    ]
    spec = load_spec(
        write_spec(
            tmp_path, variants=variants, train_sizes=[100, 50], reference=None, target="osmd"
        )
    )
    assert spec.train_sizes == (50, 100)
    out = str(tmp_path / "out")
    fake = CurveTrain()
    overrides = [f"data.root={tiny_data}", "data.batch_size=16"]  # 50 rows feed 2 workers' steps
    run_compare(spec, out, overrides, train_fn=fake, measure_fn=fake_measure)
    assert len(fake.calls) == 2 * 2 * 2  # sizes x seeds x variants
    assert sorted(os.listdir(os.path.join(out, "runs"))) == ["tiny_n100", "tiny_n50"]
    config = yaml.safe_load(
        Path(out, "runs", "tiny_n50", "osmd", "seed0", "config.yaml").read_text()
    )
    assert config["data"]["train_rows"] == 50
    rows = read_csv(os.path.join(out, "results.csv"))
    assert {(r["dataset"], r["source"], r["train_rows"]) for r in rows} == {
        ("tiny_n50", "tiny", "50"),
        ("tiny_n100", "tiny", "100"),
    }
    md = Path(out, "summary.md").read_text()
    assert "## Learning curve" in md and "| variant | 50 rows | 100 rows |" in md
    # osmd at 50 rows (0.6505 mean) is what ordinary_only reaches at about 150 rows: beyond the
    # largest size, so the line says so; nothing is extrapolated.
    assert "50: more than 100" in md
    curve = read_csv(os.path.join(out, "learning_curve.csv"))
    osmd50 = next(r for r in curve if r["variant"] == "osmd" and r["train_rows"] == "50")
    assert float(osmd50["mean"]) == pytest.approx(0.6505) and osmd50["n"] == "2"
    assert Path(out, "learning_curve.png").read_bytes().startswith(PNG_SIGNATURE)


def test_rows_worth_interpolates_in_log_rows_between_sizes():
    from osmd_ray.experiments.stats import Stat
    from osmd_ray.experiments.summary import rows_worth

    curve = [(100, Stat(0.6, 0.0, 2)), (400, Stat(0.8, 0.0, 2))]
    assert rows_worth(curve, 0.7) == pytest.approx(200.0)  # halfway in log2: 100 * 2
    assert rows_worth(curve, 0.9) == math.inf
    assert math.isnan(rows_worth(curve, 0.5))


def test_report_only_summarises_the_finished_runs_and_trains_nothing(tmp_path, tiny_data):
    spec = load_spec(write_spec(tmp_path))
    out = str(tmp_path / "out")
    overrides = [f"data.root={tiny_data}"]
    run_compare(spec, out, overrides, train_fn=FakeTrain(), measure_fn=fake_measure)
    os.remove(os.path.join(out, "runs", "tiny", "osmd", "seed1", "metrics.json"))

    def no_training(cfg, out):
        raise AssertionError("--report-only trained a run")

    result = run_compare(
        spec, out, overrides, train_fn=no_training, measure_fn=fake_measure, report_only=True
    )
    assert len(result.rows) == 5 and not result.failures
    assert len(read_csv(os.path.join(out, "results.csv"))) == 5
    assert "| osmd | osmd | 1 |" in Path(out, "summary.md").read_text()


def test_the_report_only_flag_reaches_the_compare(tmp_path, monkeypatch):
    seen = {}

    def fake_compare(*args):
        seen["args"] = args
        return compare_mod.CompareResult(rows=[])

    monkeypatch.setattr(compare_mod, "compare", fake_compare)
    assert main(["compare", "--config", "spec.yaml", "--out", str(tmp_path), "--report-only"]) == 0
    assert seen["args"][-1] is True
    main(["compare", "--config", "spec.yaml", "--out", str(tmp_path)])
    assert seen["args"][-1] is False


def test_method_sweep_winners_are_compared_on_one_deployment_network():
    """configs/compare_method_converged.yaml: the paired difference is the privileged data's
    only if labels_only and osmd train the same deployment network for as long."""
    spec = load_spec(REPO / "configs/compare_method_converged.yaml")
    runs = {r.variant: r.cfg for r in plan_runs(spec, "O")}
    control, osmd_cfg = runs["labels_only_swept"], runs["osmd_swept"]
    assert control.method == "labels_only" and osmd_cfg.method == "osmd"
    deploy_keys = (
        "fusion",
        "shared_translator",
        "hallucination_width",
        "hallucination_depth",
        "image_encoder",
        "width",
        "depth",
        "feature_dim",
    )
    for key in deploy_keys:
        assert getattr(control.model, key) == getattr(osmd_cfg.model, key), key
    assert control.train.epochs == osmd_cfg.train.epochs
    assert control.train.early_stopping == osmd_cfg.train.early_stopping
    assert runs["osmd_swept_no_alignment"].loss.w_jan == 0 < osmd_cfg.loss.w_jan
