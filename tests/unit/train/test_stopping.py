"""train.early_stopping and train.deploy_epoch: when a run stops and whose weights it deploys."""

from __future__ import annotations

import math

import pytest
from safetensors.torch import load_file

from osmd_ray.blocks.stages import Stage
from osmd_ray.config import Config, load_config
from osmd_ray.train.loop import keep_score
from osmd_ray.train.runner import train
from osmd_ray.train.stopping import StoppingRule


def _history(*scores: float) -> list[dict]:
    return [{"val": {"deploy": {"accuracy": s}}} for s in scores]


def _rule(
    epochs: int = 10,
    patience: int = 0,
    min_delta: float = 0.0,
    deploy: str = "best",
    stage_epochs: tuple[int, ...] = (),
    task: str = "classification",
) -> StoppingRule:
    cfg = Config()
    cfg.train.epochs, cfg.train.deploy_epoch = epochs, deploy
    cfg.train.early_stopping.patience = patience
    cfg.train.early_stopping.min_delta = min_delta
    stages = [Stage(f"s{i}", n, None, {}) for i, n in enumerate(stage_epochs or (epochs,))]
    return StoppingRule.of(cfg, stages, task)


def test_the_best_epoch_is_the_first_of_equals_and_min_delta_decides_what_counts_as_a_rise():
    assert _rule().progress(_history(0.5, 0.7, 0.7, 0.6)).best_epoch == 2
    # 0.75 is not 0.1 above 0.7: epoch 2 stays the best, three epochs ago.
    state = _rule(min_delta=0.1).progress(_history(0.5, 0.7, 0.75, 0.6, 0.72))
    assert (state.best_epoch, state.best_score, state.since_best) == (2, 0.7, 3)
    # A NaN score is never a rise; with no finite score the last epoch stands in.
    assert _rule().progress(_history(0.5, math.nan)).best_epoch == 1
    assert _rule().progress(_history(math.nan, math.nan)).best_epoch == 2


def test_a_run_ends_when_its_patience_or_its_epoch_budget_is_spent():
    rising, flat = _history(0.5, 0.6, 0.7), _history(0.5, 0.6, 0.6, 0.6)
    assert not _rule(patience=2).ends(rising)
    assert _rule(patience=2).ends(flat)  # two epochs without a new best
    assert not _rule(patience=3).ends(flat)
    assert not _rule(patience=0).ends(flat)  # 0: off
    assert _rule(epochs=3).ends(rising)  # the budget


def test_the_deployed_epoch_is_the_best_or_the_last_as_the_config_says():
    history = _history(0.5, 0.8, 0.6)
    assert _rule().deployed(history) == 2
    assert _rule(deploy="last").deployed(history) == 3
    segmentation = [{"val": {"deploy": {"miou": s}}} for s in (0.3, 0.2)]
    assert _rule(task="segmentation").deployed(segmentation) == 1


def test_the_end_of_a_run_says_why_it_ended_and_what_it_deploys():
    assert _rule(epochs=10, patience=2).end_message(_history(0.5, 0.6, 0.6, 0.6), 2) == (
        "early stopping after epoch 4: no new best validation accuracy for 2 epochs; "
        "deploying epoch 2"
    )
    assert _rule(epochs=3).end_message(_history(0.5, 0.7, 0.6), 2) == (
        "trained all 3 epochs; deploying epoch 2"
    )


def test_a_staged_method_counts_only_its_last_stage_which_trains_the_deployment_network():
    # Stages of 3 and 7 epochs: the deployment path's score in the first 3 epochs (its
    # network not trained yet, or a teacher stage) neither is a best nor spends patience.
    rule = _rule(epochs=10, patience=2, stage_epochs=(3, 7))
    first_stage = _history(0.9, 0.2, 0.2)
    assert not rule.ends(first_stage) and rule.deployed(first_stage) == 3
    history = _history(0.9, 0.2, 0.2, 0.5, 0.6, 0.55, 0.58)
    assert rule.progress(history).best_epoch == 5 and rule.ends(history)


