"""Early stopping and the best epoch's deployment on Ray Train workers (issue 28, item 1).

The workers take the best epoch's weights back from the checkpoint Ray Train kept by its
score (loop.keep_score, loop.load_reported_weights), under ZeRO-3, where that load is a
collective.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from osmd_ray.config import load_config

pytestmark = pytest.mark.integration


def test_an_early_stopped_worker_run_deploys_its_best_epochs_weights(
    ray_local, tiny_synth, tmp_path, configs_dir, fast
):
    from osmd_ray.train.runner import train

    def run(name: str, *overrides: str) -> dict:
        cfg = load_config(
            configs_dir / "osmd_synth.yaml",
            [
                *fast,
                f"data.root={tiny_synth}",
                "scaling.num_workers=2",
                "train.zero_stage=3",
                # Constant LR: epoch 1 is the same whatever train.epochs says.
                "train.schedule=constant",
                *overrides,
            ],
        )
        return train(cfg, str(tmp_path / name))

    # min_delta 0.5: no later epoch counts as a rise, so epoch 1 stays the best and
    # patience 2 ends the run after epoch 3 of at most 5.
    stopped = run(
        "stopped",
        "train.epochs=5",
        "train.early_stopping.patience=2",
        "train.early_stopping.min_delta=0.5",
    )
    assert (stopped["epochs"], stopped["deployed_epoch"], stopped["stopped_early"]) == (3, 1, True)
    history = json.loads((tmp_path / "stopped" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert stopped["val"] == history[0]["val"]

    one = run("one", "train.epochs=1")
    deployed = load_file(str(tmp_path / "stopped" / "deploy" / "model.safetensors"))
    reference = load_file(str(tmp_path / "one" / "deploy" / "model.safetensors"))
    assert deployed.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(deployed[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
    for path, scores in one["test"].items():
        assert stopped["test"][path]["accuracy"] == pytest.approx(scores["accuracy"], abs=1e-9)
