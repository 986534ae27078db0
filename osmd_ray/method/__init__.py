"""The OS-MD method (DESIGN §2): where to find each piece.

- ``jmmd``: multi-kernel MMD and joint MMD, the one copy of that maths;
- ``encoders``: one encoder family per modality kind, and the role encoder;
- ``fusion``: the cross translation network and the concat / sum ablations;
- ``model``: ``OSMDModel`` (osmd and the baselines), ``DeployNet``, ``build_model``;
- ``losses``: ``task_loss`` and ``compute_losses`` (the weighted, masked objective).
"""
