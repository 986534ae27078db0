"""Two-stage hallucination (Hoffman 2016, Garcia 2018; DESIGN §3): OS-MD's network trained
as a pipeline that splits the epoch budget (``baselines.two_stage_*`` shares):

1. ``teacher`` trains the multimodal path and H_p (E_o, E_p, F, H, H_p);
2. ``hallucination`` trains E_h to mimic the frozen E_p's features;
3. ``fusion`` trains E_o, F and H on (z_o, frozen z_h).

Deploys what osmd deploys (E_o, E_h, F, H); the teacher path always shares F and H.
"""

from __future__ import annotations

from torch import Tensor

from osmd_ray.blocks.nets import Batch, TrainingNet
from osmd_ray.blocks.stages import Stage, split_epochs
from osmd_ray.config import Config
from osmd_ray.methods import osmd
from osmd_ray.methods.interface import Method


def forward(net: TrainingNet, batch: Batch, has_privileged: Tensor | None) -> dict[str, Tensor]:
    return osmd.hallucination_forward(net, batch, has_privileged, net.F, net.H)


def stages(cfg: Config) -> list[Stage]:
    base = cfg.baselines
    shares = [base.two_stage_teacher, base.two_stage_hallucination, base.two_stage_fusion]
    e = split_epochs(cfg.train.epochs, shares)
    return [
        Stage("teacher", e[0], ("E_o", "E_p", "F", "H", "H_p"), {"teacher": 1.0, "priv": 1.0}),
        Stage("hallucination", e[1], ("E_h",), {"mimic": 1.0}),
        Stage("fusion", e[2], ("E_o", "F", "H"), {"deploy": 1.0}),
    ]


METHOD = Method(
    name="two_stage_hallucination",
    summary="teacher, then E_h mimics the frozen E_p, then fusion on the frozen E_h",
    deploy=osmd.DEPLOY,
    build_deploy=osmd.build_deploy,
    add_training_parts=osmd.add_hallucination_parts,
    forward=forward,
    stages=stages,
    evaluates=("deploy", "teacher"),
    stage_count=3,
)
