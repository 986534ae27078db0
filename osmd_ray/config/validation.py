"""Validation of a config: types first, then values, then contradictions between keys.

Every problem is a :class:`~osmd_ray.errors.ConfigError` naming the dotted key at fault. What
a method needs of the config (privileged modalities, epochs for its stages) is the method's
own check (:func:`osmd_ray.methods.check_config`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from osmd_ray.config.keys import (
    did_you_mean,
    field_types,
    join_key,
    show_value,
    type_error,
)
from osmd_ray.config.schema import (
    ALIGNMENTS,
    DEPLOY_EPOCHS,
    FUSIONS,
    HALLUCINATIONS,
    IMAGE_ENCODER_PREFIXES,
    JMMD_ESTIMATORS,
    KD_SOURCES,
    LOSS_WEIGHTS,
    METHOD_NAMES,
    NONFINITE_POLICIES,
    NORMS,
    POOLS,
    PRECISIONS,
    RECON_LOSSES,
    RECON_MODES,
    RECON_TARGETS,
    SCHEDULES,
    SEED_LIMIT,
    ZERO_STAGES,
    Config,
    ModelConfig,
    ScalingConfig,
    StorageConfig,
)
from osmd_ray.errors import ConfigError


def validate(cfg: Config) -> None:
    """Raise ConfigError (naming the key) for a wrong type, a bad value or a contradiction."""
    _check_types(cfg, Config, "")
    _check_data(cfg)
    _check_model(cfg.model)
    _check_loss(cfg)
    _check_train(cfg)
    _check_baselines(cfg)
    _check_scaling(cfg.scaling)
    _check_storage(cfg.storage)
    if cfg.tracking.wandb and not cfg.tracking.project.strip():
        raise ConfigError(
            "config key 'tracking.project' is empty while tracking.wandb is true; "
            "name a wandb project or set tracking.wandb=false",
            "tracking.project",
        )


def _check_data(cfg: Config) -> None:
    _at_least(cfg.data.train_rows, 0, "data.train_rows")
    data = cfg.data
    _one_of(cfg.method, METHOD_NAMES, "method")
    if not 0 <= cfg.seed < SEED_LIMIT:
        raise ConfigError(
            f"config key 'seed' must be in 0..{SEED_LIMIT - 1}; got {cfg.seed}", "seed"
        )
    if not data.root.strip():
        raise ConfigError("config key 'data.root' is empty; give the dataset folder", "data.root")
    for key, names in (("data.ordinary", data.ordinary), ("data.privileged", data.privileged)):
        if any(not name.strip() for name in names):
            raise ConfigError(f"config key {key!r} contains an empty modality name", key)
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ConfigError(
                f"config key {key!r} lists {', '.join(map(repr, duplicates))} more than once; "
                "list each modality once",
                key,
            )
    if not data.ordinary:
        raise ConfigError(
            "config key 'data.ordinary' is empty; the deployed model needs at least one "
            "ordinary modality, e.g. data.ordinary=[rgb]",
            "data.ordinary",
        )
    both = [name for name in data.privileged if name in data.ordinary]
    if both:
        raise ConfigError(
            f"config key 'data.privileged' repeats {', '.join(map(repr, both))} from "
            "data.ordinary; a modality is either ordinary (available at deployment) or "
            "privileged (training only), remove it from one list",
            "data.privileged",
        )
    _at_least(data.batch_size, 1, "data.batch_size")
    _at_least(data.eval_batch_size, 1, "data.eval_batch_size")
    _at_least(data.in_memory_mb, 0, "data.in_memory_mb")


def _check_model(model: ModelConfig) -> None:
    encoder = model.image_encoder
    prefix = next((p for p in IMAGE_ENCODER_PREFIXES if encoder.startswith(p)), None)
    if encoder != "small_cnn" and (prefix is None or not encoder[len(prefix) :].strip()):
        raise ConfigError(
            f"config key 'model.image_encoder' must be small_cnn, timm:<name> or "
            f"torchvision:<name>; got {encoder!r}",
            "model.image_encoder",
        )
    if model.pretrained.strip() and encoder == "small_cnn":
        raise ConfigError(
            "config key 'model.pretrained' needs a timm:<name> or torchvision:<name> "
            'model.image_encoder (small_cnn has no pretrained weights); set it to "" or '
            "change model.image_encoder",
            "model.pretrained",
        )
    for name in ("width", "depth", "feature_dim"):
        _at_least(getattr(model, name), 1, f"model.{name}")
    _one_of(model.fusion, FUSIONS, "model.fusion")
    _one_of(model.norm, NORMS, "model.norm")
    key = "model.hallucination_shared_stages"
    if not 0 <= model.hallucination_shared_stages <= model.depth:
        raise ConfigError(
            f"config key {key!r} must be between 0 and model.depth ({model.depth}); "
            f"got {model.hallucination_shared_stages}",
            key,
        )
    if model.hallucination_shared_stages and encoder != "small_cnn":
        raise ConfigError(
            f"config key {key!r} only applies to the small_cnn image encoder, not {encoder!r}; "
            "set it to 0",
            key,
        )
    _at_least(model.recon_size, 1, "model.recon_size")
    _one_of(model.recon_mode, RECON_MODES, "model.recon_mode")
    _one_of(model.pool, POOLS, "model.pool")
    _one_of(model.recon_target, RECON_TARGETS, "model.recon_target")
    _one_of(model.hallucination, HALLUCINATIONS, "model.hallucination")
    _positive(model.hallucination_lr_scale, "model.hallucination_lr_scale")
    if model.hallucination == "unet" and model.hallucination_shared_stages:
        raise ConfigError(
            "config key 'model.hallucination_shared_stages' must be 0 with "
            "model.hallucination=unet (its E_h shares no stages with E_o)",
            "model.hallucination_shared_stages",
        )
    _positive(model.hallucination_width, "model.hallucination_width")
    _at_least(model.hallucination_depth, 0, "model.hallucination_depth")
    # Shared stages, and timm/torchvision backbones, have E_o's shape: no width or stages of
    # E_h's own to change, so both keys must keep their "like E_o" values there.
    why = ""
    if model.hallucination_shared_stages:
        why = "model.hallucination_shared_stages > 0 (E_h's first stages are E_o's)"
    elif encoder != "small_cnn":
        why = f"model.image_encoder={encoder!r} (it has no small_cnn width or stages)"
    for key, value, like_e_o in (
        ("model.hallucination_width", model.hallucination_width, 1),
        ("model.hallucination_depth", model.hallucination_depth, 0),
    ):
        if why and value != like_e_o:
            raise ConfigError(
                f"config key {key!r} must be {like_e_o} with {why}; got {value}. "
                f"Add {key}={like_e_o}",
                key,
            )
    if not 0.0 <= model.dropout < 1.0:
        raise ConfigError(
            f"config key 'model.dropout' must be in [0, 1); got {model.dropout}", "model.dropout"
        )


def _check_loss(cfg: Config) -> None:
    loss = cfg.loss
    for name in LOSS_WEIGHTS:
        _at_least(getattr(loss, name), 0.0, f"loss.{name}")
    _one_of(loss.alignment, ALIGNMENTS, "loss.alignment")
    _one_of(loss.recon_loss, RECON_LOSSES, "loss.recon_loss")
    _one_of(loss.kd_source, KD_SOURCES, "loss.kd_source")
    _one_of(loss.jmmd_estimator, JMMD_ESTIMATORS, "loss.jmmd_estimator")
    _at_least(loss.num_kernels, 1, "loss.num_kernels")
    _at_least(loss.jan_warmup_epochs, 0, "loss.jan_warmup_epochs")
    _at_least(loss.jmmd_pixels, 2, "loss.jmmd_pixels")
    _at_least(loss.prediction_bandwidth, 0.0, "loss.prediction_bandwidth")
    if not loss.contrastive_temperature > 0.0:
        raise ConfigError(
            "config key 'loss.contrastive_temperature' must be > 0 (it divides the cosine "
            f"similarities); got {loss.contrastive_temperature}",
            "loss.contrastive_temperature",
        )
    if not loss.kernel_mul > 1.0:
        raise ConfigError(
            f"config key 'loss.kernel_mul' must be > 1 (the ratio between kernel bandwidths); "
            f"got {loss.kernel_mul}",
            "loss.kernel_mul",
        )


def _check_baselines(cfg: Config) -> None:
    base = cfg.baselines
    for name in ("two_stage_teacher", "two_stage_hallucination", "two_stage_fusion"):
        if not getattr(base, name) > 0:
            raise ConfigError(
                f"config key 'baselines.{name}' must be > 0 (a relative share of the epochs); "
                f"got {getattr(base, name)}",
                f"baselines.{name}",
            )
    for name in ("kd_teacher_fraction", "imputation_fraction"):
        value = getattr(base, name)
        if not 0.0 < value < 1.0:
            raise ConfigError(
                f"config key 'baselines.{name}' must be strictly between 0 and 1 (both stages "
                f"need epochs); got {value}",
                f"baselines.{name}",
            )
    if not base.kd_temperature > 0:
        raise ConfigError(
            f"config key 'baselines.kd_temperature' must be > 0; got {base.kd_temperature}",
            "baselines.kd_temperature",
        )
    if not 0.0 <= base.kd_weight <= 1.0:
        raise ConfigError(
            f"config key 'baselines.kd_weight' must be in [0, 1]; got {base.kd_weight}",
            "baselines.kd_weight",
        )


def _check_train(cfg: Config) -> None:
    train = cfg.train
    _at_least(train.epochs, 1, "train.epochs")
    if not train.lr > 0:
        raise ConfigError(f"config key 'train.lr' must be > 0; got {train.lr}", "train.lr")
    _at_least(train.weight_decay, 0.0, "train.weight_decay")
    _at_least(train.grad_clip, 0.0, "train.grad_clip")
    _one_of(train.zero_stage, ZERO_STAGES, "train.zero_stage")
    _one_of(train.precision, PRECISIONS, "train.precision")
    if train.precision == "bf16" and not cfg.scaling.use_gpu:
        raise ConfigError(
            "config key 'train.precision' is bf16 but scaling.use_gpu is false; CPU workers "
            "train in fp32, so set train.precision=auto (or fp32) or scaling.use_gpu=true",
            "train.precision",
        )
    _one_of(train.nonfinite, NONFINITE_POLICIES, "train.nonfinite")
    _one_of(train.schedule, SCHEDULES, "train.schedule")
    _at_least(train.max_failures, -1, "train.max_failures")
    _at_least(train.bn_recalibration_batches, 0, "train.bn_recalibration_batches")
    _at_least(train.early_stopping.patience, 0, "train.early_stopping.patience")
    _at_least(train.early_stopping.min_delta, 0.0, "train.early_stopping.min_delta")
    _one_of(train.deploy_epoch, DEPLOY_EPOCHS, "train.deploy_epoch")


def _check_scaling(scaling: ScalingConfig) -> None:
    _at_least(scaling.num_workers, 0, "scaling.num_workers")  # 0: in the calling process
    if not scaling.cpus_per_worker > 0:
        raise ConfigError(
            f"config key 'scaling.cpus_per_worker' must be > 0 (fractions are allowed); "
            f"got {scaling.cpus_per_worker}",
            "scaling.cpus_per_worker",
        )


def _check_storage(storage: StorageConfig) -> None:
    url = storage.endpoint_url
    if not url:
        return
    # user:password@ in the URL would put a credential into config.yaml and wandb; the
    # message must not echo it either.
    if "@" in url:
        raise ConfigError(
            "config key 'storage.endpoint_url' holds credentials (user:password@host); give "
            "only the endpoint and put credentials in AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY or an instance profile",
            "storage.endpoint_url",
        )
    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", url):
        raise ConfigError(
            f"config key 'storage.endpoint_url' must be empty or an http(s) URL, e.g. "
            f" http://127.0.0.1:5000; got {show_value(url)}",
            "storage.endpoint_url",
        )


def _one_of(value: Any, choices: Sequence[Any], key: str) -> None:
    if value not in choices:
        hint = did_you_mean(value, choices) if isinstance(value, str) else ""
        raise ConfigError(
            f"config key {key!r} must be one of {', '.join(map(str, choices))}; "
            f"got {value!r}{hint}",
            key,
        )


def _positive(value: float, key: str) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"config key {key!r} must be a finite number > 0; got {value}", key)


def _at_least(value: float, lowest: float, key: str) -> None:
    if not value >= lowest:
        raise ConfigError(f"config key {key!r} must be >= {lowest}; got {value!r}", key)


def _check_types(obj: Any, cls: type, prefix: str) -> None:
    """Programmatically built configs (``Config(seed="3")``) get the same type errors."""
    if type(obj) is not cls:
        raise ConfigError(
            f"config section {prefix or 'root'!r} must be a {cls.__name__}; "
            f"got {type(obj).__name__}",
            prefix,
        )
    for name, tp in field_types(cls).items():
        key, value = join_key(prefix, name), getattr(obj, name)
        if dataclasses.is_dataclass(tp):
            _check_types(value, tp, key)
        elif not _has_type(value, tp):
            raise type_error(
                key,
                tp,
                value,
                " (build configs with load_config, "
                "config_from_dict or apply_overrides to convert values)",
            )


def _has_type(value: Any, tp: Any) -> bool:
    # Exact type checks: numpy scalars or str subclasses would not survive yaml.safe_dump.
    if tp is float:
        return type(value) is int or (type(value) is float and math.isfinite(value))
    if tp in (bool, int, str):
        return type(value) is tp
    return type(value) is list and all(type(item) is str for item in value)


def check_against_manifest(cfg: Config, manifest: Any) -> None:
    """Every configured modality must exist in ``manifest.modalities`` (name -> ModalitySpec),
    and the splits in ``manifest.splits`` (when given) must feed every worker: at least one
    training batch each, and at least one row of val and of test each."""
    _check_rows(cfg, getattr(manifest, "splits", None) or {})
    available = sorted(manifest.modalities)
    for key, names in (
        ("data.ordinary", cfg.data.ordinary),
        ("data.privileged", cfg.data.privileged),
    ):
        for name in names:
            if name not in manifest.modalities:
                raise ConfigError(
                    f"config key {key!r} names modality {name!r}, which the dataset at "
                    f"{cfg.data.root!r} does not have{did_you_mean(name, available)}; "
                    f"available modalities: {', '.join(available) or '(none)'}",
                    key,
                )


def _check_rows(cfg: Config, splits: Mapping[str, Any]) -> None:
    workers, root = max(1, cfg.scaling.num_workers), cfg.data.root
    rows = {split: sum(shard.rows for shard in shards) for split, shards in splits.items()}
    if "train" in rows and cfg.data.train_rows:
        if cfg.data.train_rows > rows["train"]:
            raise ConfigError(
                f"config key 'data.train_rows' is {cfg.data.train_rows}, but the training split "
                f"of {root!r} has {rows['train']} rows; ask for at most that many (0: all)",
                "data.train_rows",
            )
        rows["train"] = cfg.data.train_rows
    if "train" in rows and rows["train"] // workers < cfg.data.batch_size:
        # Workers drop the last partial batch (equal step counts), so no step would run.
        raise ConfigError(
            f"config key 'data.batch_size' is {cfg.data.batch_size}, but each of the {workers} "
            f"worker(s) gets {rows['train'] // workers} training rows of {root!r}, so no "
            "training step would run; lower data.batch_size or scaling.num_workers",
            "data.batch_size",
        )
    for split in ("val", "test"):
        if split in rows and rows[split] < workers:
            raise ConfigError(
                f"config key 'scaling.num_workers' is {workers}, but split {split!r} of "
                f"{root!r} has {rows[split]} row(s); every worker needs at least one",
                "scaling.num_workers",
            )
