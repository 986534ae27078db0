"""Segmentation on real NYU Depth V2 frames (../shared/data/nyuv2-mini): import, `osmd
compare` training OS-MD for one epoch on two Ray Train workers, then `osmd predict` from RGB
only, with the mIoU checked against a direct per-class count on the same arrays.

Eight frames (4 train, 2 val, 2 test) at 60x80 cannot teach anything; what is tested is the
whole segmentation path on real data, its metrics and its files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from osmd_ray.cli import main
from tests.unit.blocks.test_metrics import direct_scores

pytestmark = pytest.mark.integration

NYU_MINI = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "nyuv2-mini"


@pytest.fixture(scope="module")
def nyu_mini(tmp_path_factory) -> Path:
    if not NYU_MINI.is_dir():
        pytest.skip(f"{NYU_MINI} is not on this machine")
    out = tmp_path_factory.mktemp("nyu") / "nyuv2-mini"
    argv = ["data", "import-nyuv2", "--src", str(NYU_MINI), "--out", str(out), "--size", "60x80"]
    assert main(argv) == 0
    return out


def test_nyuv2_mini_trains_compares_and_predicts_label_maps(
    ray_local, nyu_mini, tmp_path, configs_dir, capsys
):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "base": str(configs_dir / "osmd_synth_seg.yaml"),
                "overrides": [
                    "train.epochs=1",
                    "scaling.num_workers=2",
                    "data.batch_size=2",  # 4 training frames, 2 per worker
                    "data.eval_batch_size=2",
                    "model.width=8",
                    "model.depth=2",
                    "model.feature_dim=16",
                ],
                "variants": [{"name": "osmd", "overrides": ["method=osmd"]}],
                "seeds": [0],
            }
        )
    )
    out = tmp_path / "cmp"
    argv = ["compare", "--config", str(spec), "--out", str(out), f"data.root={nyu_mini}"]
    assert main(argv) == 0

    with open(out / "results.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    run_dir = out / row["run_dir"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    test_deploy = metrics["test"]["deploy"]
    assert float(row["test_deploy_miou"]) == pytest.approx(test_deploy["miou"])
    assert "test mIoU (deploy)" in (out / "summary.md").read_text()
    meta = json.loads((run_dir / "deploy" / "meta.json").read_text())
    assert meta["task"] == "segmentation" and meta["label_shape"] == [60, 80]
    assert meta["input_modalities"] == ["rgb"]  # depth is privileged: training only

    capsys.readouterr()
    pred, viz = tmp_path / "pred.parquet", tmp_path / "viz"
    argv = ["predict", "--model", str(run_dir / "deploy"), "--data", str(nyu_mini)]
    argv += ["--split", "test", "--out", str(pred), "--viz", str(viz)]
    assert main(argv) == 0
    printed = capsys.readouterr().out

    table = pq.read_table(pred)
    prediction = table.column("prediction").combine_chunks().to_numpy_ndarray()
    label = table.column("label").combine_chunks().to_numpy_ndarray()
    assert prediction.shape == label.shape == (2, 60, 80)
    assert np.any(label == -100), "NYU's unlabelled pixels should be the ignore index"
    accuracy, miou = direct_scores(prediction, label, 13, -100)
    assert f"pixel_accuracy={accuracy:.4f}" in printed and f"miou={miou:.4f}" in printed
    # The workers' distributed evaluation of the same test frames, same weights.
    assert test_deploy["miou"] == pytest.approx(miou, abs=1e-6)
    assert test_deploy["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert sorted(p.name for p in viz.glob("*.png")) == ["0000.png", "0001.png"]
