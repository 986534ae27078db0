"""Deployment export and load: round trip, metadata, integrity and input checks."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import osmd_ray
from osmd_ray import deploy as deploy_mod
from osmd_ray.blocks.nets import TrainingNet
from osmd_ray.config import ModelConfig
from osmd_ray.data.schema import ModalitySpec
from osmd_ray.deploy import export_deploy, load_deploy
from osmd_ray.errors import DeployError
from osmd_ray.methods import build_training_net

RGB = ModalitySpec("rgb", "image", (3, 10, 10), "uint8")
META = ModalitySpec("meta", "vector", (4,), "float32")
DEPTH = ModalitySpec("depth", "image", (1, 10, 10), "float32")
NUM_CLASSES = 3
CFG = ModelConfig(width=4, depth=2, feature_dim=8)
STATS = {
    "rgb": {"mean": [120.0, 110.0, 100.0], "std": [60.0, 55.0, 50.0]},
    "meta": {"mean": [0.1, 0.2, 0.3, 0.4], "std": [1.0, 2.0, 3.0, 4.0]},
    "depth": {"mean": [3.0], "std": [1.5]},
}


def numpy_batch(specs, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    batch = {}
    for s in specs:
        if s.dtype == "uint8":
            batch[s.name] = rng.integers(0, 256, size=(rows, *s.shape), dtype=np.uint8)
        else:
            batch[s.name] = (rng.normal(size=(rows, *s.shape)) * 2 + 1).astype(np.float32)
    return batch


def trained_like(method, ordinary, cfg=CFG) -> TrainingNet:
    """A model whose BatchNorm running statistics moved away from their defaults, so that
    the buffers must survive the export too."""
    torch.manual_seed(0)
    model = build_training_net(method, ordinary, [DEPTH], NUM_CLASSES, cfg, STATS)
    model.train()
    with torch.no_grad():
        for seed in range(3):
            batch = numpy_batch(ordinary + [DEPTH], 8, seed)
            model({k: torch.from_numpy(v) for k, v in batch.items()})
    return model.eval()


def export(model: TrainingNet, out_dir, **extra) -> None:
    export_deploy(
        model,
        str(out_dir),
        method=model.method,
        ordinary=list(model.ordinary),
        privileged=[DEPTH],
        num_classes=NUM_CLASSES,
        model_cfg=model.cfg,
        normalization=STATS,
        class_names=["a", "b", "c"],
        **extra,
    )


CASES = [
    ("osmd", [RGB], CFG),
    ("ordinary_only", [RGB], CFG),
    ("full_multimodal", [RGB], CFG),
    (
        "osmd",
        [RGB, META],
        ModelConfig(
            width=4,
            depth=2,
            feature_dim=8,
            hallucination_shared_stages=1,
            hallucination_width=1,
            hallucination_depth=0,
        ),
    ),
    ("two_stage_hallucination", [RGB], CFG),
    ("logit_kd", [RGB], CFG),
    ("imputation", [RGB], CFG),  # image-to-image generator
    ("imputation", [META], CFG),  # vector -> image generator
]
CASE_IDS = [
    "osmd",
    "ordinary_only",
    "full_multimodal",
    "image+vector",
    "two_stage",
    "logit_kd",
    "imputation",
    "imputation-from-vector",
]


@pytest.mark.parametrize("method,ordinary,cfg", CASES, ids=CASE_IDS)
def test_export_load_predict_matches_the_deploy_module(tmp_path, method, ordinary, cfg):
    model = trained_like(method, ordinary, cfg)
    export(model, tmp_path / "deploy")
    loaded = load_deploy(str(tmp_path / "deploy"))

    batch = numpy_batch(ordinary + [DEPTH], rows=7, seed=42)
    with torch.no_grad():
        want = torch.softmax(
            model.deploy_module()({k: torch.from_numpy(v) for k, v in batch.items()}), dim=1
        ).numpy()
    got = loaded.predict_proba(batch, batch_size=3)  # chunked
    assert got.shape == (7, NUM_CLASSES) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    pred = loaded.predict(batch)
    assert pred.dtype == np.int64 and pred.shape == (7,)
    np.testing.assert_array_equal(pred, want.argmax(axis=1))

    expected_inputs = [s.name for s in ordinary] + (
        ["depth"] if method == "full_multimodal" else []
    )
    assert [s.name for s in loaded.input_modalities] == expected_inputs
    assert not loaded.net.training and all(p.device.type == "cpu" for p in loaded.net.parameters())
    if method == "imputation":
        # E_p runs on G's reconstruction: privileged specs are kept, never asked for as input.
        assert hasattr(loaded.net, "E_p") and hasattr(loaded.net, "G")
        assert [s["name"] for s in loaded.meta["privileged"]] == ["depth"]
    elif method != "full_multimodal":
        # The deployment model was built without any privileged encoder.
        assert not hasattr(loaded.net, "E_p")
        assert not [k for k in loaded.net.state_dict() if k.startswith("E_p")]
    if method != "full_multimodal":
        # Ordinary inputs alone suffice.
        only = {s.name: batch[s.name] for s in ordinary}
        np.testing.assert_allclose(loaded.predict_proba(only), want, rtol=1e-5, atol=1e-6)


def test_meta_json_describes_the_deployment_model(tmp_path):
    model = trained_like("osmd", [RGB, META])
    export(model, tmp_path / "deploy", extra_meta={"run": "r1"})
    files = sorted(os.listdir(tmp_path / "deploy"))
    assert files == ["meta.json", "model.safetensors"]
    meta = json.loads((tmp_path / "deploy" / "meta.json").read_text())
    assert meta["format_version"] == 1
    assert meta["osmd_ray_version"] == osmd_ray.__version__
    assert (meta["method"], meta["task"], meta["num_classes"]) == ("osmd", "classification", 3)
    assert meta["class_names"] == ["a", "b", "c"]
    assert meta["ordinary"] == [
        {"name": "rgb", "kind": "image", "shape": [3, 10, 10], "dtype": "uint8"},
        {"name": "meta", "kind": "vector", "shape": [4], "dtype": "float32"},
    ]
    assert meta["privileged"] == [] and meta["input_modalities"] == ["rgb", "meta"]
    assert set(meta["normalization"]) == {"rgb", "meta"}  # no privileged statistics
    assert meta["normalization"]["meta"] == STATS["meta"]
    assert meta["model_config"]["feature_dim"] == 8 and meta["model_config"]["fusion"] == "ctn"
    assert len(meta["sha256"]["model.safetensors"]) == 64
    assert meta["extra"] == {"run": "r1"}
    loaded = load_deploy(str(tmp_path / "deploy"))
    assert loaded.meta == meta and loaded.class_names == ["a", "b", "c"]


def test_weights_are_fp32_and_never_unpickled(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    model = trained_like("osmd", [RGB])
    model.to(torch.bfloat16)
    export(model, tmp_path / "deploy")
    tensors = load_file(str(tmp_path / "deploy" / "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.float32, torch.int64}
    assert not [k for k in tensors if k.startswith("E_p")]

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load (pickle) must not be used")

    monkeypatch.setattr(torch, "load", refuse)
    loaded = osmd_ray.load_deploy(str(tmp_path / "deploy"))  # the lazy top-level wrapper
    assert loaded.predict(numpy_batch([RGB], 2)).shape == (2,)


def test_tampered_weights_are_refused(tmp_path):
    export(trained_like("osmd", [RGB]), tmp_path / "deploy")
    weights = tmp_path / "deploy" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(DeployError, match=r"model\.safetensors was modified"):
        load_deploy(str(tmp_path / "deploy"))


def test_missing_or_misshapen_inputs_are_refused_by_name(tmp_path):
    export(trained_like("osmd", [RGB, META]), tmp_path / "deploy")
    loaded = load_deploy(str(tmp_path / "deploy"))
    batch = numpy_batch([RGB, META], 2)
    with pytest.raises(DeployError, match=r"'meta'.*\(N, 4\)"):
        loaded.predict({"rgb": batch["rgb"], "depth": np.zeros((2, 1, 10, 10))})
    with pytest.raises(DeployError, match=r"'rgb': expected shape \(N, 3, 10, 10\)"):
        loaded.predict({"rgb": batch["rgb"][0], "meta": batch["meta"]})
    with pytest.raises(DeployError, match="rows"):
        loaded.predict({"rgb": batch["rgb"], "meta": batch["meta"][:1]})
    # Tensors work as well as arrays; extra keys are ignored.
    tensors = {k: torch.from_numpy(v) for k, v in batch.items()}
    np.testing.assert_allclose(
        loaded.predict_proba(dict(tensors, label=torch.zeros(2))), loaded.predict_proba(batch)
    )


def test_a_failed_export_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    out = tmp_path / "deploy"
    first = trained_like("osmd", [RGB])
    export(first, out)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(deploy_mod, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        export(trained_like("ordinary_only", [RGB]), out)
    monkeypatch.undo()
    with pytest.raises(TypeError):
        export(trained_like("ordinary_only", [RGB]), out, extra_meta={"bad": object()})
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["deploy"]  # no temporary folders left behind

    # A successful export replaces it completely.
    export(trained_like("ordinary_only", [RGB]), out)
    assert load_deploy(str(out)).meta["method"] == "ordinary_only"
    assert sorted(os.listdir(tmp_path)) == ["deploy"]


def test_export_refuses_inconsistent_arguments_and_foreign_folders(tmp_path):
    model = trained_like("osmd", [RGB])
    with pytest.raises(ValueError, match="method 'ordinary_only'"):
        export_deploy(
            model,
            str(tmp_path / "a"),
            method="ordinary_only",
            ordinary=[RGB],
            privileged=[],
            num_classes=NUM_CLASSES,
            model_cfg=model.cfg,
            normalization=STATS,
        )
    with pytest.raises(ValueError, match="normalization of 'rgb'"):
        export_deploy(
            model,
            str(tmp_path / "a"),
            method="osmd",
            ordinary=[RGB],
            privileged=[DEPTH],
            num_classes=NUM_CLASSES,
            model_cfg=model.cfg,
            normalization=None,
        )
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        export(model, foreign)
    assert (foreign / "todo.txt").read_text() == "mine"


def test_load_errors_are_deploy_errors(tmp_path):
    with pytest.raises(DeployError, match="not a deployment export"):
        load_deploy(str(tmp_path))
    export(trained_like("osmd", [RGB]), tmp_path / "deploy")
    meta_path = tmp_path / "deploy" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["model_config"]["feature_dim"] = 16  # weights no longer fit
    meta_path.write_text(json.dumps(meta))
    # meta.json records its own digest: the edit is caught before anything is built from it
    # (tests/unit/test_reliability.py resets the digest to reach "does not fit").
    with pytest.raises(DeployError, match=r"meta\.json was modified after export"):
        load_deploy(str(tmp_path / "deploy"))
    meta["format_version"] = 2
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DeployError, match="format_version 2"):
        load_deploy(str(tmp_path / "deploy"))
