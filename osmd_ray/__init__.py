"""osmd_ray: one-stage modality distillation on Ray Train + DeepSpeed."""

__version__ = "0.1.0"
