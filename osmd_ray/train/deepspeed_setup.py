"""What each worker sets on DeepSpeed before its engine starts."""

from __future__ import annotations


def skip_cpu_shared_memory_op() -> bool:
    """Keep DeepSpeed on CPU from compiling its shared-memory all-reduce op.

    When DeepSpeed's communication backend starts on the CPU accelerator it JIT-compiles a C++
    op (about two minutes on a machine whose torch extension cache is empty: every fresh
    clone, every CI run). The op serves only ``inference_all_reduce`` (tensor-parallel
    inference); training's collectives go through torch.distributed (gloo) either way.
    DeepSpeed skips the build for an op it believes incompatible, so it is marked so.

    Returns True when the mark was set (CPU accelerator), False otherwise (GPU: untouched).
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return False
    builder = accelerator.create_op_builder("ShareMemCommBuilder")
    if builder is None:
        return False
    deepspeed.ops.__compatible_ops__[builder.NAME] = False
    return True
