"""Typed run configuration: one small dataclass per concern, and its loading rules (DESIGN §7).

Every field has a docstring-style comment; a Tune search key such as ``loss.w_jan`` maps onto
exactly one field here.

A config is built in three layers: the dataclass defaults, then a YAML file, then
``key.sub=value`` overrides (later wins). Each layer is type-checked as it is applied and the
result is validated once by :func:`validate`. Every problem is a :class:`ConfigError` naming
the dotted key at fault; this module is the only place these rules live.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import functools
import math
import numbers
import os
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from osmd_ray import storage
from osmd_ray.errors import ConfigError


@dataclass
class DataConfig:
    root: str = "data/synth_cls"
    """Dataset folder (or s3:// prefix) holding manifest.json and the split shards."""
    ordinary: list[str] = field(default_factory=lambda: ["rgb"])
    """Modalities present in training and at deployment."""
    privileged: list[str] = field(default_factory=lambda: ["depth"])
    """Modalities present in training only."""
    batch_size: int = 64
    """Training batch size per worker."""
    eval_batch_size: int = 256
    """Batch size per worker for validation and test."""
    in_memory_mb: int = 1024
    """Datasets up to this size (all splits, on disk) are read once into Ray's object store;
    larger ones stream from storage every epoch. 0 always streams."""


@dataclass
class ModelConfig:
    image_encoder: str = "small_cnn"
    """small_cnn, or timm:<name> / torchvision:<name> (never downloads weights)."""
    width: int = 32
    """Channels of the first CNN stage; hidden units of the MLP and the 1-D CNN."""
    depth: int = 3
    """Number of stages (CNN) or hidden layers (MLP)."""
    feature_dim: int = 128
    """Size of every encoder's output feature vector (z_o, z_p, z_h)."""
    fusion: str = "ctn"
    """How F merges (ordinary, privileged-space) features: ctn, concat or sum."""
    shared_translator: bool = True
    """CTN: one translator T for both directions (False: one per direction)."""
    share_fusion: bool = True
    """Teacher and deployment paths share F and H (False: separate copies, an ablation)."""
    hallucination_shared_stages: int = 0
    """Image small_cnn only: how many first stages E_h shares with E_o."""
    hallucination_width: float = 0.25
    """E_h's channels (small_cnn, 1-D CNN and MLP widths) relative to ``width``."""
    hallucination_depth: int = 1
    """E_h's ``depth`` (small_cnn stages, 1-D CNN blocks or MLP hidden layers); 0: ``depth``.

    E_h runs next to E_o in the deployment network, so a small one keeps deployment cheap: on
    the synthetic set one stage at a quarter of the width held the accuracy of an E_h shaped
    like E_o (5 seeds) at 1.03x ordinary_only's FLOPs instead of 2.0x, and batch-1 latency
    pays for the number of operations as much as for FLOPs (benchmarks/RESULTS.md, section
    2). Set hallucination_width=1 and hallucination_depth=0 with hallucination_shared_stages
    > 0 or a timm/torchvision image encoder (they have no width or stages to change)."""
    hallucination_lr_scale: float = 1.0
    """osmd: learning-rate multiplier of E_h and D_h (the parts the dense reconstruction
    trains) relative to train.lr; the other parts keep train.lr."""
    hallucination: str = "encoder"
    """Shape of E_h: encoder (a role encoder like E_o) or unet (a U-Net that decodes a
    full-resolution map, from which the training-only D_h reads the privileged images, then
    a small_cnn of E_h's own on that map; image ordinary modalities of one size only)."""
    dropout: float = 0.0
    """Dropout before the heads."""
    norm: str = "batch"
    """Normalisation in the CNN encoders: batch or group (no running statistics)."""
    pool: str = "avg"
    """Image small_cnn (classification): how the last feature map becomes a vector, avg
    (global average) or max (global max)."""
    teacher_detach_ordinary: bool = False
    """osmd: the teacher path sees stopgrad(z_o), so E_o learns only from the deployment path
    (with real privileged features beside it, E_o could otherwise stay lazy)."""
    recon_mode: str = "dense"
    """osmd, loss.w_recon: dense (a 1x1 convolution on E_h's last feature map predicts the
    privileged images pooled to that map's size; needs a small_cnn E_h and image privileged
    modalities, else pooled is used) or pooled (a linear decoder from z_h)."""
    recon_size: int = 6
    """recon_mode=pooled: image privileged inputs are average-pooled to recon_size x
    recon_size (sequences to recon_size steps) as the target z_h must decode."""
    recon_target: str = "input"
    """What D_h reconstructs (loss.w_recon): input (the privileged values, normalised with
    the training split's statistics) or inverse (their reciprocals, 0 where a value is <= 0
    such as a missing depth reading, standardised per channel over the batch's rows that
    have them): for depth, the disparity, in which near surfaces differ more than far ones
    and the far background no longer dominates the squared error (docs/results.md,
    "Seventh round")."""


@dataclass
class LossConfig:
    w_deploy: float = 1.0
    """Weight of task_loss(H(F(z_o, z_h)), y)."""
    w_teacher: float = 1.0
    """Weight of task_loss(H(F(z_o, z_p)), y)."""
    w_priv: float = 1.0
    """Weight of task_loss(H_p(z_p), y)."""
    w_jan: float = 0.0
    """Weight of the distribution alignment between z_h and z_p (JMMD or MMD, see alignment).
    DESIGN §2 uses 1; 0 by default since it cost accuracy on the synthetic set
    (docs/results.md, "What makes OS-MD win")."""
    w_mimic: float = 0.0
    """Weight of ||z_h - stopgrad(z_p)||^2 (Hoffman et al. 2016)."""
    w_recon: float = 10.0
    """Weight of the dense supervision of E_h by the privileged input: the decoder D_h
    (model.recon_mode) predicts the pooled, normalised privileged input (mean squared error)."""
    recon_loss: str = "mse"
    """What the w_recon term measures per value: mse (mean squared error) or l1 (mean
    absolute error, which does not let the few large errors at object edges dominate)."""
    w_kd: float = 1.0
    """osmd: weight of the one-stage distillation of soft predictions (detached, see
    kd_source) into the deployment path, T^2 KL at temperature baselines.kd_temperature; it
    uses the pairing of each sample's two views, which (J)MMD ignores."""
    kd_source: str = "privileged"
    """osmd, w_kd: whose soft predictions the deployment path learns from: privileged
    (H_p(z_p), the head on the privileged modalities alone: generalised distillation, Lopez-Paz
    et al. 2016) or teacher (the teacher path H(F(z_o, z_p))). privileged gained 2.3 points
    on the synthetic set, teacher nothing (docs/results.md, "Seventh round")."""
    alignment: str = "jmmd"
    """What the w_jan term computes: jmmd (features and predictions) or mmd (features only)."""
    num_kernels: int = 5
    """Gaussian kernels per layer in (J)MMD."""
    kernel_mul: float = 2.0
    """Ratio between successive kernel bandwidths."""
    jmmd_estimator: str = "quadratic"
    """Estimator of the (J)MMD term: quadratic (biased, all pairs of the batch, O(n^2)) or
    linear (Gretton et al. 2012, consecutive pairs of rows, O(n); unbiased but noisier).
    Cost against batch size: benchmarks/RESULTS.md."""
    detach_privileged: bool = True
    """Stop gradients from the alignment terms into E_p."""
    jmmd_pixels: int = 256
    """Segmentation: pixels drawn per step (from the global RNG, which the workers seed per
    epoch and rank) for the per-pixel (J)MMD, beside the one on pooled features; bounds
    its cost whatever the image size."""


@dataclass
class BaselineConfig:
    two_stage_teacher: float = 0.4
    """two_stage_hallucination: relative share of train.epochs that trains the teacher."""
    two_stage_hallucination: float = 0.3
    """two_stage_hallucination: relative share that trains E_h to mimic the frozen teacher."""
    two_stage_fusion: float = 0.3
    """two_stage_hallucination: relative share that trains the fusion of E_o and the frozen
    E_h (the three shares are normalised by their sum)."""
    kd_teacher_fraction: float = 0.5
    """logit_kd: share of train.epochs that trains the full_multimodal teacher; the rest
    trains the ordinary-only student."""
    kd_temperature: float = 4.0
    """logit_kd: softmax temperature of the distillation term."""
    kd_weight: float = 0.9
    """logit_kd: weight of the distillation term; the label term gets 1 - kd_weight."""
    imputation_fraction: float = 0.4
    """imputation: share of train.epochs that trains the generator G alone (L1); the rest
    trains E_o, E_p, F and H on (ordinary, reconstructed)."""


@dataclass
class TrainConfig:
    epochs: int = 10
    """Passes over the training split."""
    lr: float = 1e-3
    """AdamW learning rate."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage, 0 to 3."""
    precision: str = "auto"
    """auto (fp32 on CPU, bf16 on GPU), fp32 or bf16."""
    schedule: str = "cosine"
    """Learning rate over the run: cosine (decays to 0 at the last step) or constant."""
    grad_clip: float = 1.0
    """Gradient norm clipping (0 turns it off)."""
    nonfinite: str = "error"
    """On a NaN or inf loss: error (stop, naming step and term) or skip (drop the step)."""
    max_failures: int = 0
    """Worker failures survived by restarting from the last checkpoint (-1: no limit)."""
    bn_recalibration_batches: int = 16
    """After every epoch, recompute the BatchNorm running statistics of the parts the epoch
    trained from (up to) its last this-many training batches, no gradients; 0 turns it off.
    With few steps per epoch, BatchNorm's default momentum leaves statistics of an earlier,
    weaker network (docs/results.md)."""


@dataclass
class ScalingConfig:
    num_workers: int = 2
    """Ray Train workers (one DeepSpeed rank each)."""
    use_gpu: bool = False
    """One GPU per worker."""
    cpus_per_worker: float = 1.0
    """Logical CPUs each worker reserves; leave room for Ray Data's read tasks."""


@dataclass
class TrackingConfig:
    wandb: bool = True
    """Log to wandb from rank 0 (offline into the run folder without WANDB_API_KEY)."""
    project: str = "osmd_ray"
    """wandb project."""
    group: str = ""
    """wandb group (compare and sweep set it)."""


@dataclass
class StorageConfig:
    endpoint_url: str = ""
    """Endpoint of an S3-compatible store for s3:// paths (e.g. http://127.0.0.1:5000);
    empty: AWS_ENDPOINT_URL, else AWS. Credentials never go here: they come from the
    environment or the instance profile."""


@dataclass
class Config:
    method: str = "osmd"
    """osmd, ordinary_only, full_multimodal, two_stage_hallucination, logit_kd or imputation."""
    seed: int = 0
    """Seed of initialisation, data order and dropout."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)


METHODS = (
    "osmd",
    "ordinary_only",
    "full_multimodal",
    "two_stage_hallucination",
    "logit_kd",
    "imputation",
)
STAGED_METHODS = {"two_stage_hallucination": 3, "logit_kd": 2, "imputation": 2}
"""Baselines trained in stages, and how many (each stage needs at least one epoch)."""
NORMS = ("batch", "group")
SCHEDULES = ("cosine", "constant")
FUSIONS = ("ctn", "concat", "sum")
RECON_MODES = ("dense", "pooled")
POOLS = ("avg", "max")
HALLUCINATIONS = ("encoder", "unet")
RECON_LOSSES = ("mse", "l1")
RECON_TARGETS = ("input", "inverse")
KD_SOURCES = ("privileged", "teacher")
ALIGNMENTS = ("jmmd", "mmd")
JMMD_ESTIMATORS = ("quadratic", "linear")
PRECISIONS = ("auto", "fp32", "bf16")
NONFINITE_POLICIES = ("error", "skip")
ZERO_STAGES = (0, 1, 2, 3)
IMAGE_ENCODER_PREFIXES = ("timm:", "torchvision:")
LOSS_WEIGHTS = ("w_deploy", "w_teacher", "w_priv", "w_jan", "w_mimic", "w_recon", "w_kd")
SEED_LIMIT = 2**32
"""Seeds must be below this: numpy's legacy and Ray Data's seeding reject larger ones."""


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then ``key.sub=value`` overrides."""
    cfg = Config()
    if path is not None:
        cfg = _merge_file(cfg, Path(path))
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """A new validated Config: ``cfg`` with ``key.sub=value`` overrides applied in order.

    Values are parsed as YAML (``[rgb, depth]``, ``true``, ``1e-3``); a string field takes the
    text as written, so ``tracking.group=2024`` is the string "2024".
    """
    if isinstance(overrides, str):  # a lone string would otherwise be read letter by letter
        overrides = [overrides]
    cfg = copy.deepcopy(cfg)
    for text in overrides:
        key, value = _parse_override(text)
        *sections, name = key.split(".")
        nested: Any = {name: value}
        for section in reversed(sections):
            nested = {section: nested}
        with _source(f"override {_clip(text)}"):
            cfg = _merge(cfg, nested, "")
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict of python scalars and lists (JSON and YAML serialisable)."""
    return dataclasses.asdict(cfg)


def flatten_keys(tree: Mapping[str, Any], sep: str = ".") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (or "a/b" with ``sep="/"``, as metrics are named)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}{sep}{k}": v for k, v in flatten_keys(value, sep).items()})
        else:
            flat[str(key)] = value
    return flat


def saved_config_matches(path: str | os.PathLike[str], cfg: Config) -> bool | None:
    """Whether the config saved at ``path`` (by :func:`save_config`) is exactly ``cfg``;
    None when there is no file. This is how a run folder is recognised as the same run."""
    try:
        saved = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    return saved_text_matches(saved, cfg)


def saved_text_matches(saved: str, cfg: Config) -> bool:
    """Whether saved config text describes ``cfg``: the same text, or a config that reads back
    equal, so a run folder written before a field was added (at its default) still resumes."""
    if saved == dump_yaml(cfg):
        return True
    try:
        data = yaml.safe_load(saved)
        return isinstance(data, dict) and config_from_dict(data) == cfg
    except (yaml.YAMLError, ConfigError):
        return False


def config_from_dict(d: Mapping[str, Any]) -> Config:
    """A validated Config from a (possibly partial) nested dict; missing keys keep defaults."""
    cfg = _merge(Config(), d, "")
    validate(cfg)
    return cfg


def dump_yaml(cfg: Config) -> str:
    """The config as YAML text that :func:`load_config` reads back to an equal Config."""
    # allow_unicode=False: PyYAML writes some characters (e.g. U+0085, a line break to its
    # reader) raw when allowed to, and the text would not load back equal. Escapes always do.
    return yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, allow_unicode=False)


class _Dumper(yaml.SafeDumper):
    """SafeDumper that writes sections as blocks and lists inline: ``ordinary: [rgb]``."""

    def represent_list(self, data: list[Any]) -> yaml.Node:
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)


_Dumper.add_representer(list, _Dumper.represent_list)


def save_config(cfg: Config, path: str | os.PathLike[str]) -> None:
    """Validate ``cfg`` and write it as YAML to ``path`` whole or not at all
    (:func:`osmd_ray.storage.write_bytes`), so a reader (or a crash) never sees half a file."""
    validate(cfg)
    storage.write_bytes(os.fspath(path), dump_yaml(cfg).encode("utf-8"))


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
                    f"{cfg.data.root!r} does not have{_did_you_mean(name, available)}; "
                    f"available modalities: {', '.join(available) or '(none)'}",
                    key,
                )


def _check_rows(cfg: Config, splits: Mapping[str, Any]) -> None:
    workers, root = cfg.scaling.num_workers, cfg.data.root
    rows = {split: sum(shard.rows for shard in shards) for split, shards in splits.items()}
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


# ---------------------------------------------------------------------------------------------
# Validation: types first, then values, then contradictions between keys
# ---------------------------------------------------------------------------------------------


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
    data = cfg.data
    _one_of(cfg.method, METHODS, "method")
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
    if cfg.method != "ordinary_only" and not data.privileged:
        raise ConfigError(
            f"config key 'data.privileged' is empty but method {cfg.method!r} needs at least "
            "one privileged modality; add one (e.g. data.privileged=[depth]) or use "
            "method=ordinary_only",
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
    if cfg.method == "osmd" and not any(getattr(loss, name) for name in LOSS_WEIGHTS):
        raise ConfigError(
            f"config section 'loss': every weight ({', '.join(LOSS_WEIGHTS)}) is zero, so "
            "method osmd would optimise nothing; give at least one a positive value",
            "loss",
        )
    _one_of(loss.alignment, ALIGNMENTS, "loss.alignment")
    _one_of(loss.recon_loss, RECON_LOSSES, "loss.recon_loss")
    _one_of(loss.kd_source, KD_SOURCES, "loss.kd_source")
    _one_of(loss.jmmd_estimator, JMMD_ESTIMATORS, "loss.jmmd_estimator")
    _at_least(loss.num_kernels, 1, "loss.num_kernels")
    _at_least(loss.jmmd_pixels, 2, "loss.jmmd_pixels")
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
    stages = STAGED_METHODS.get(cfg.method, 1)
    if stages > 1 and cfg.train.epochs < stages:
        raise ConfigError(
            f"config key 'train.epochs' is {cfg.train.epochs}, but method {cfg.method!r} trains "
            f"in {stages} stages of at least one epoch each; use train.epochs>={stages}",
            "train.epochs",
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


def _check_scaling(scaling: ScalingConfig) -> None:
    _at_least(scaling.num_workers, 1, "scaling.num_workers")
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
            f" http://127.0.0.1:5000; got {_show(url)}",
            "storage.endpoint_url",
        )


def _one_of(value: Any, choices: Sequence[Any], key: str) -> None:
    if value not in choices:
        hint = _did_you_mean(value, choices) if isinstance(value, str) else ""
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
    for name, tp in _field_types(cls).items():
        key, value = _join(prefix, name), getattr(obj, name)
        if dataclasses.is_dataclass(tp):
            _check_types(value, tp, key)
        elif not _has_type(value, tp):
            raise _type_error(
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


# ---------------------------------------------------------------------------------------------
# Merging layers onto a config, with type conversion
# ---------------------------------------------------------------------------------------------


def _merge(obj: Any, updates: Any, prefix: str) -> Any:
    """A copy of dataclass ``obj`` with the nested mapping ``updates`` applied and type-checked."""
    if updates is None:  # an empty section in YAML (`loss:` with every key commented out)
        return obj
    if not isinstance(updates, Mapping):
        where = f"config section {prefix!r}" if prefix else "the top level of a config"
        raise ConfigError(
            f"{where} must be a mapping of keys to values; got {_show(updates)}", prefix
        )
    types = _field_types(type(obj))
    changes = {}
    for name, value in updates.items():
        key = _join(prefix, str(name))
        if name not in types:
            raise _unknown_key(key)
        tp = types[name]
        if dataclasses.is_dataclass(tp):
            changes[name] = _merge(getattr(obj, name), value, key)
        else:
            changes[name] = _convert(value, tp, key)
    return dataclasses.replace(obj, **changes)


def _convert(value: Any, tp: Any, key: str) -> Any:
    """``value`` as the plain python type ``tp``, or a ConfigError naming ``key``."""
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        number = _as_number(value)
        if isinstance(number, int):
            return number
        if isinstance(number, float) and number.is_integer():
            return int(number)
    elif tp is float:
        number = _as_number(value)
        if number is not None:
            try:
                result = float(number)
            except OverflowError:  # an int too large for a float
                result = math.inf
            if math.isfinite(result):
                return result
    elif tp is str:
        if isinstance(value, str):
            return str(value)
    elif isinstance(value, str):  # list[str]: a lone name stands for a one-element list
        return [str(value)]
    elif isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        return [str(item) for item in value]
    raise _type_error(key, tp, value)


def _as_number(value: Any) -> int | float | None:
    """Ints and floats as they are; numeric strings parsed (YAML 1.1 reads ``1e-3`` as text)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str) and value.strip().isascii():
        for parse in (int, float):
            with contextlib.suppress(ValueError):
                return parse(value.strip())
    return None


