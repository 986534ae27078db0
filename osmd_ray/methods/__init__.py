"""The methods: one module each, listed in the one table below.

Each module defines ``METHOD``, a :class:`~osmd_ray.methods.interface.Method`: the parts it
builds, its forward paths, its stages (the loss terms of each), what it evaluates, what it
deploys and from which inputs, and its config checks. Everything else in the package asks
this table, never a method's name.

To add a method: write ``osmd_ray/methods/<name>.py`` defining ``METHOD``, add it to
:data:`METHODS` and its name to ``osmd_ray.config.schema.METHOD_NAMES``, and add a test
(the README's guide, "Adding a method").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from osmd_ray.blocks.encoders import Normalization
from osmd_ray.blocks.losses import compute_losses
from osmd_ray.blocks.nets import DeployNet, Roles, TrainingNet, check_roles
from osmd_ray.config import Config, LossConfig, ModelConfig
from osmd_ray.config.keys import did_you_mean
from osmd_ray.config.schema import METHOD_NAMES
from osmd_ray.data.schema import Manifest, ModalitySpec
from osmd_ray.errors import ConfigError
from osmd_ray.methods import (
    full_multimodal,
    imputation,
    labels_only,
    logit_kd,
    ordinary_only,
    osmd,
    two_stage_hallucination,
)
from osmd_ray.methods.interface import Method

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        osmd.METHOD,
        ordinary_only.METHOD,
        full_multimodal.METHOD,
        two_stage_hallucination.METHOD,
        logit_kd.METHOD,
        imputation.METHOD,
        labels_only.METHOD,
    )
}
"""Every method, by name, in the order of ``config.schema.METHOD_NAMES``."""


def get_method(name: str) -> Method:
    """The method called ``name``; a ConfigError naming the ``method`` key otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(
            f"config key 'method' must be one of {', '.join(METHODS)}; got {name!r}"
            f"{did_you_mean(name, list(METHODS))}",
            "method",
        ) from None


def check_config(cfg: Config) -> Method:
    """What ``cfg.method`` needs of the config (beyond :func:`osmd_ray.config.validate`):
    privileged modalities if it reads them, an epoch for each of its stages, and its own
    checks. Raises ConfigError naming the key; returns the method."""
    method = get_method(cfg.method)
    if method.needs_privileged and not cfg.data.privileged:
        raise ConfigError(
            f"config key 'data.privileged' is empty but method {cfg.method!r} needs at least "
            "one privileged modality; add one (e.g. data.privileged=[depth]) or use "
            "method=ordinary_only",
            "data.privileged",
        )
    stages = method.stage_count
    if stages > 1 and cfg.train.epochs < stages:
        raise ConfigError(
            f"config key 'train.epochs' is {cfg.train.epochs}, but method {cfg.method!r} trains "
            f"in {stages} stages of at least one epoch each; use train.epochs>={stages}",
            "train.epochs",
        )
    method.check_config(cfg)
    return method


def _roles(
    ordinary: Sequence[ModalitySpec],
    privileged: Sequence[ModalitySpec],
    uses_privileged: bool,
    num_classes: int,
    cfg: ModelConfig,
    normalization: Normalization | None,
    output_size: tuple[int, int] | None,
) -> Roles:
    """The Roles a network is built for; the privileged modalities only if it uses them."""
    return Roles(
        tuple(ordinary),
        tuple(privileged) if uses_privileged else (),
        num_classes,
        cfg,
        normalization,
        None if output_size is None else tuple(output_size),
    )


