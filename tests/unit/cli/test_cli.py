"""The `osmd` command line: help texts and bad input ending in a one-line error (no Ray)."""

from __future__ import annotations

import pytest

from osmd_ray.cli import build_parser, main


@pytest.mark.parametrize(
    "argv", [[], ["train"], ["predict"], ["main"], ["data"], ["data", "synth"], ["data", "check"]]
)
def test_every_command_explains_itself(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*argv, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: osmd" in text
    assert len(text.splitlines()) > 3


def test_unknown_config_key_is_named_with_a_suggestion(tmp_path, capsys):
    code = main(
        [
            "train",
            "--config",
            "configs/osmd_synth.yaml",
            "--out",
            str(tmp_path / "r"),
            "loss.w_jann=1",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "loss.w_jann" in err and "loss.w_jan" in err
    assert "Traceback" not in err
    assert not (tmp_path / "r").exists(), "a refused config must not create the run folder"


def test_missing_dataset_is_named(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code = main(
        [
            "train",
            "--config",
            "configs/osmd_synth.yaml",
            "--out",
            str(tmp_path / "r"),
            f"data.root={missing}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert str(missing) in err and "manifest.json" in err


def test_predict_with_a_missing_model_is_named(tmp_path, capsys):
    code = main(
        [
            "predict",
            "--model",
            str(tmp_path / "no-model"),
            "--data",
            str(tmp_path),
            "--out",
            str(tmp_path / "p.parquet"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "no-model" in err
