"""The run configuration's schema: one small typed dataclass per concern (DESIGN §7).

Every field has a docstring; a Tune search key such as ``loss.w_jan`` maps onto exactly one
field here. The choices a string field accepts are the tuples below the dataclasses. How a
config is read and checked: :mod:`osmd_ray.config.loading` and :mod:`osmd_ray.config.validation`.
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
    in_memory_mb: int = 1024
    """Datasets up to this size (all splits, on disk) are read once into Ray's object store;
    larger ones stream from storage every epoch. 0 always streams."""
    train_rows: int = 0
    """Train on this many rows of the training split (0: all of them): the first rows of one
    fixed random order (seed 0, whatever the run's seed), so a smaller subset is part of every
    larger one (learning curves: ``train_sizes`` of a compare spec). Val and test stay whole.
    A subset is read into memory whatever data.in_memory_mb says."""


@dataclass
class ModelConfig:
    image_encoder: str = "small_cnn"
    """small_cnn, or timm:<name> / torchvision:<name> (never downloads weights)."""
    pretrained: str = ""
    """timm/torchvision image encoders: a safetensors state dict of the backbone (a local path
    or s3://) loaded into every such encoder of E_o, E_p and E_h, the first convolution
    adapted to each modality's channel count (e.g. a 1-channel depth map); "": random init.
    Never downloaded at run time."""
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
    alignment_trains_priv_head: bool = True
    """osmd, loss.alignment=jmmd: whether the prediction side of the JMMD, H_p(z_h), trains
    H_p too; false freezes H_p for that one call (the gradient still reaches E_h), so the
    alignment cannot bend H_p, which is also the kd term's teacher."""
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
    and the far background no longer dominates the squared error (docs/lab_log.md,
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
    (docs/lab_log.md, "What makes OS-MD win")."""
    jan_warmup_epochs: int = 0
    """Epochs over which w_jan ramps up linearly: epoch k (from 1) trains with
    w_jan * min(1, k / jan_warmup_epochs), so the alignment starts weak while the features are
    still random (the usual schedule of domain adaptation). 0: the full weight from the start."""
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
    on the synthetic set, teacher nothing (docs/lab_log.md, "Seventh round")."""
    alignment: str = "jmmd"
    """What the w_jan term computes: jmmd (joint MMD of z_h and H_p(z_h) against z_p and
    H_p(z_p)), mmd (of the features only), or one that keeps each sample's pairing of the
    deployment feature F(z_o, z_h) with the teacher path's F(z_o, z_p) without asking for a
    copy: contrastive (InfoNCE: each row's deployment feature must pick out its own teacher
    feature among the batch's, cosine similarity at contrastive_temperature) or relational
    (Park et al. 2019's distance-wise RKD: the batch's pairwise distances, each side divided
    by its mean, matched in smooth L1). The teacher side is detached with detach_privileged."""
    contrastive_temperature: float = 0.1
    """alignment=contrastive: the softmax temperature of the cosine similarities."""
    prediction_bandwidth: float = 0.0
    """alignment=jmmd: 0 gives the prediction layer the features' num_kernels batch-driven
    kernels; a positive value one Gaussian kernel exp(-||p - q||^2 / prediction_bandwidth)
    instead (JAN's code uses 1.68), so an entry of the joint kernel is at most num_kernels,
    not num_kernels squared."""
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
class EarlyStoppingConfig:
    patience: int = 0
    """Stop after this many epochs in a row without a new best validation metric of the
    deployment path (accuracy, or mIoU for segmentation); 0 trains all train.epochs."""
    min_delta: float = 0.0
    """How much an epoch's validation metric must exceed the best so far to count as a new
    best (and restart the patience)."""


@dataclass
class TrainConfig:
    epochs: int = 10
    """Passes over the training split: the most a run trains (early_stopping may end it
    sooner)."""
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    """When a run stops before train.epochs (off by default)."""
    deploy_epoch: str = "best"
    """Whose weights deploy/ holds and metrics.json's test scores: best (the epoch with the
    highest validation metric of the deployment path, the earliest of equals; Ray Train
    keeps its checkpoint by that score) or last."""
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
    weaker network (docs/lab_log.md)."""


@dataclass
class ScalingConfig:
    num_workers: int = 2
    """Ray Train workers (one DeepSpeed rank each); 0 trains in the calling process, without
    a worker group or DeepSpeed (Ray Train's local mode): for runs too small to pay for one."""
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
    """osmd, ordinary_only, full_multimodal, two_stage_hallucination, logit_kd, imputation or
    labels_only (osmd_ray.methods)."""
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


METHOD_NAMES = (
    "osmd",
    "ordinary_only",
    "full_multimodal",
    "two_stage_hallucination",
    "logit_kd",
    "imputation",
    "labels_only",
)
"""The choices of the ``method`` key. Each is one module of :mod:`osmd_ray.methods`, whose
table lists them in this order (tests/unit/methods checks that the two agree); what a
method needs of a config beyond its keys' own rules is checked there."""


NORMS = ("batch", "group")


SCHEDULES = ("cosine", "constant")


DEPLOY_EPOCHS = ("best", "last")


FUSIONS = ("ctn", "concat", "sum")


RECON_MODES = ("dense", "pooled")


POOLS = ("avg", "max")


HALLUCINATIONS = ("encoder", "unet")


RECON_LOSSES = ("mse", "l1")


RECON_TARGETS = ("input", "inverse")


KD_SOURCES = ("privileged", "teacher")


ALIGNMENTS = ("jmmd", "mmd", "contrastive", "relational")


JMMD_ESTIMATORS = ("quadratic", "linear")


PRECISIONS = ("auto", "fp32", "bf16")


NONFINITE_POLICIES = ("error", "skip")


ZERO_STAGES = (0, 1, 2, 3)


IMAGE_ENCODER_PREFIXES = ("timm:", "torchvision:")


LOSS_WEIGHTS = ("w_deploy", "w_teacher", "w_priv", "w_jan", "w_mimic", "w_recon", "w_kd")


SEED_LIMIT = 2**32


"""Seeds must be below this: numpy's legacy and Ray Data's seeding reject larger ones."""
