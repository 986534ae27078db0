"""``osmd data import-nyuv2``: the real mini set, a synthetic official .mat, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from osmd_ray.cli import main
from osmd_ray.data.checker import verify_dataset
from osmd_ray.data.nyuv2 import CLASS_NAMES_40, import_nyuv2, png_split
from osmd_ray.data.reading import read_split_numpy
from osmd_ray.errors import DataError

IGNORE = -100
MINI = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "nyuv2-mini"
# NYU indices of the mini set, sorted, and the split each position i gets (i % 4: 0,1 train).
MINI_INDICES = [1, 2, 9, 14, 15, 16, 17, 18]

needs_mini = pytest.mark.skipif(
    not (MINI / "rgb").is_dir(), reason=f"the nyuv2-mini frames are not at {MINI}"
)


def _nearest(path: Path, h: int, w: int) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.resize((w, h), Image.Resampling.NEAREST))


def _expected_label(raw: np.ndarray) -> np.ndarray:
    return np.where(raw == 0, IGNORE, raw.astype(np.int64) - 1)


@needs_mini
def test_mini_png_layout(tmp_path, capsys):
    out = str(tmp_path / "nyu")
    argv = ["data", "import-nyuv2", "--src", str(MINI), "--out", out, "--size", "48x64"]
    assert main(argv) == 0
    assert "train: 4 rows" in capsys.readouterr().out
    m = verify_dataset(out, deep=True)
    assert m.task == "segmentation" and m.num_classes == 13 and m.ignore_index == IGNORE
    assert m.class_names[0] == "bed" and m.class_names[-1] == "window"
    assert m.label_shape == (48, 64)
    assert m.modalities["rgb"].shape == (3, 48, 64) and m.modalities["rgb"].dtype == "uint8"
    assert m.modalities["depth"].shape == (1, 48, 64) and m.modalities["depth"].dtype == "float32"
    assert [m.num_rows(s) for s in ("train", "val", "test")] == [4, 2, 2]

    seen = {}
    for split in ("train", "val", "test"):
        data = read_split_numpy(out, split)
        ids = list(data["sample_id"])
        want = [f"nyu-{n:04d}" for i, n in enumerate(MINI_INDICES) if png_split(i) == split]
        assert ids == want
        label, depth = data["label"], data["depth"]
        assert np.all(((label >= 0) & (label < 13)) | (label == IGNORE))
        assert depth.min() >= 0 and depth.max() <= 1 and depth.max() > 0
        for row, sid in enumerate(ids):
            stem = sid.removeprefix("nyu-")
            raw = _nearest(MINI / "label13" / f"{stem}.png", 48, 64)
            np.testing.assert_array_equal(label[row], _expected_label(raw))
            mm = _nearest(MINI / "depth" / f"{stem}.png", 48, 64).astype(np.float32)
            np.testing.assert_allclose(depth[row, 0], np.clip(mm / 10000, 0, 1), rtol=1e-6)
            seen[sid] = (raw, label[row])
    # Both kinds of pixel occur: unlabelled -> ignore index, class k -> k - 1.
    raw = np.stack([r for r, _ in seen.values()])
    got = np.stack([g for _, g in seen.values()])
    assert (raw == 0).any() and (got[raw == 0] == IGNORE).all()
    k = int(np.bincount(raw[raw > 0]).argmax())
    assert (got[raw == k] == k - 1).all()

    # An existing dataset is kept unless --overwrite; labels 40 go through the same path.
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--classes", "40", "--overwrite"]) == 0
    m40 = verify_dataset(out, deep=True)
    assert m40.num_classes == 40 and m40.class_names == CLASS_NAMES_40
    label = read_split_numpy(out, "val")["label"]
    raw = _nearest(MINI / "label40" / "0009.png", 48, 64)
    np.testing.assert_array_equal(label[0], _expected_label(raw))


@needs_mini
def test_mini_native_size_is_exact(tmp_path):
    """At 480x640 nothing is resized: every stored value follows from the PNGs."""
    src = tmp_path / "src"
    for folder in ("rgb", "depth", "label13"):
        (src / folder).mkdir(parents=True)
        shutil.copy(MINI / folder / "0009.png", src / folder / "0009.png")
    out = str(tmp_path / "nyu")
    m = import_nyuv2(src, out, size=(480, 640), progress=False)
    assert list(m.splits) == ["train"]  # one frame: position 0, train; empty splits left out
    data = read_split_numpy(out, "train")
    assert list(data["sample_id"]) == ["nyu-0009"]
    rgb = np.asarray(Image.open(src / "rgb" / "0009.png"))
    mm = np.asarray(Image.open(src / "depth" / "0009.png")).astype(np.float32)
    raw = np.asarray(Image.open(src / "label13" / "0009.png"))
    np.testing.assert_array_equal(data["rgb"][0], rgb.transpose(2, 0, 1))
    np.testing.assert_allclose(data["depth"][0, 0], np.clip(mm / 10000, 0, 1), rtol=1e-6)
    np.testing.assert_array_equal(data["label"][0], _expected_label(raw))
    y, x = np.argwhere(raw == raw.max())[0]
    assert data["label"][0][y, x] == raw.max() - 1


# --------------------------------------------------------------------------- official .mat

N, W, H = 6, 16, 12
TRAIN_NDXS, TEST_NDXS = [1, 3, 4, 6], [2, 5]  # 1-based, as in the official splits.mat


def _official(tmp_path: Path, with_datasets=("images", "depths", "labels")) -> dict:
    """A tiny nyu_depth_v2_labeled.mat + splits.mat + mapping.npy in MATLAB's transposed
    HDF5 layout; returns the arrays as written."""
    h5py = pytest.importorskip("h5py")
    sio = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(0)
    arrays = {
        "images": rng.integers(0, 256, (N, 3, W, H), dtype=np.uint8),
        "depths": rng.uniform(0.0, 12.0, (N, W, H)).astype(np.float32),
        "labels": rng.integers(0, 895, (N, W, H)).astype(np.uint16),
    }
    arrays["depths"][0, 0, 0] = 0.0  # a missing reading
    src = tmp_path / "official"
    src.mkdir()
    with h5py.File(src / "nyu_depth_v2_labeled.mat", "w") as f:
        for key in with_datasets:
            f.create_dataset(key, data=arrays[key])
    sio.savemat(
        src / "splits.mat",
        {
            "trainNdxs": np.array(TRAIN_NDXS, dtype=np.float64)[:, None],
            "testNdxs": np.array(TEST_NDXS, dtype=np.float64)[:, None],
        },
    )
    mapping = rng.integers(0, 41, 895)
    mapping[0] = 0
    np.save(src / "mapping.npy", mapping)
    return {"src": src, "mapping": mapping, **arrays}


def test_official_mat_layout(tmp_path):
    o = _official(tmp_path)
    out = str(tmp_path / "nyu40")
    argv = ["data", "import-nyuv2", "--src", str(o["src"]), "--out", out, "--classes", "40"]
    argv += ["--mapping", str(o["src"] / "mapping.npy"), "--size", f"{H}x{W}"]
    assert main(argv) == 0
    m = verify_dataset(out, deep=True)
    assert m.num_classes == 40 and m.label_shape == (H, W)
    # val = the last 10% (at least one) of trainNdxs, in order.
    assert [m.num_rows(s) for s in ("train", "val", "test")] == [3, 1, 2]
    splits = {s: read_split_numpy(out, s) for s in ("train", "val", "test")}
    assert list(splits["train"]["sample_id"]) == ["nyu-0001", "nyu-0003", "nyu-0004"]
    assert list(splits["val"]["sample_id"]) == ["nyu-0006"]
    assert list(splits["test"]["sample_id"]) == ["nyu-0002", "nyu-0005"]

    for split, row, index in (("train", 0, 1), ("test", 1, 5), ("val", 0, 6)):
        i = index - 1
        data = splits[split]
        mapped = o["mapping"][o["labels"][i].T]  # (W, H) -> (H, W), then raw -> 0..40
        np.testing.assert_array_equal(data["label"][row], _expected_label(mapped))
        np.testing.assert_array_equal(data["rgb"][row], o["images"][i].transpose(0, 2, 1))
        want_depth = np.clip(o["depths"][i].T * 1000 / 10000, 0, 1)
        np.testing.assert_allclose(data["depth"][row, 0], want_depth, rtol=1e-5)
    assert splits["train"]["depth"][0, 0, 0, 0] == 0.0
    assert (splits["train"]["label"] == IGNORE).any()

    # --size resizes every frame; the mapping may also come as JSON.
    (o["src"] / "mapping.json").write_text(json.dumps(o["mapping"].tolist()))
    small = str(tmp_path / "small")
    argv = ["data", "import-nyuv2", "--src", str(o["src"]), "--out", small, "--classes", "40"]
    assert main([*argv, "--mapping", str(o["src"] / "mapping.json"), "--size", "6x8"]) == 0
    assert verify_dataset(small, deep=True).label_shape == (6, 8)


def test_official_mat_needs_mapping(tmp_path, capsys):
    o = _official(tmp_path)
    out = tmp_path / "nyu"
    assert main(["data", "import-nyuv2", "--src", str(o["src"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "nyu_depth_v2_labeled.mat" in err and "--mapping FILE" in err and "895" in err
    assert not out.exists()

    bad = o["src"] / "bad.npy"
    np.save(bad, np.arange(895))  # values up to 894, beyond --classes 13
    with pytest.raises(DataError, match=r"bad\.npy.*0\.\.13"):
        import_nyuv2(o["src"], str(out), mapping=bad, progress=False)
    assert not out.exists()


def test_official_mat_missing_dataset(tmp_path):
    o = _official(tmp_path, with_datasets=("images", "labels"))
    with pytest.raises(DataError, match=r"nyu_depth_v2_labeled\.mat.*'depths'"):
        import_nyuv2(o["src"], str(tmp_path / "nyu"), classes=40, mapping=o["src"] / "mapping.npy")
    assert not (tmp_path / "nyu").exists()


# --------------------------------------------------------------------------- PNG layout errors


def _png_layout(root: Path, stems=("0001", "0002", "0003", "0004"), h=6, w=8) -> Path:
    rng = np.random.default_rng(1)
    for folder in ("rgb", "depth", "label13"):
        (root / folder).mkdir(parents=True)
    for stem in stems:
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            root / "rgb" / f"{stem}.png"
        )
        Image.fromarray(rng.integers(0, 9000, (h, w)).astype(np.uint16)).save(
            root / "depth" / f"{stem}.png"
        )
        Image.fromarray(rng.integers(0, 14, (h, w)).astype(np.uint8)).save(
            root / "label13" / f"{stem}.png"
        )
    return root


def test_png_layout_synthetic_roundtrip(tmp_path):
    src = _png_layout(tmp_path / "src")
    m = import_nyuv2(src, str(tmp_path / "nyu"), size=(6, 8), progress=False)
    assert [m.num_rows(s) for s in ("train", "val", "test")] == [2, 1, 1]
    data = read_split_numpy(str(tmp_path / "nyu"), "test")
    raw = np.asarray(Image.open(src / "label13" / "0004.png"))
    np.testing.assert_array_equal(data["label"][0], _expected_label(raw))


def test_png_mismatched_names(tmp_path, capsys):
    src = _png_layout(tmp_path / "src")
    (src / "depth" / "0003.png").rename(src / "depth" / "0007.png")
    out = tmp_path / "nyu"
    assert main(["data", "import-nyuv2", "--src", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{src / 'depth'}" in err and "0003.png" in err and "0007.png" in err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize(
    ("folder", "image", "match"),
    [
        ("label13", np.zeros((6, 8, 3), np.uint8), r"label13/0002\.png: PNG mode RGB"),
        ("rgb", np.zeros((6, 8), np.uint8), r"rgb/0002\.png: PNG mode L"),
        ("depth", np.zeros((6, 8, 3), np.uint8), r"depth/0002\.png: PNG mode RGB"),
        ("label13", np.full((6, 8), 14, np.uint8), r"label13/0002\.png: label value 14"),
        ("depth", np.zeros((5, 8), np.uint16), r"depth/0002\.png: 8x5 pixels"),
    ],
)
def test_png_bad_frame(tmp_path, folder, image, match):
    src = _png_layout(tmp_path / "src")
    Image.fromarray(image).save(src / folder / "0002.png")
    with pytest.raises(DataError, match=match):
        import_nyuv2(src, str(tmp_path / "nyu"), progress=False)
    assert not (tmp_path / "nyu").exists()


def test_missing_folder_and_unknown_layout(tmp_path):
    src = _png_layout(tmp_path / "src")
    with pytest.raises(DataError, match=r"label40: folder not found"):
        import_nyuv2(src, str(tmp_path / "nyu"), classes=40, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: holds neither rgb/"):
        import_nyuv2(tmp_path / "empty", str(tmp_path / "nyu"), progress=False)


def test_bad_size_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "import-nyuv2", "--src", str(tmp_path), "--out", "x", "--size", "64"])
    assert exit_info.value.code == 2 and "HxW" in capsys.readouterr().err
