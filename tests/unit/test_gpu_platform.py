"""benchmarks/gpu_platform.{sh,py}, the GPU platform check, on the CPU: its data sets from the
real NYUv2 frames, the figures it draws from run folders, and the script's own refusals.
(The whole script's CPU smoke run, `DEVICE=cpu benchmarks/gpu_platform.sh`, takes minutes:
benchmarks/RESULTS.md records it.)"""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
NYU = REPO.parent / "shared" / "data" / "nyuv2-mini"


@pytest.fixture(scope="module")
def platform():
    spec = importlib.util.spec_from_file_location(
        "gpu_platform", REPO / "benchmarks/gpu_platform.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not NYU.is_dir(), reason="needs ../shared/data/nyuv2-mini")
def test_data_sets_tile_the_real_frames_into_distinct_rows(platform, tmp_path):
    from osmd_ray.data.reading import read_split_numpy
    from osmd_ray.data.schema import read_manifest

    out = tmp_path / "data"
    args = ["data", "--src", str(NYU), "--out", str(out), "--size", "24x32", "--rows", "40"]
    assert platform.main([*args, "--seg-rows", "8", "--sweep-rows", "16", "--eval-rows", "4"]) == 0
    cls, seg = read_manifest(str(out / "cls")), read_manifest(str(out / "seg"))
    assert cls.task == "classification" and seg.task == "segmentation"
    assert cls.modalities["depth"].shape == (1, 24, 32)
    assert read_manifest(str(out / "sweep")).modalities["rgb"].shape == (3, 12, 16)
    assert [cls.num_rows(s) for s in ("train", "val", "test")] == [40, 4, 4]
    rgb = read_split_numpy(str(out / "cls"), "train", ["rgb"])["rgb"].reshape(40, -1)
    assert len(np.unique(rgb, axis=0)) == 40  # eight frames, but no two rows alike


def test_dominant_class_ignores_unlabelled_pixels(platform):
    label = np.full((1, 4, 4), platform.IGNORE_INDEX, dtype=np.int64)
    label[0, 0, :3], label[0, 1, 0] = 5, 2
    assert platform.dominant_class(label, 13).tolist() == [5]


def _run_folder(path: Path, batch: int, steps: list[int], span: float, wait: float) -> None:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(
        yaml.safe_dump({"data": {"batch_size": batch}, "scaling": {"num_workers": 1}})
    )
    history = [
        {
            "step": s,
            "data_wait": {"span_s": span, "share": wait, "first_batch_wait_s": 0.1},
            "gpu_peak_memory_gib": 3.5,
        }
        for s in steps
    ]
    (path / "history.json").write_text(json.dumps(history))


def test_summary_takes_the_last_epoch_against_the_plain_loop(platform, tmp_path):
    work = tmp_path / "work"
    (work / "plain").mkdir(parents=True)
    (work / "status").mkdir()
    plain = {"samples_per_s": 200.0, "tflops_per_s": 50.0, "peak_memory_gib": 3.0}
    (work / "plain" / "torch.json").write_text(json.dumps({**plain, "step_flops": 1e12}))
    (work / "matmul.json").write_text(json.dumps({"tflops_per_s": 800.0}))
    # Epoch 1: 10 steps; epoch 2: 10 more in 2 s at batch 32 -> 160 samples/s, 5 TFLOP/s.
    _run_folder(work / "runs" / "zero2", 32, [10, 20], 2.0, 0.02)
    (work / "status" / "sweep.json").write_text('{"rc": 0, "seconds": 10.0, "timed_out": false}')
    (work / "sweep").mkdir()
    with open(work / "sweep" / "trials.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["trial_id", "status", "epochs_s"])
        writer.writeheader()
        writer.writerows({"trial_id": i, "status": "COMPLETED", "epochs_s": 6} for i in range(3))

    s = platform.summary(work)
    zero2 = s["train"]["zero2"]
    assert zero2["samples_per_s"] == pytest.approx(160.0)
    assert zero2["vs_plain"] == pytest.approx(0.8)
    assert zero2["tflops_per_s"] == pytest.approx(5.0)
    assert zero2["peak_memory_gib"] == 3.5
    assert s["train"]["zero0"] is None  # that part wrote nothing
    assert s["sweep"] == {
        "trials": 3,
        "completed": 3,
        "wall_s": 10.0,
        "trial_epochs_s": 18.0,
        "packing": 1.8,
    }
    table = platform.markdown(s)
    assert "| zero2 | 160 | 0.80 | 2.0% | 5.0 | 1% | 3.5 |" in table
    assert "| sweep | ok | 10 |" in table


def test_script_refuses_an_unknown_part(tmp_path):
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks/gpu_platform.sh"), str(tmp_path / "out")],
        env={
            "PATH": "/usr/bin:/bin",
            "PARTS": "trian",
            "WORK": str(tmp_path / "w"),
            "DEVICE": "cpu",
            "PYTHON": sys.executable,
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "unknown part 'trian'" in result.stderr


def test_a_part_past_the_budget_is_skipped_and_reported(tmp_path):
    out, work = tmp_path / "out", tmp_path / "w"
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks/gpu_platform.sh"), str(out)],
        env={
            "PATH": "/usr/bin:/bin",
            "PARTS": "matmul",
            "BUDGET_S": "0",
            "WORK": str(work),
            "DEVICE": "cpu",
            "PYTHON": sys.executable,
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((work / "status" / "matmul.json").read_text())["rc"] == -1
    assert not (work / "matmul.json").exists()
    assert "| matmul | skipped: budget spent | 0 |" in (out / "platform.md").read_text()
    assert json.loads((out / "platform.json").read_text())["parts"]["matmul"]["timed_out"]
