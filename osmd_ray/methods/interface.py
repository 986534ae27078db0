"""The one interface every method implements: a frozen record of plain functions.

A method is one module of this package that defines ``METHOD = Method(...)``; the table in
:mod:`osmd_ray.methods` lists them explicitly. No base classes to inherit from and nothing
registered by importing: what a method is can be read off its module, top to bottom.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from osmd_ray.blocks.nets import DeployPlan, Roles, TrainingNet
from osmd_ray.blocks.stages import Stage
from osmd_ray.config import Config

Batch = Mapping[str, Tensor]


def no_config_checks(cfg: Config) -> None:
    """For methods whose config needs nothing beyond the config layer's own checks."""


def no_training_parts(net: TrainingNet) -> None:
    """For methods that train exactly what they deploy."""


@dataclass(frozen=True)
class Method:
    """Everything that makes a method, behind one small interface.

    - ``build_deploy(roles)``: the deployment parts, in registration order (``deploy.parts``);
    - ``add_training_parts(net)``: the parts only training needs (E_p of osmd, a teacher),
      registered on the TrainingNet after its deployment parts and ``dropout``;
    - ``forward(net, batch, has_privileged)``: the TrainingNet's outputs (see TrainingNet);
    - ``stages(cfg)``: which parts each epoch trains, with which loss terms; ``stage_count``
      of them, whose epochs sum to ``train.epochs``;
    - ``evaluates``: the paths scored on val and test (``<path>_logits`` outputs; "deploy" is
      what the deployment network computes);
    - ``needs_privileged``: training reads the privileged modalities;
    - ``check_config(cfg)``: what this method needs of a config, as ConfigErrors naming the key;
    - ``tuned_weights``: the config keys of this method's own positive loss weights (and
      temperatures), which ``osmd compare --tune`` searches with ``train.lr``.
    """

    name: str
    summary: str
    deploy: DeployPlan
    build_deploy: Callable[[Roles], dict[str, nn.Module]]
    forward: Callable[[TrainingNet, Batch, Tensor | None], dict[str, Tensor]]
    stages: Callable[[Config], list[Stage]]
    evaluates: tuple[str, ...] = ("deploy",)
    needs_privileged: bool = True
    stage_count: int = 1
    add_training_parts: Callable[[TrainingNet], None] = no_training_parts
    check_config: Callable[[Config], None] = no_config_checks
    tuned_weights: tuple[str, ...] = ()