def test_ray_keeps_the_checkpoint_of_the_deployable_epoch_by_its_score():
    rule = _rule(min_delta=0.1)
    history = _history(0.5, 0.7, 0.75)  # 0.75 is no new best under min_delta 0.1
    scores = [keep_score(rule, history[:n], deployed=0) for n in (1, 2, 3)]
    assert scores == [1, 2, 0]  # epoch 2's checkpoint outscores the rest
    assert keep_score(rule, history, deployed=2) == 3  # the final one holds the deployed weights


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("train.early_stopping.patience", "-1"),
        ("train.early_stopping.min_delta", "-0.1"),
        ("train.deploy_epoch", "first"),
    ],
)
def test_bad_stopping_keys_are_refused_by_name(configs_dir, key, value):
    with pytest.raises(Exception, match=key.replace(".", r"\.")):
        load_config(configs_dir / "osmd_synth.yaml", [f"{key}={value}"])


@pytest.fixture
def constant_lr(configs_dir, tiny_synth, fast):
    """In-process runs whose first epoch does not depend on train.epochs (constant LR)."""

    def make(*overrides: str):
        return load_config(
            configs_dir / "osmd_synth.yaml",
            [
                *fast,
                f"data.root={tiny_synth}",
                "scaling.num_workers=0",
                "train.schedule=constant",
                *overrides,
            ],
        )

    return make


def test_an_early_stopped_run_deploys_its_best_epoch_weights(constant_lr, tmp_path):
    # min_delta 0.5 lets no later epoch count as a rise: epoch 1 stays the best, so patience 2
    # stops the run after epoch 3 of at most 6, and deploy/ holds epoch 1's weights.
    stopped = train(
        constant_lr(
            "train.epochs=6",
            "train.early_stopping.patience=2",
            "train.early_stopping.min_delta=0.5",
        ),
        str(tmp_path / "stopped"),
    )
    assert (stopped["epochs"], stopped["deployed_epoch"], stopped["stopped_early"]) == (3, 1, True)
    # A one-epoch run trains the same first epoch (constant LR, same seed).
    one = train(constant_lr("train.epochs=1"), str(tmp_path / "one"))
    weights = {
        n: load_file(str(tmp_path / n / "deploy" / "model.safetensors")) for n in ("stopped", "one")
    }
    assert weights["stopped"].keys() == weights["one"].keys()
    for name, tensor in weights["one"].items():
        assert (weights["stopped"][name] == tensor).all(), name
    assert stopped["test"] == one["test"] and stopped["val"] == one["val"]
    # deploy_epoch=last deploys epoch 3's weights instead: they differ.
    last = train(
        constant_lr(
            "train.epochs=6",
            "train.early_stopping.patience=2",
            "train.early_stopping.min_delta=0.5",
            "train.deploy_epoch=last",
        ),
        str(tmp_path / "last"),
    )
    assert (last["epochs"], last["deployed_epoch"]) == (3, 3)
    last_weights = load_file(str(tmp_path / "last" / "deploy" / "model.safetensors"))
    assert any((last_weights[n] != t).any() for n, t in weights["one"].items())


def test_a_diverged_last_epoch_stops_the_run_although_an_earlier_epoch_is_deployed(
    constant_lr, tmp_path, monkeypatch
):
    """The best-epoch swap must not hide non-finite weights: the run fails as before."""
    import torch

    from osmd_ray.errors import NonFiniteLossError
    from osmd_ray.train.local import LocalRun

    original = LocalRun.train_epoch

    def diverging(self, say=None):
        result = original(self, say)
        if self.epoch == 2:
            with torch.no_grad():
                next(self.net.parameters()).fill_(float("nan"))
        return result

    monkeypatch.setattr(LocalRun, "train_epoch", diverging)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="non-finite weights after epoch 2"):
        train(constant_lr("train.epochs=2"), str(out))
    assert not (out / "deploy").exists() and not (out / "metrics.json").exists()
