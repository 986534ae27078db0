"""osmd_ray: one-stage modality distillation on Ray Train + DeepSpeed."""

from osmd_ray.version import __version__

__all__ = ["__version__", "load_deploy"]


def load_deploy(path: str):
    """Load an exported deployment model (see :func:`osmd_ray.deploy.load_deploy`).

    Imported lazily so that ``import osmd_ray`` stays cheap and pulls in no torch.
    """
    from osmd_ray.deploy import load_deploy as _load_deploy

    return _load_deploy(path)
