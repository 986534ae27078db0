"""The epoch body (osmd_ray/train/epoch.py): what its loss weighs at a given epoch."""

from __future__ import annotations

import pytest
import torch

from osmd_ray.config import apply_overrides, load_config
from osmd_ray.methods import build_training_net, get_method
from osmd_ray.train.epoch import batch_losses, run_epoch


def _tiny(cfg, rgbd_batch):
    rgb, depth, batch = rgbd_batch(8)
    torch.manual_seed(0)
    return build_training_net("osmd", [rgb], [depth], 3, cfg.model, None, None), batch


def _warm_up_cfg():
    return apply_overrides(
        load_config("configs/osmd_synth.yaml"),
        ["loss.w_jan=0.5", "loss.jan_warmup_epochs=4", "model.width=4", "model.feature_dim=8"],
    )


def test_batch_losses_weigh_the_alignment_as_its_warm_up_says_at_that_epoch(rgbd_batch):
    cfg = _warm_up_cfg()
    model, batch = _tiny(cfg, rgbd_batch)
    model.eval()
    with torch.no_grad():
        outputs = model(batch)
        full = batch_losses(outputs, batch, cfg)  # no epoch: the full weight
        first = batch_losses(outputs, batch, cfg, epoch=0)
        last = batch_losses(outputs, batch, cfg, epoch=3)
    jan = float(full["jan"])
    assert jan > 0
    # Epoch 1 of 4 weighs the term 0.5 / 4; epoch 4 and later its full 0.5.
    assert float(full["total"] - first["total"]) == pytest.approx(0.5 * 0.75 * jan, rel=1e-4)
    assert float(last["total"]) == pytest.approx(float(full["total"]), rel=1e-6)


def test_an_epoch_trains_with_the_alignment_weight_of_its_own_epoch(rgbd_batch):
    cfg = _warm_up_cfg()
    model, batch = _tiny(cfg, rgbd_batch)
    stage = get_method("osmd").stages(cfg)[-1]
    totals: dict[int, float] = {}

    def record(epoch):
        def step(total):  # no update: both epochs see the same weights
            totals[epoch] = float(total.detach())

        return step

    for epoch in (0, 3):
        run_epoch(
            model,
            model,
            stage,
            [batch],
            record(epoch),
            cfg,
            device=torch.device("cpu"),
            ignore_index=-100,
            epoch=epoch,
            global_step=0,
        )
    with torch.no_grad():
        jan = float(batch_losses(model(batch), batch, cfg)["jan"])  # train mode, as the epochs
    assert totals[3] - totals[0] == pytest.approx(0.5 * 0.75 * jan, rel=1e-3)


def test_step_loss_values_reads_every_term_at_once_and_names_the_bad_ones():
    from osmd_ray.train.epoch import step_loss_values

    losses = {
        "total": torch.tensor(float("nan")),
        "deploy": torch.tensor(0.5, dtype=torch.bfloat16),
        "jan": torch.tensor(float("inf")),
        "priv": torch.tensor(2.0),
    }
    names, values, bad = step_loss_values(losses, torch.device("cpu"))
    assert names == ["deploy", "jan", "priv", "total"]
    assert values.dtype == torch.float64 and values[0] == 0.5 and values[2] == 2.0
    assert bad == ["jan", "total"]
