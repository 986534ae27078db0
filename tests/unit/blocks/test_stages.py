"""Staged baselines: epoch splits, which parts each stage trains, and that frozen parts stay
exactly still under AdamW (learning rate 0 for their optimiser group)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from osmd_ray.blocks.nets import TrainingNet
from osmd_ray.blocks.stages import (
    part_parameter_groups,
    set_stage_modes,
    split_epochs,
    stage_at_epoch,
    stage_lr_factor,
)
from osmd_ray.config import Config, apply_overrides
from osmd_ray.data.schema import ModalitySpec
from osmd_ray.errors import ConfigError
from osmd_ray.methods import build_training_net, check_config, get_method, method_losses

RGB = ModalitySpec("rgb", "image", (3, 8, 8), "uint8")
DEPTH = ModalitySpec("depth", "image", (1, 8, 8), "float32")


def method_stages(cfg: Config):
    return get_method(cfg.method).stages(cfg)


def cfg_for(method: str, *extra: str) -> Config:
    cfg = apply_overrides(
        Config(),
        [f"method={method}", "model.width=4", "model.depth=2", "model.feature_dim=8", *extra],
    )
    check_config(cfg)
    return cfg


@pytest.mark.parametrize(
    ("total", "shares", "expected"),
    [
        (10, [0.4, 0.3, 0.3], [4, 3, 3]),
        (3, [0.4, 0.3, 0.3], [1, 1, 1]),
        (10, [0.5, 0.5], [5, 5]),
        (7, [0.9, 0.1], [6, 1]),  # every stage keeps at least one epoch
        (11, [0.4, 0.6], [4, 7]),
    ],
)
def test_split_epochs_sums_to_the_budget(total, shares, expected):
    assert split_epochs(total, shares) == expected


def test_single_stage_methods_train_everything_with_their_objective():
    (stage,) = method_stages(cfg_for("osmd", "loss.w_recon=2"))
    assert stage.trains is None and stage.epochs == 10 and stage.terms["recon"] == 2.0
    (stage,) = method_stages(cfg_for("ordinary_only"))
    assert dict(stage.terms) == {"deploy": 1.0}


def test_baseline_stages_split_the_same_budget():
    two = method_stages(cfg_for("two_stage_hallucination"))
    assert [(s.name, s.epochs) for s in two] == [
        ("teacher", 4),
        ("hallucination", 3),
        ("fusion", 3),
    ]
    assert two[1].trains == ("E_h",) and dict(two[1].terms) == {"mimic": 1.0}
    assert "E_h" not in two[2].trains and dict(two[2].terms) == {"deploy": 1.0}
    kd = method_stages(cfg_for("logit_kd", "baselines.kd_weight=0.7"))
    assert [s.name for s in kd] == ["teacher", "student"]
    assert kd[1].terms["kd"] == 0.7 and kd[1].terms["deploy"] == pytest.approx(0.3)
    imp = method_stages(cfg_for("imputation", "train.epochs=5"))
    assert [(s.name, s.epochs) for s in imp] == [("generator", 2), ("task", 3)]
    assert stage_at_epoch(imp, 1).name == "generator" and stage_at_epoch(imp, 2).name == "task"


def test_too_few_epochs_for_the_stages_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError) as err:
        cfg_for("two_stage_hallucination", "train.epochs=2")
    assert err.value.key == "train.epochs"
    with pytest.raises(ConfigError) as err:
        cfg_for("logit_kd", "baselines.kd_teacher_fraction=1.0")
    assert err.value.key == "baselines.kd_teacher_fraction"


def test_lr_factor_is_zero_for_frozen_parts_and_restarts_cosine_per_stage():
    stages = method_stages(cfg_for("imputation", "train.epochs=4"))  # 2 + 2 epochs
    g = stage_lr_factor(stages, "G", steps_per_epoch=5, schedule="cosine")
    e_o = stage_lr_factor(stages, "E_o", steps_per_epoch=5, schedule="cosine")
    assert g(0) == 1.0 and 0 < g(9) < 0.1 and g(10) == 0.0 and g(19) == 0.0
    assert e_o(0) == 0.0 and e_o(9) == 0.0 and e_o(10) == 1.0 and 0 < e_o(19) < 0.1


def _model(method: str, cfg: Config) -> TrainingNet:
    torch.manual_seed(0)
    return build_training_net(method, [RGB], [DEPTH], 3, cfg.model, None)


def _batch(rows: int = 8) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        "rgb": torch.randint(0, 256, (rows, *RGB.shape), generator=gen).to(torch.uint8),
        "depth": torch.randn(rows, *DEPTH.shape, generator=gen),
        "label": torch.arange(rows) % 3,
    }


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\(\)`")
@pytest.mark.parametrize("method", ["two_stage_hallucination", "logit_kd", "imputation"])
def test_a_stage_moves_exactly_its_own_parts(method):
    """Two AdamW steps with weight decay in every stage: the frozen parts' tensors (weights
    and BatchNorm statistics) stay bit-identical, the trained ones move."""
    cfg = cfg_for(method, "train.epochs=6")
    stages = method_stages(cfg)
    for index, stage in enumerate(stages):
        model = _model(method, cfg)
        parts, groups = part_parameter_groups(model)
        opt = torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1)
        start = sum(s.epochs for s in stages[:index])
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, [stage_lr_factor(stages, p, 1, "constant") for p in parts]
        )
        for _ in range(start):
            sched.step()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        set_stage_modes(model, stage)
        for _ in range(2):
            batch = _batch()
            losses = method_losses(
                model(batch), batch["label"], None, method, cfg.loss, terms=stage.terms
            )
            opt.zero_grad()
            losses["total"].backward()
            opt.step()
        after = model.state_dict()
        for key, value in before.items():
            part = key.split(".")[0]
            moved = not torch.equal(value, after[key])
            if not stage.updates(part):
                assert not moved, f"{method}/{stage.name}: frozen {key} moved"
        trained = {k.split(".")[0] for k, v in before.items() if not torch.equal(v, after[k])}
        assert trained and trained <= set(stage.trains), (stage.name, trained)


def test_hallucination_lr_scale_multiplies_only_E_h_and_D_h():
    plain = method_stages(Config())
    assert plain[0].lr_scale == {}
    cfg = apply_overrides(Config(), ["model.hallucination_lr_scale=3"])
    stages = method_stages(cfg)
    for schedule in ("cosine", "constant"):
        base = stage_lr_factor(plain, "E_h", 5, schedule)
        for part, want in (("E_h", 3.0), ("D_h", 3.0), ("E_o", 1.0), ("F", 1.0), ("E_p", 1.0)):
            factor = stage_lr_factor(stages, part, 5, schedule)
            for step in (0, 7, 30):
                assert factor(step) == pytest.approx(want * base(step))


def test_recalibrated_batchnorm_holds_the_plain_statistics_of_the_given_batches():
    from osmd_ray.blocks.stages import recalibrate_batchnorm

    torch.manual_seed(0)
    trained = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    frozen = nn.BatchNorm1d(4)
    model = nn.ModuleDict({"trained": trained, "frozen": frozen})
    frozen.running_mean.fill_(7.0)
    trained[1].running_mean.fill_(-5.0)  # stale, as after a short training
    model.train()
    frozen.eval()  # a part the stage freezes keeps its statistics
    batches = [torch.randn(16, 4) * 3 + 1 for _ in range(3)]

    def forward(x: torch.Tensor) -> torch.Tensor:
        return trained(frozen(x))

    assert recalibrate_batchnorm(model, forward, batches) == 1
    with torch.no_grad():
        features = torch.cat([trained[0](frozen(x)) for x in batches])
    # The mean over equal batches is the mean of all rows; the variance the mean of the
    # batches' unbiased variances.
    assert torch.allclose(trained[1].running_mean, features.mean(0), atol=1e-5)
    expected_var = torch.stack([trained[0](frozen(x)).var(0) for x in batches]).mean(0)
    assert torch.allclose(trained[1].running_var, expected_var.detach(), atol=1e-5)
    assert trained[1].momentum == 0.1  # restored
    assert torch.all(frozen.running_mean == 7.0)
    assert all(p.grad is None for p in model.parameters())
    # No batches: the statistics there were stay.
    before = trained[1].running_mean.clone()
    assert recalibrate_batchnorm(model, forward, []) == 0
    assert torch.equal(trained[1].running_mean, before)
