"""The building blocks methods are made of; none of them knows a method by name.

- ``encoders``: one encoder family per modality kind, the role encoder, the U-Net E_h;
- ``fusion``: the cross translation network and the concat / sum ablations;
- ``generator``: G, ordinary inputs -> privileged inputs;
- ``jmmd``: multi-kernel MMD and joint MMD, the one copy of that maths;
- ``losses``: ``task_loss`` and ``compute_losses`` (the weighted, masked objective's terms);
- ``metrics``: confusion matrices and segmentation scores;
- ``nets``: ``TrainingNet``, ``DeployNet`` and the helpers their forward paths share;
- ``stages``: ``Stage``, epoch splits, per-part learning rates, BatchNorm recalibration.
"""