_TYPE_NAMES = {
    bool: "true or false",
    int: "an integer",
    float: "a finite number",
    str: "a string",
}


def _type_error(key: str, tp: Any, value: Any, fix: str = "") -> ConfigError:
    expected = _TYPE_NAMES.get(tp, "a list of strings, e.g. [rgb, depth]")
    example = _format_value(_default_of(key))
    if value is None and tp not in _TYPE_NAMES:
        fix += "; write [] for an empty list"
    return ConfigError(
        f"config key {key!r} expects {expected}; got {_show(value)}. "
        f"Example: {key}={example} (the default){fix}",
        key,
    )


def _unknown_key(key: str) -> ConfigError:
    parent, _, leaf = key.rpartition(".")
    # A right name in the wrong section (train.w_jan -> loss.w_jan) beats any near spelling.
    same_leaf = [k for k in _all_keys() if k.rpartition(".")[2] == leaf]
    if same_leaf:
        hint = f" (did you mean {same_leaf[0]!r}?)"
    else:
        # Only keys at least as deep: 'loss.zzz' should not be answered with 'loss'.
        deep_enough = [k for k in _all_keys() if k.count(".") >= key.count(".")]
        hint = _did_you_mean(key, deep_enough)
    if not hint:
        children = [k.rpartition(".")[2] for k in _all_keys() if k.rpartition(".")[0] == parent]
        if children:
            where = f"in section {parent!r}" if parent else "at the top level"
            hint = f"; valid keys {where}: {', '.join(children)}"
        else:
            hint = f"; {parent!r} is not a config section"
    return ConfigError(f"unknown config key {key!r}{hint}", key)


