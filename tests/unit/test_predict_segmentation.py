"""Segmentation through export, load, `osmd predict` and the workers' evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from osmd_ray.blocks.nets import TrainingNet
from osmd_ray.cli import main
from osmd_ray.config import ModelConfig
from osmd_ray.data.schema import read_manifest
from osmd_ray.data.writer import write_dataset
from osmd_ray.deploy import export_deploy, load_deploy
from osmd_ray.errors import DataError
from osmd_ray.methods import build_training_net
from osmd_ray.predict import predict_split
from osmd_ray.train.epoch import evaluate
from tests.unit.blocks.test_metrics import direct_scores

H, W, K = 8, 10, 3
CFG = ModelConfig(width=4, depth=2, feature_dim=8)
ROWS = {"train": 6, "val": 4, "test": 5}


@pytest.fixture
def seg_data(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in ROWS.items():
        label = rng.integers(0, K, (n, H, W))
        label[:, 0, :] = -100  # an unlabelled row of pixels in every image
        splits[split] = {
            "rgb": rng.integers(0, 256, (n, 3, H, W), dtype=np.uint8),
            "depth": rng.random((n, 1, H, W), dtype=np.float32),
            "label": label,
        }
    root = tmp_path / "seg"
    write_dataset(str(root), splits, task="segmentation", num_classes=K, progress=False)
    return root


@pytest.fixture
def seg_export(seg_data, tmp_path) -> tuple[TrainingNet, Path]:
    manifest = read_manifest(str(seg_data))
    ordinary, privileged = [manifest.modalities["rgb"]], [manifest.modalities["depth"]]
    torch.manual_seed(0)
    model = build_training_net(
        "osmd", ordinary, privileged, K, CFG, manifest.normalization, (H, W)
    ).eval()
    out = tmp_path / "deploy"
    export_deploy(
        model,
        str(out),
        method="osmd",
        ordinary=ordinary,
        privileged=privileged,
        num_classes=K,
        model_cfg=CFG,
        normalization=manifest.normalization,
        task="segmentation",
        class_names=["a", "b", "c"],
    )
    return model, out


def test_export_records_the_label_shape_and_the_loaded_model_predicts_label_maps(seg_export):
    model, out = seg_export
    loaded = load_deploy(str(out))
    assert loaded.task == "segmentation" and loaded.label_shape == (H, W)
    rgb = np.random.default_rng(1).integers(0, 256, (3, 3, H, W), dtype=np.uint8)
    with torch.no_grad():
        want = model.deploy_module()({"rgb": torch.from_numpy(rgb)})
    proba = loaded.predict_proba({"rgb": rgb}, batch_size=2)
    assert proba.shape == (3, K, H, W)
    np.testing.assert_allclose(proba, torch.softmax(want, 1).numpy(), atol=1e-6)
    assert np.array_equal(loaded.predict({"rgb": rgb}, batch_size=2), want.argmax(1).numpy())
    assert loaded.predict({"rgb": rgb[:0]}).shape == (0, H, W)


def test_export_refuses_a_task_the_model_was_not_built_for(seg_export, tmp_path):
    model, _ = seg_export
    with pytest.raises(ValueError, match="built for label maps"):
        export_deploy(
            model,
            str(tmp_path / "other"),
            method="osmd",
            ordinary=list(model.ordinary),
            privileged=list(model.privileged),
            num_classes=K,
            model_cfg=CFG,
            normalization=None,
            task="classification",
        )


def test_predict_writes_label_maps_and_the_scores_of_a_direct_count(seg_data, seg_export, tmp_path):
    _, model_dir = seg_export
    out = tmp_path / "pred.parquet"
    summary = predict_split(str(model_dir), str(seg_data), "test", str(out), batch_size=2)
    table = pq.read_table(out)
    assert "proba" not in table.column_names
    prediction = table.column("prediction").combine_chunks().to_numpy_ndarray()
    label = table.column("label").combine_chunks().to_numpy_ndarray()
    assert prediction.shape == label.shape == (ROWS["test"], H, W)
    accuracy, miou = direct_scores(prediction, label, K, -100)
    assert f"pixel_accuracy={accuracy:.4f}" in summary and f"miou={miou:.4f}" in summary


def test_predict_viz_draws_pictures_through_the_cli(seg_data, seg_export, tmp_path, capsys):
    _, model_dir = seg_export
    pictures = tmp_path / "viz"
    argv = ["predict", "--model", str(model_dir), "--data", str(seg_data)]
    argv += ["--out", str(tmp_path / "p.parquet"), "--viz", str(pictures), "--viz-count", "2"]
    assert main(argv) == 0
    assert sorted(p.name for p in pictures.glob("*.png")) == ["0000.png", "0001.png"]
    assert "pictures: 2" in capsys.readouterr().out


def test_a_segmentation_model_refuses_a_classification_dataset(seg_export, tmp_path):
    _, model_dir = seg_export
    rng = np.random.default_rng(0)
    splits = {
        s: {"rgb": rng.integers(0, 256, (n, 3, H, W), dtype=np.uint8), "label": np.arange(n) % K}
        for s, n in ROWS.items()
    }
    write_dataset(
        str(tmp_path / "cls"), splits, task="classification", num_classes=K, progress=False
    )
    with pytest.raises(DataError, match="classification dataset"):
        predict_split(str(model_dir), str(tmp_path / "cls"), "test", str(tmp_path / "x.parquet"))


def test_workers_evaluation_scores_label_maps_like_a_direct_count(seg_data, seg_export):
    model, _ = seg_export
    manifest = read_manifest(str(seg_data))
    from osmd_ray.data.reading import read_split_numpy

    arrays = read_split_numpy(str(seg_data), "test", ["rgb", "depth", "label"], manifest)
    batches = [
        {k: torch.from_numpy(v[i : i + 2]) for k, v in arrays.items()} for i in range(0, 5, 2)
    ]
    results = evaluate(model, batches, ("deploy", "teacher"), torch.device("cpu"), manifest)
    with torch.no_grad():
        logits = model({k: torch.from_numpy(v) for k, v in arrays.items()})["deploy_logits"]
    accuracy, miou = direct_scores(logits.argmax(1).numpy(), arrays["label"], K, -100)
    assert results["deploy"]["accuracy"] == pytest.approx(accuracy)
    assert results["deploy"]["miou"] == pytest.approx(miou)
    labelled = int(np.sum(arrays["label"] != -100))
    loss = torch.nn.functional.cross_entropy(
        logits, torch.from_numpy(arrays["label"]).long(), ignore_index=-100, reduction="sum"
    )
    assert results["deploy"]["loss"] == pytest.approx(float(loss) / labelled, rel=1e-5)
    assert set(results) == {"deploy", "teacher"}
    json.dumps(results)
