"""The labels-only control: OS-MD's deployment network (E_o, E_h, F, H) trained on the labels
alone (the deployment term ``L_deploy``), without reading a privileged modality.

Same architecture, same data, no privileged signal: what osmd gains over this comes from the
privileged data, what this gains over ordinary_only from the architecture (a second encoder
and the fusion). It trains exactly the deployment network osmd would train with every other
loss weight at 0, E_h's learning-rate scale included.
"""

from __future__ import annotations

from torch import Tensor

from osmd_ray.blocks.encoders import encode_sharing_stages
from osmd_ray.blocks.nets import Batch, TrainingNet
from osmd_ray.blocks.stages import Stage
from osmd_ray.config import Config
from osmd_ray.methods import osmd
from osmd_ray.methods.interface import Method


def forward(net: TrainingNet, batch: Batch, has_privileged: Tensor | None) -> dict[str, Tensor]:
    """``z_o``, ``z_h`` and ``deploy_logits``; no privileged input is read."""
    z_o, z_h, _ = encode_sharing_stages(net.E_o, net.E_h, batch)
    return {"z_o": z_o, "z_h": z_h, "deploy_logits": net.logits(net.H, net.F(z_o, z_h))}


def stages(cfg: Config) -> list[Stage]:
    lr_scale = osmd.hallucination_lr_scale(cfg)
    return [Stage("joint", cfg.train.epochs, None, {"deploy": 1.0}, lr_scale)]


METHOD = Method(
    name="labels_only",
    summary="osmd's deployment network trained on the labels alone (the control)",
    deploy=osmd.DEPLOY,
    build_deploy=osmd.build_deploy,
    forward=forward,
    stages=stages,
    needs_privileged=False,
)
