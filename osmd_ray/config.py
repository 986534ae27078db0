"""Typed run configuration: one small dataclass per concern (DESIGN §7).

Every field has a docstring-style comment; a Tune search key such as ``loss.w_jan`` maps onto
exactly one field here.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
    dropout: float = 0.0
    """Dropout before the heads."""


@dataclass
class LossConfig:
    w_deploy: float = 1.0
    """Weight of task_loss(H(F(z_o, z_h)), y)."""
    w_teacher: float = 1.0
    """Weight of task_loss(H(F(z_o, z_p)), y)."""
    w_priv: float = 1.0
    """Weight of task_loss(H_p(z_p), y)."""
    w_jan: float = 1.0
    """Weight of the distribution alignment between z_h and z_p (JMMD or MMD, see alignment)."""
    w_mimic: float = 0.0
    """Weight of ||z_h - stopgrad(z_p)||^2 (Hoffman et al. 2016)."""
    alignment: str = "jmmd"
    """What the w_jan term computes: jmmd (features and predictions) or mmd (features only)."""
    num_kernels: int = 5
    """Gaussian kernels per layer in (J)MMD."""
    kernel_mul: float = 2.0
    """Ratio between successive kernel bandwidths."""
    detach_privileged: bool = True
    """Stop gradients from the alignment terms into E_p."""


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
    grad_clip: float = 1.0
    """Gradient norm clipping (0 turns it off)."""
    nonfinite: str = "error"
    """On a NaN or inf loss: error (stop, naming step and term) or skip (drop the step)."""


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
class Config:
    method: str = "osmd"
    """osmd, ordinary_only or full_multimodal."""
    seed: int = 0
    """Seed of initialisation, data order and dropout."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


METHODS = ("osmd", "ordinary_only", "full_multimodal")