def _did_you_mean(word: str, choices: Sequence[Any]) -> str:
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---------------------------------------------------------------------------------------------
# Reading files and overrides
# ---------------------------------------------------------------------------------------------


def read_text_file(
    path: str | os.PathLike[str],
    what: str,
    example: str,
    error: type[ConfigError] = ConfigError,
) -> str:
    """The UTF-8 text of ``path``; a missing or unreadable file is an ``error`` naming it as
    ``what`` (e.g. "config file") with ``example`` as a file to pass instead."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(
            f"{what} '{path}' does not exist; pass a YAML file such as {example}", ""
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{what} '{path}' cannot be read: {e}", "") from None


def _merge_file(cfg: Config, path: Path) -> Config:
    text = read_text_file(path, "config file", "configs/osmd_synth.yaml")
    try:
        duplicate = _find_duplicate_key(yaml.compose(text, Loader=_SafeLoader), "")
        data = yaml.load(text, Loader=_SafeLoader)
    except (yaml.YAMLError, RecursionError, UnicodeError) as e:
        raise ConfigError(
            f"config file '{path}' is not valid YAML: {_describe_yaml_error(e)}", ""
        ) from None
    if duplicate:
        key, line = duplicate
        raise ConfigError(
            f"config file '{path}' sets {key!r} twice (again on line {line}); keep one", key
        )
    with _source(f"config file '{path}'"):
        return _merge(cfg, data, "")


def _parse_override(text: str) -> tuple[str, Any]:
    """``key.sub=value`` -> (key, value parsed as YAML, or the raw text for a string field)."""
    if "=" not in text:
        raise ConfigError(
            f"override {text!r} has no '='; write key.sub=value, e.g. train.lr=1e-3",
            text.strip(),
        )
    key, raw = (part.strip() for part in text.split("=", 1))
    tp = _type_of(key)  # unknown keys fail here, before the value is looked at
    try:
        value = yaml.load(raw, Loader=_SafeLoader)
    except (yaml.YAMLError, RecursionError, UnicodeError) as e:
        raise ConfigError(
            f"config key {key!r}: the value {_clip(raw)} in override {_clip(text)} is not "
            f"valid YAML ({_describe_yaml_error(e)}); quote strings that contain YAML syntax",
            key,
        ) from None
    if tp is str and not isinstance(value, str):
        # `tracking.group=2024` means the text "2024" (the shell ate any quotes), and
        # `model.image_encoder=timm:` the text "timm:", which validation then explains.
        value = raw
    return key, value


# libyaml's loader when PyYAML was built with it: the same safe schema, several times faster.
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _find_duplicate_key(node: yaml.Node | None, prefix: str) -> tuple[str, int] | None:
    """(dotted key, line) of the first key set twice in one mapping; safe_load keeps the last."""
    if not isinstance(node, yaml.MappingNode):
        return None
    seen = set()
    for key_node, value_node in node.value:
        key = _join(prefix, str(key_node.value))
        if key in seen:
            return key, key_node.start_mark.line + 1
        seen.add(key)
        found = _find_duplicate_key(value_node, key)
        if found:
            return found
    return None


def _describe_yaml_error(e: BaseException) -> str:
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        mark = e.problem_mark
        return f"{e.problem} (line {mark.line + 1}, column {mark.column + 1})"
    if isinstance(e, RecursionError):
        return "nested too deeply"
    if isinstance(e, UnicodeError):
        return "it contains characters that are not valid text (UTF-8)"
    return " ".join(str(e).split())


@contextlib.contextmanager
def _source(where: str) -> typing.Iterator[None]:
    """Append where a value came from to ConfigErrors raised inside the block."""
    try:
        yield
    except ConfigError as e:
        raise ConfigError(f"{e} [in {where}]", e.key) from None


# ---------------------------------------------------------------------------------------------
# Introspection of the dataclasses
# ---------------------------------------------------------------------------------------------


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type (annotations are strings under ``from __future__``)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


@functools.cache
def _all_keys(cls: type = Config, prefix: str = "") -> tuple[str, ...]:
    """Every dotted key, sections included: method, data, data.root, ..."""
    keys: list[str] = []
    for name, tp in _field_types(cls).items():
        key = _join(prefix, name)
        keys.append(key)
        if dataclasses.is_dataclass(tp):
            keys.extend(_all_keys(tp, key))
    return tuple(keys)


def _type_of(key: str) -> Any:
    """The declared type of a dotted key (a dataclass for a section)."""
    tp: Any = Config
    for depth, name in enumerate(key.split(".")):
        types = _field_types(tp) if dataclasses.is_dataclass(tp) else {}
        if name not in types:
            raise _unknown_key(".".join(key.split(".")[: depth + 1]))
        tp = types[name]
    return tp


def _default_of(key: str) -> Any:
    value: Any = Config()
    for name in key.split("."):
        value = getattr(value, name)
    return value


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _format_value(value: Any) -> str:
    """A value as one would type it in an override."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return f"[{', '.join(value)}]"
    return str(value)


def _show(value: Any) -> str:
    return f"{_clip(value)} ({type(value).__name__})"


def _clip(value: Any, limit: int = 60) -> str:
    """repr of a value, shortened so one pasted blob cannot flood the message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