def build_training_net(
    name: str,
    ordinary: Sequence[ModalitySpec],
    privileged: Sequence[ModalitySpec],
    num_classes: int,
    cfg: ModelConfig,
    normalization: Normalization | None,
    output_size: tuple[int, int] | None = None,
) -> TrainingNet:
    """The network method ``name`` trains, freshly initialised: its deployment parts, then
    ``dropout``, then its training-only parts (the order the initial weights are drawn in).
    A method that reads no privileged modality ignores ``privileged``."""
    method = get_method(name)
    roles = _roles(
        ordinary, privileged, method.needs_privileged, num_classes, cfg, normalization, output_size
    )
    check_roles(roles, method.needs_privileged, name)
    net = TrainingNet(name, roles, method.deploy, method.forward)
    for part, module in method.build_deploy(roles).items():
        net.add_module(part, module)
    net.dropout = nn.Dropout(cfg.dropout)
    method.add_training_parts(net)
    return net


def build_deploy_net(
    name: str,
    ordinary: Sequence[ModalitySpec],
    privileged: Sequence[ModalitySpec],
    num_classes: int,
    cfg: ModelConfig,
    normalization: Normalization | None,
    output_size: tuple[int, int] | None = None,
) -> DeployNet:
    """A freshly initialised deployment network of method ``name`` (loading an export);
    ``privileged`` is used only by methods whose deployment network holds E_p."""
    method = get_method(name)
    plan = method.deploy
    roles = _roles(
        ordinary, privileged, plan.privileged_specs, num_classes, cfg, normalization, output_size
    )
    check_roles(roles, plan.privileged_specs, name)
    parts = method.build_deploy(roles)
    return DeployNet(name, plan, parts, plan.inputs(roles), cfg.dropout, roles.output_size)


def _role_specs(manifest: Manifest, names: Sequence[str], role: str) -> list[ModalitySpec]:
    missing = [n for n in names if n not in manifest.modalities]
    if missing:
        raise ValueError(
            f"data.{role} names {missing}, which the dataset does not have "
            f"(modalities: {sorted(manifest.modalities)})"
        )
    return [manifest.modalities[n] for n in names]


def build_model(cfg: Config, manifest: Manifest) -> TrainingNet:
    """The training network of ``cfg.method`` for a dataset's manifest.

    Uses ``manifest.modalities[name]`` for the configured roles, ``manifest.num_classes``,
    the ``manifest.normalization`` of the roles' modalities, and ``manifest.task`` with
    ``manifest.label_shape`` (segmentation: the label maps' H x W). A method that reads no
    privileged modality ignores (and does not require) them.
    """
    method = get_method(cfg.method)
    ordinary = _role_specs(manifest, cfg.data.ordinary, "ordinary")
    privileged = (
        _role_specs(manifest, cfg.data.privileged, "privileged") if method.needs_privileged else []
    )
    stats = manifest.normalization
    if stats is not None:
        names = {s.name for s in ordinary + privileged}
        stats = {name: v for name, v in stats.items() if name in names}
    output_size = tuple(manifest.label_shape) if manifest.task == "segmentation" else None
    return build_training_net(
        cfg.method, ordinary, privileged, manifest.num_classes, cfg.model, stats, output_size
    )


def method_losses(
    outputs: dict[str, Tensor],
    labels: Tensor,
    has_privileged: Tensor | None,
    name: str,
    loss: LossConfig,
    ignore_index: int = -100,
    terms: Mapping[str, float] | None = None,
    kd_temperature: float = 4.0,
) -> dict[str, Tensor]:
    """:func:`~osmd_ray.blocks.losses.compute_losses` with the objective of method ``name``'s
    last stage (the one that trains its deployment path; the only one of a single-stage
    method) under the ``loss`` config, or with ``terms`` instead of that stage's weights."""
    stage = get_method(name).stages(Config(method=name, loss=loss))[-1]
    return compute_losses(
        outputs,
        labels,
        has_privileged,
        loss,
        stage.terms if terms is None else terms,
        ignore_index=ignore_index,
        kd_temperature=kd_temperature,
        kd_source=stage.kd_source,
    )


if tuple(METHODS) != METHOD_NAMES:  # a programming error, caught by the first import
    raise RuntimeError(f"methods table {tuple(METHODS)} != config METHOD_NAMES {METHOD_NAMES}")
