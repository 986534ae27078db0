"""E_h's stages shared with E_o are computed once (issue 9: the deployment cost)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from osmd_ray.blocks.encoders import RoleEncoder, encode_sharing_stages
from osmd_ray.config import ModelConfig
from osmd_ray.data.schema import ModalitySpec
from osmd_ray.methods import build_deploy_net, build_training_net

RGB = ModalitySpec("rgb", "image", (3, 16, 16), "uint8")
DEPTH = ModalitySpec("depth", "image", (1, 16, 16), "float32")
META = ModalitySpec("meta", "vector", (5,), "float32")


def _batch(rows: int = 6) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "rgb": torch.randint(0, 256, (rows, 3, 16, 16), generator=gen).to(torch.uint8),
        "depth": torch.randn(rows, 1, 16, 16, generator=gen),
        "meta": torch.randn(rows, 5, generator=gen),
    }


def _flops(module: torch.nn.Module, batch) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(batch)
    return counter.get_total_flops()


@pytest.mark.parametrize("shared", [1, 2, 3])
def test_encode_sharing_stages_equals_two_separate_passes(shared):
    cfg = ModelConfig(width=4, depth=3, feature_dim=8)
    torch.manual_seed(0)
    e_o = RoleEncoder([RGB, META], cfg, None).eval()
    e_h = RoleEncoder([RGB, META], cfg, None, share_from=e_o, shared_stages=shared).eval()
    batch = _batch()
    z_o, z_h, h_map = encode_sharing_stages(e_o, e_h, batch)
    torch.testing.assert_close(z_o, e_o(batch))
    ref_z_h, ref_map = e_h.forward_with_map(batch)
    torch.testing.assert_close(z_h, ref_z_h)
    torch.testing.assert_close(h_map, ref_map)


def test_shared_stages_get_the_gradients_of_both_paths():
    cfg = ModelConfig(width=4, depth=3, feature_dim=8)
    torch.manual_seed(0)
    e_o = RoleEncoder([RGB], cfg, None)
    e_h = RoleEncoder([RGB], cfg, None, share_from=e_o, shared_stages=2)
    batch = _batch()
    shared_weight = e_o.encoders["rgb"].body.stages[0][0].weight

    z_o, z_h, _ = encode_sharing_stages(e_o, e_h, batch)
    (z_o.sum() + 2 * z_h.sum()).backward()
    once = shared_weight.grad.clone()
    e_o.zero_grad()
    (e_o(batch).sum() + 2 * e_h(batch).sum()).backward()
    # Training mode: BatchNorm uses the batch statistics in both, so the sums agree.
    torch.testing.assert_close(once, shared_weight.grad)


def test_deploy_net_with_shared_stages_costs_less_and_matches_the_model():
    base = dict(width=8, depth=3, feature_dim=16, hallucination_width=1, hallucination_depth=0)
    torch.manual_seed(0)
    batch = _batch()
    flops = {}
    for shared in (0, 2):
        cfg = ModelConfig(**base, hallucination_shared_stages=shared)
        model = build_training_net("osmd", [RGB], [DEPTH], 4, cfg, None).eval()
        deploy = model.deploy_module()
        torch.testing.assert_close(deploy(batch), model(batch)["deploy_logits"])
        fresh = build_deploy_net("osmd", [RGB], [], 4, cfg, None).eval()
        fresh.load_state_dict(deploy.state_dict(), strict=True)
        torch.testing.assert_close(fresh(batch), deploy(batch))
        flops[shared] = _flops(fresh, batch)
    ordinary = build_deploy_net("ordinary_only", [RGB], [], 4, ModelConfig(**base), None).eval()
    # E_h computes only its last stage of its own: the first two run once, for both encoders.
    assert flops[2] < 0.7 * flops[0]
    assert flops[2] < 1.5 * _flops(ordinary, batch)
