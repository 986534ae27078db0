"""NPZ data with vector, sequence and image modalities imports, trains and deploys."""

from __future__ import annotations

import os

import numpy as np
import pytest

from osmd_ray.config import load_config

pytestmark = pytest.mark.integration


def _npz(path, n: int, rng: np.random.Generator) -> str:
    label = rng.integers(0, 3, size=n)
    # The privileged image carries the label cleanly; the ordinary views only noisily.
    image = rng.normal(size=(n, 1, 8, 8)).astype(np.float32)
    image[:, 0, :2, :2] += 3.0 * label[:, None, None]
    sequence = rng.normal(size=(n, 2, 16)).astype(np.float32) + 0.5 * label[:, None, None]
    vector = rng.normal(size=(n, 5)).astype(np.float32) + 0.5 * label[:, None]
    np.savez(path, imu=sequence, tabular=vector, ir=image, label=label)
    return str(path)


def test_vector_and_sequence_ordinary_with_image_privileged(ray_local, tmp_path, configs_dir, fast):
    from osmd_ray import load_deploy
    from osmd_ray.data.importer import import_npz
    from osmd_ray.data.reading import read_split_numpy
    from osmd_ray.train.runner import train

    rng = np.random.default_rng(0)
    root = str(tmp_path / "data")
    import_npz(
        root,
        train=_npz(tmp_path / "train.npz", 256, rng),
        test=_npz(tmp_path / "test.npz", 64, rng),
        progress=False,
    )
    cfg = load_config(
        configs_dir / "osmd_synth.yaml",
        [
            *fast,
            f"data.root={root}",
            "data.ordinary=[imu,tabular]",
            "data.privileged=[ir]",
            "train.epochs=1",
            # One worker: what is tested is the modalities; two ranks are the end-to-end test's.
            "scaling.num_workers=1",
        ],
    )
    run_dir = str(tmp_path / "run")
    metrics = train(cfg, run_dir)
    assert set(metrics["test"]) == {"deploy", "teacher"}

    model = load_deploy(os.path.join(run_dir, "deploy"))
    assert sorted(spec.name for spec in model.input_modalities) == ["imu", "tabular"]
    test = read_split_numpy(root, "test", ["imu", "tabular", "label"])
    proba = model.predict_proba({"imu": test["imu"], "tabular": test["tabular"]})
    assert proba.shape == (64, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    accuracy = float((proba.argmax(1) == test["label"]).mean())
    assert accuracy == pytest.approx(metrics["test"]["deploy"]["accuracy"], abs=1e-9)
