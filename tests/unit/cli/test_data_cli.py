"""``osmd data synth|import|check`` through main([...]): exit codes and messages."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from osmd_ray.cli.data import main
from osmd_ray.data.schema import read_manifest


@pytest.fixture
def synth_generator(monkeypatch):
    """The real generator when it exists; a tiny stand-in until then."""
    try:
        import osmd_ray.data.synth  # noqa: F401
    except ImportError:
        fake = types.ModuleType("osmd_ray.data.synth")
        fake.SYNTH_DEFAULTS = dict(n_train=6, n_val=3, n_test=3, size=8, seed=0)

        def generate_classification(n_train, n_val, n_test, size, seed):
            rng = np.random.default_rng(seed)
            splits = {
                name: {
                    "rgb": rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8),
                    "depth": rng.random((n, 1, size, size), dtype=np.float32),
                    "label": np.arange(n) % 4,
                }
                for name, n in (("train", n_train), ("val", n_val), ("test", n_test))
            }
            return splits, {"num_classes": 4, "class_names": None, "description": "fake"}

        fake.generate_classification = generate_classification
        monkeypatch.setitem(sys.modules, "osmd_ray.data.synth", fake)


def test_synth_then_check(tmp_path, capsys, synth_generator):
    out = str(tmp_path / "synth")
    argv = ["data", "synth", "--out", out, "--train", "8", "--val", "4", "--test", "4"]
    assert main([*argv, "--size", "8", "--seed", "3"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    m = read_manifest(out)
    assert [m.num_rows(s) for s in ("train", "val", "test")] == [8, 4, 4]
    assert m.modalities["rgb"].shape == (3, 8, 8) and m.modalities["depth"].kind == "image"

    assert main(["data", "check", out]) == 0
    report = capsys.readouterr().out
    assert report.startswith(f"OK {out} (full check)")
    assert "train: 8 rows in 1 shard(s)" in report
    assert "rgb: image 3x8x8 uint8" in report and "depth: image 1x8x8 float32" in report

    # A second write without --overwrite is refused with exit code 2 and no traceback.
    assert main([*argv, "--size", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pass --overwrite" in err and "Traceback" not in err
    assert main([*argv, "--size", "8", "--overwrite"]) == 0


def test_synth_segmentation_writes_label_maps(tmp_path, capsys):
    from osmd_ray.data.schema import read_manifest

    out = tmp_path / "s"
    argv = ["data", "synth", "--task", "segmentation", "--out", str(out)]
    assert main([*argv, "--train", "8", "--val", "4", "--test", "4", "--size", "16"]) == 0
    manifest = read_manifest(str(out))
    assert manifest.task == "segmentation" and tuple(manifest.label_shape) == (16, 16)
    assert manifest.class_names == ["background", "near", "mid", "far"]
    assert manifest.num_rows("test") == 4
    # The generator's own limit is a clear error, and nothing is written.
    assert main([*argv, "--size", "8", "--overwrite"]) == 2
    assert "size must be >= 16" in capsys.readouterr().err


def test_check_reports_every_problem_with_exit_1(tmp_path, capsys, synth_generator):
    out = tmp_path / "ds"
    main(["data", "synth", "--out", str(out), "--train", "8", "--val", "4", "--test", "4",
          "--size", "8"])  # fmt: skip
    (out / "val" / "part-00000.parquet").unlink()
    (out / "test" / "part-00000.parquet").write_bytes(b"PAR1")
    capsys.readouterr()
    assert main(["data", "check", str(out), "--quick"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"3 problem(s) in {out}:"
    assert lines[1] == "  val/part-00000.parquet: missing (listed in manifest.json)"
    assert lines[2].startswith("  test/part-00000.parquet: 4 bytes, but manifest.json says")
    assert lines[3].startswith("  test/part-00000.parquet: not readable as Parquet")


def test_check_without_a_dataset(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path)]) == 1
    assert f"{tmp_path}/manifest.json: not found" in capsys.readouterr().out


def _npz(path, n, rng):
    np.savez(path, x=rng.normal(size=(n, 5)).astype(np.float32), label=np.arange(n) % 2)


def test_import_then_check(tmp_path, capsys):
    rng = np.random.default_rng(0)
    _npz(tmp_path / "tr.npz", 20, rng)
    _npz(tmp_path / "te.npz", 6, rng)
    out = str(tmp_path / "ds")
    argv = ["data", "import", "--out", out, "--train", str(tmp_path / "tr.npz")]
    assert main([*argv, "--test", str(tmp_path / "te.npz"), "--val-fraction", "0.2"]) == 0
    assert "x: vector 5 float32" in capsys.readouterr().out
    m = read_manifest(out)
    assert (m.num_rows("train"), m.num_rows("val"), m.num_rows("test")) == (16, 4, 6)
    assert main(["data", "check", out, "--quick"]) == 0
    assert capsys.readouterr().out.startswith(f"OK {out} (quick check)")


def test_import_error_names_the_file_with_exit_2(tmp_path, capsys):
    np.savez(tmp_path / "tr.npz", x=np.zeros((4, 3)), label=np.array([0.0, 1, 0, 1]))
    _npz(tmp_path / "te.npz", 4, np.random.default_rng(0))
    argv = ["data", "import", "--out", str(tmp_path / "ds"), "--train", str(tmp_path / "tr.npz")]
    assert main([*argv, "--test", str(tmp_path / "te.npz")]) == 2
    err = capsys.readouterr().err
    assert f"error: {tmp_path}/tr.npz: key 'label' has dtype float64" in err


def test_bad_flag_values_are_argparse_errors(tmp_path, capsys):
    argv = ["data", "import", "--out", "o", "--train", "a.npz", "--test", "b.npz"]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--val-fraction", "1.5"])
    assert exc.value.code == 2
    assert "must lie strictly between 0 and 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "synth", "--out", "o", "--train", "0"])
    assert "must be a positive integer" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("synth", ["--train N", "(default:", "--overwrite", "--task"]),
        ("import", ["--val-fraction F", "(default: 0.1)", "has_<modality>", "(default: 0)"]),
        ("check", ["--quick", "skip checksums", "every problem"]),
    ],
)
def test_help_texts(capsys, command, expected, synth_generator):
    with pytest.raises(SystemExit) as exc:
        main(["data", command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for fragment in expected:
        assert fragment in text
