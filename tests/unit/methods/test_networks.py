"""The methods' networks: parts, parameter sharing, the deployment network, build_model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from osmd_ray.blocks.encoders import DecoderEncoder
from osmd_ray.blocks.nets import privileged_mask, standardised_inverse
from osmd_ray.config import Config, ModelConfig
from osmd_ray.data.schema import ModalitySpec
from osmd_ray.methods import build_deploy_net, build_model, build_training_net

RGB = ModalitySpec("rgb", "image", (3, 12, 12), "uint8")
DEPTH = ModalitySpec("depth", "image", (1, 12, 12), "float32")
META = ModalitySpec("meta", "vector", (5,), "float32")
CFG = ModelConfig(width=4, depth=2, feature_dim=8)
E_O_SHAPED = {"hallucination_width": 1, "hallucination_depth": 0}
"""An E_h of E_o's width and depth: what sharing stages with E_o needs."""
NUM_CLASSES = 3


def make_batch(specs, rows: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    batch = {}
    for s in specs:
        if s.dtype == "uint8":
            batch[s.name] = torch.randint(0, 256, (rows, *s.shape), generator=gen).to(torch.uint8)
        else:
            batch[s.name] = torch.randn(rows, *s.shape, generator=gen)
    return batch


def make_model(method: str, cfg: ModelConfig = CFG, ordinary=(RGB,), privileged=(DEPTH,)):
    torch.manual_seed(0)
    return build_training_net(method, list(ordinary), list(privileged), NUM_CLASSES, cfg, None)


def param_ids(module) -> set[int]:
    return {id(p) for p in module.parameters()}


EXPECTED_KEYS = {
    "ordinary_only": {"z_o", "deploy_logits"},
    "full_multimodal": {"z_o", "z_p", "teacher_logits", "deploy_logits"},
    "osmd": {
        "z_o",
        "z_p",
        "z_h",
        "teacher_feature",
        "teacher_logits",
        "deploy_feature",
        "deploy_logits",
        "priv_logits",
        "priv_logits_h",
        "recon",
        "recon_target",
    },
    "logit_kd": {"z_o", "z_p", "teacher_logits", "deploy_logits"},
    "imputation": {"z_o", "z_p", "deploy_logits", "imputed", "imputed_target"},
}
EXPECTED_KEYS["two_stage_hallucination"] = EXPECTED_KEYS["osmd"]


@pytest.mark.parametrize("method", sorted(EXPECTED_KEYS))
def test_forward_keys_and_shapes(method):
    model = make_model(method)
    out = model(make_batch([RGB, DEPTH]))
    assert set(out) == EXPECTED_KEYS[method]
    # Dense reconstruction: one depth channel at the resolution of E_h's last map (12x12
    # halved at every stage after the first).
    e_h_stages = CFG.hallucination_depth or CFG.depth
    recon_width = (DEPTH.shape[1] // 2 ** (e_h_stages - 1)) ** 2
    for key, value in out.items():
        fused = key.endswith("_feature")
        width = CFG.feature_dim if key.startswith("z_") or fused else NUM_CLASSES
        width = recon_width if key.startswith("recon") else width
        width = DEPTH.shape[1] * DEPTH.shape[2] if key.startswith("imputed") else width
        assert value.shape == (4, width), key


def test_parts_per_method():
    names = {m: {n for n, _ in make_model(m).named_children()} for m in EXPECTED_KEYS}
    assert names["ordinary_only"] == {"E_o", "H", "dropout"}
    assert names["full_multimodal"] == {"E_o", "E_p", "F", "H", "dropout"}
    assert names["osmd"] == {"E_o", "E_p", "E_h", "F", "H", "H_p", "D_h", "dropout"}
    assert names["two_stage_hallucination"] == names["osmd"]
    assert names["logit_kd"] == {"E_o", "H", "T_o", "E_p", "F_t", "H_t", "dropout"}
    assert names["imputation"] == {"E_o", "E_p", "F", "H", "G", "dropout"}
    separate = make_model("osmd", ModelConfig(width=4, depth=2, feature_dim=8, share_fusion=False))
    assert {n for n, _ in separate.named_children()} == names["osmd"] | {"F_t", "H_t"}


def test_full_multimodal_deploys_the_teacher_path():
    out = make_model("full_multimodal").eval()(make_batch([RGB, DEPTH]))
    assert out["deploy_logits"] is out["teacher_logits"]


def _grad_owners(model, loss) -> set[str]:
    """Top-level parts that receive a non-zero gradient from ``loss``."""
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {
        name.split(".")[0]
        for name, p in model.named_parameters()
        if p.grad is not None and p.grad.abs().sum() > 0
    }


def test_teacher_and_deployment_paths_share_fusion_and_head():
    model = make_model("osmd")
    assert not {"F_t", "H_t"} & set(dict(model.named_children()))
    deploy = model.deploy_module()
    assert deploy.F is model.F and deploy.H is model.H
    batch = make_batch([RGB, DEPTH])
    # The teacher loss alone trains F and H, the very modules the deployment path uses.
    assert {"F", "H", "E_o", "E_p"} <= _grad_owners(model, model(batch)["teacher_logits"].sum())
    assert _grad_owners(model, model(batch)["deploy_logits"].sum()) == {"E_o", "E_h", "F", "H"}


def test_teacher_detach_ordinary_keeps_the_teacher_loss_out_of_the_ordinary_encoder():
    model = make_model("osmd", ModelConfig(width=4, depth=2, feature_dim=8))
    batch = make_batch([RGB, DEPTH])
    assert "E_o" in _grad_owners(model, model(batch)["teacher_logits"].sum())
    model.cfg = ModelConfig(width=4, depth=2, feature_dim=8, teacher_detach_ordinary=True)
    owners = _grad_owners(model, model(batch)["teacher_logits"].sum())
    assert "E_o" not in owners and {"E_p", "F", "H"} <= owners


def test_recon_target_is_the_pooled_normalised_privileged_input_and_trains_only_E_h():
    seq = ModalitySpec("imu", "sequence", (2, 10), "float32")
    cfg = ModelConfig(width=4, depth=2, feature_dim=8, recon_size=3)
    model = make_model("osmd", cfg, privileged=(DEPTH, seq, META))
    batch = make_batch([RGB, DEPTH, seq, META])
    target = model.privileged_target(batch)
    depth = model.E_p.encoders["depth"].normalize(batch["depth"])
    imu = model.E_p.encoders["imu"].normalize(batch["imu"])
    meta = model.E_p.encoders["meta"].normalize(batch["meta"])
    # 12x12 depth -> 3x3 means of 4x4 blocks; 10 imu steps -> 3 adaptive windows; meta as is.
    blocks = depth.reshape(4, 1, 3, 4, 3, 4).mean(dim=(3, 5)).flatten(1)
    torch.testing.assert_close(target[:, :9], blocks)
    windows = [imu[:, :, 0:4], imu[:, :, 3:7], imu[:, :, 6:10]]
    torch.testing.assert_close(
        target[:, 9:15], torch.stack([w.mean(-1) for w in windows], -1).flatten(1)
    )
    torch.testing.assert_close(target[:, 15:], meta)
    out = model(batch)
    assert out["recon"].shape == target.shape and not out["recon_target"].requires_grad
    assert _grad_owners(model, out["recon"].sum()) == {"E_o", "E_h", "D_h"} - {"E_o"}


def test_inverse_recon_target_is_the_standardised_reciprocal_over_rows_that_have_it():
    depth = torch.tensor([[2.0, 4.0], [0.0, 8.0]]).reshape(1, 1, 2, 2).repeat(3, 1, 1, 1)
    depth[1] *= 2.0
    depth[2] = float("nan")  # a row without its privileged input
    mask = torch.tensor([True, True, False])
    got = standardised_inverse(depth, mask)
    # Reciprocals of rows 0 and 1, a missing reading (0) counted as infinitely far (0).
    inv = torch.tensor([0.5, 0.25, 0.0, 0.125, 0.25, 0.125, 0.0, 0.0625])
    want = ((inv - inv.mean()) / inv.std()).reshape(2, 1, 2, 2)
    torch.testing.assert_close(got[:2], want)
    assert torch.isfinite(got).all()
    # Per channel: each channel of a two-channel image has its own mean and std.
    two = torch.cat([depth[:2], 10 * depth[:2]], dim=1)
    torch.testing.assert_close(standardised_inverse(two)[:, 1:], want)


def test_inverse_recon_target_reaches_the_recon_term_and_ignores_rows_without_privileged():
    cfg = ModelConfig(width=4, depth=2, feature_dim=8, recon_target="inverse")
    model = make_model("osmd", cfg)
    batch = make_batch([RGB, DEPTH])
    batch["depth"] = batch["depth"].abs() + 1.0
    batch["has_depth"] = torch.tensor([True, True, False, True])
    batch["depth"][2] = float("nan")
    out = model(batch)
    mask = batch["has_depth"]
    size = out["recon"].shape[1]
    want = standardised_inverse(batch["depth"], mask).flatten(1)
    assert size == want.shape[1]  # a full-resolution D_h: no pooling on the way
    torch.testing.assert_close(out["recon_target"][mask], want[mask])
    assert not out["recon_target"][~mask].any()


def test_logit_kd_teacher_is_separate_from_the_student():
    model = make_model("logit_kd")
    assert not param_ids(model.T_o) & param_ids(model.E_o)
    batch = make_batch([RGB, DEPTH])
    assert _grad_owners(model, model(batch)["teacher_logits"].sum()) == {"T_o", "E_p", "F_t", "H_t"}
    assert _grad_owners(model, model(batch)["deploy_logits"].sum()) == {"E_o", "H"}


def test_imputation_deploys_on_the_reconstruction_and_never_reads_real_privileged_data():
    model = make_model("imputation").eval()
    batch = make_batch([RGB, DEPTH])
    out = model(batch)
    changed = dict(batch, depth=batch["depth"] + 100.0)
    # The real depth only feeds the L1 target, never the prediction.
    torch.testing.assert_close(model(changed)["deploy_logits"], out["deploy_logits"])
    assert not torch.equal(model(changed)["imputed_target"], out["imputed_target"])
    torch.testing.assert_close(
        out["imputed_target"], model.E_p.encoders["depth"].normalize(batch["depth"]).flatten(1)
    )
    assert _grad_owners(model, out["imputed"].sum()) == {"G"}


def test_dense_recon_decodes_depth_from_the_hallucination_feature_map():
    # An E_h of three stages: 12x12 -> a 3x3 last-stage map.
    cfg = ModelConfig(width=4, depth=3, feature_dim=8, hallucination_depth=3)
    model = make_model("osmd", cfg)
    assert model.recon_dense and isinstance(model.D_h, torch.nn.Conv2d)
    batch = make_batch([RGB, DEPTH])
    out = model(batch)
    depth = model.E_p.encoders["depth"].normalize(batch["depth"])
    want = depth.reshape(4, 1, 3, 4, 3, 4).mean(dim=(3, 5)).flatten(1)
    torch.testing.assert_close(out["recon_target"], want)
    assert out["recon"].shape == (4, 9)
    assert _grad_owners(model, out["recon"].sum()) == {"E_h", "D_h"}
    pooled = make_model("osmd", ModelConfig(width=4, depth=3, feature_dim=8, recon_mode="pooled"))
    assert not pooled.recon_dense and pooled(batch)["recon"].shape == (4, 36)


def test_separate_fusion_and_head_when_share_fusion_is_off():
    cfg = ModelConfig(width=4, depth=2, feature_dim=8, share_fusion=False)
    model = make_model("osmd", cfg)
    assert not param_ids(model.F_t) & param_ids(model.F)
    assert not param_ids(model.H_t) & param_ids(model.H)
    batch = make_batch([RGB, DEPTH])
    owners = _grad_owners(model, model(batch)["teacher_logits"].sum())
    assert {"F_t", "H_t"} <= owners and not {"F", "H"} & owners
    assert not {"F_t", "H_t"} & _grad_owners(model, model(batch)["deploy_logits"].sum())


@pytest.mark.parametrize("fusion", ["ctn", "concat", "sum"])
def test_deploy_module_holds_only_deployment_parts(fusion):
    cfg = ModelConfig(width=4, depth=2, feature_dim=8, fusion=fusion)
    model = make_model("osmd", cfg).eval()
    deploy = model.deploy_module()
    keys = list(deploy.state_dict())
    assert not [k for k in keys if k.startswith(("E_p", "H_p", "F_t", "H_t"))]
    assert {k.split(".")[0] for k in keys} <= {"E_o", "E_h", "F", "H"}
    expected = param_ids(model.E_o) | param_ids(model.E_h) | param_ids(model.F) | param_ids(model.H)
    assert param_ids(deploy) == expected
    assert sum(p.numel() for p in deploy.parameters()) == sum(
        p.numel() for p in model.parameters() if id(p) in expected
    )
    # Same tensors, not copies.
    assert all(id(p) in param_ids(model) for p in deploy.parameters())
    batch = make_batch([RGB, DEPTH])
    logits = deploy({"rgb": batch["rgb"]})  # ordinary inputs only
    torch.testing.assert_close(logits, model(batch)["deploy_logits"])
    assert [s.name for s in deploy.input_modalities] == ["rgb"]


def test_deploy_module_of_each_baseline():
    only = make_model("ordinary_only").eval()
    deploy = only.deploy_module()
    assert {k.split(".")[0] for k in deploy.state_dict()} == {"E_o", "H"}
    batch = make_batch([RGB, DEPTH])
    torch.testing.assert_close(deploy({"rgb": batch["rgb"]}), only(batch)["deploy_logits"])

    full = make_model("full_multimodal").eval()
    deploy = full.deploy_module()
    assert {k.split(".")[0] for k in deploy.state_dict()} == {"E_o", "E_p", "F", "H"}
    assert [s.name for s in deploy.input_modalities] == ["rgb", "depth"]
    torch.testing.assert_close(deploy(batch), full(batch)["deploy_logits"])


@pytest.mark.parametrize(
    "method,cfg,ordinary",
    [
        ("osmd", CFG, (RGB,)),
        (
            "osmd",
            ModelConfig(
                width=4, depth=2, feature_dim=8, hallucination_shared_stages=1, **E_O_SHAPED
            ),
            (RGB, META),
        ),
        ("osmd", ModelConfig(width=4, depth=2, feature_dim=8, shared_translator=False), (META,)),
        (
            "osmd",
            ModelConfig(width=4, depth=2, feature_dim=8, hallucination_width=0.5),
            (RGB, META),
        ),
        ("ordinary_only", CFG, (RGB,)),
        ("full_multimodal", CFG, (RGB,)),
        ("two_stage_hallucination", CFG, (RGB,)),
        ("logit_kd", CFG, (RGB,)),
        ("imputation", CFG, (RGB,)),
    ],
)
def test_fresh_deploy_net_loads_the_models_weights_strictly(method, cfg, ordinary):
    model = make_model(method, cfg, ordinary=ordinary).eval()
    with_e_p = method in ("full_multimodal", "imputation")
    privileged = [DEPTH] if with_e_p else []  # the others need no E_p here
    fresh = build_deploy_net(method, list(ordinary), privileged, NUM_CLASSES, cfg, None).eval()
    assert hasattr(fresh, "E_p") == with_e_p
    state = model.deploy_module().state_dict()
    assert list(fresh.state_dict()) == list(state)
    fresh.load_state_dict(state, strict=True)
    batch = make_batch(list(ordinary) + [DEPTH])
    torch.testing.assert_close(fresh(batch), model(batch)["deploy_logits"])


def test_hallucination_shared_stages_share_modules():
    cfg = ModelConfig(width=4, depth=3, feature_dim=8, hallucination_shared_stages=2, **E_O_SHAPED)
    model = make_model("osmd", cfg)
    o, h = model.E_o.encoders["rgb"].body.stages, model.E_h.encoders["rgb"].body.stages
    assert o[0] is h[0] and o[1] is h[1] and o[2] is not h[2]
    fresh = build_deploy_net("osmd", [RGB], [], NUM_CLASSES, cfg, None)
    fo, fh = fresh.E_o.encoders["rgb"].body.stages, fresh.E_h.encoders["rgb"].body.stages
    assert fo[1] is fh[1] and fo[2] is not fh[2]


@pytest.mark.parametrize(
    "e_h_depth,stages,hidden_layers", [(0, [4, 8], 2), (1, [4], 1)], ids=["depth0", "depth1"]
)
def test_hallucination_width_and_depth_shrink_only_E_h_and_its_decoder(
    e_h_depth, stages, hidden_layers
):
    cfg = ModelConfig(
        width=8, depth=2, feature_dim=8, hallucination_width=0.5, hallucination_depth=e_h_depth
    )
    model = make_model("osmd", cfg, ordinary=(RGB, META))
    full = ModelConfig(width=8, depth=2, feature_dim=8, **E_O_SHAPED)
    wide = make_model("osmd", full, (RGB, META))
    o, h = model.E_o.encoders["rgb"].body, model.E_h.encoders["rgb"].body
    assert [s[0].out_channels for s in o.stages] == [8, 16]
    assert [s[0].out_channels for s in h.stages] == stages
    assert model.D_h.in_channels == stages[-1]  # dense reconstruction reads E_h's last map
    mlp = [m for m in model.E_h.encoders["meta"].body if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in mlp] == [4] * hidden_layers + [8]  # the MLP shrinks too
    for part in ("E_o", "E_p", "F", "H"):
        assert sum(p.numel() for p in getattr(model, part).parameters()) == sum(
            p.numel() for p in getattr(wide, part).parameters()
        ), part
    deploy = lambda m: sum(p.numel() for p in m.deploy_module().parameters())  # noqa: E731
    assert deploy(model) < deploy(wide)
    out = model(make_batch([RGB, META, DEPTH]))
    assert out["z_h"].shape == out["z_o"].shape == (4, 8)
    assert out["recon"].shape == out["recon_target"].shape


def test_privileged_rows_missing_are_kept_out_of_the_privileged_encoder():
    model = make_model("osmd")
    batch = make_batch([RGB, DEPTH], rows=5)
    batch["has_depth"] = torch.tensor([True, False, True, False, True])
    depth = batch["depth"].requires_grad_()
    out = model(batch)
    torch.testing.assert_close(out["has_privileged"], batch["has_depth"])
    assert (out["z_p"][~batch["has_depth"]] == 0).all()
    out["z_p"].sum().backward()
    assert (depth.grad[~batch["has_depth"]] == 0).all()
    assert depth.grad[batch["has_depth"]].abs().sum() > 0
    # BatchNorm statistics of E_p come from the present rows only.
    reference = make_model("osmd")
    reference({"rgb": batch["rgb"][[0, 2, 4]], "depth": depth.detach()[[0, 2, 4]]})
    for (name, a), (_, b) in zip(
        model.E_p.named_buffers(), reference.E_p.named_buffers(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)


def test_privileged_mask_combines_has_columns():
    batch = {
        "has_a": torch.tensor([1, 1, 0, 1]),
        "has_b": torch.tensor([True, False, True, True]),
    }
    assert privileged_mask(batch, ["a", "b"]).tolist() == [True, False, False, True]
    assert privileged_mask(batch, ["c"]) is None


def test_invalid_roles_are_rejected():
    with pytest.raises(ValueError, match="config key 'method' .* got 'nope'"):
        make_model("nope")
    with pytest.raises(ValueError, match="both ordinary and privileged"):
        make_model("osmd", privileged=(RGB,))
    with pytest.raises(ValueError, match="needs at least one privileged"):
        make_model("osmd", privileged=())
    assert make_model("ordinary_only", privileged=()).privileged == ()


def _manifest():
    stats = {
        "rgb": {"mean": [120.0] * 3, "std": [60.0] * 3},
        "depth": {"mean": [2.0], "std": [1.0]},
        "meta": {"mean": [0.5] * 5, "std": [2.0] * 5},
    }
    return SimpleNamespace(
        modalities={"rgb": RGB, "depth": DEPTH, "meta": META},
        num_classes=NUM_CLASSES,
        normalization=stats,
        task="classification",
        label_shape=(),
    )


def test_build_model_from_config_and_manifest():
    cfg = Config()
    cfg.model = CFG
    cfg.data.ordinary, cfg.data.privileged = ["rgb", "meta"], ["depth"]
    model = build_model(cfg, _manifest())
    assert model.method == "osmd" and model.num_classes == NUM_CLASSES
    assert [s.name for s in model.ordinary] == ["rgb", "meta"]
    assert [s.name for s in model.privileged] == ["depth"]
    assert set(model.normalization) == {"rgb", "meta", "depth"}
    norm = model.E_o.encoders["rgb"].normalize
    torch.testing.assert_close(norm.mean.reshape(-1), torch.full((3,), 120.0))

    cfg.method, cfg.data.privileged = "ordinary_only", ["not_in_dataset"]
    assert not hasattr(build_model(cfg, _manifest()), "E_p")
    cfg.method = "osmd"
    with pytest.raises(ValueError, match="not_in_dataset"):
        build_model(cfg, _manifest())


def test_nan_filled_missing_privileged_rows_do_not_leak_into_any_output():
    model = make_model("osmd")
    batch = make_batch([RGB, DEPTH], rows=4)
    batch["depth"][1] = float("nan")  # how a writer might fill a missing sample
    batch["has_depth"] = torch.tensor([True, False, True, True])
    out = model(batch)
    for key, value in out.items():
        assert torch.isfinite(value.float()).all(), key


def _cast_parameters_only(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """What DeepSpeed 0.19's bf16 engine does without data_types.buffer_dtype: parameters to
    bf16, buffers (Normalize's statistics) left in fp32."""
    for p in module.parameters():
        p.data = p.data.to(dtype)


GROUP = {"width": 4, "depth": 2, "feature_dim": 8, "norm": "group"}  # no running statistics


@pytest.mark.parametrize(
    "method, cfg",
    [
        ("osmd", ModelConfig(**GROUP)),  # dense recon: E_h's feature map path
        ("osmd", ModelConfig(**GROUP, recon_mode="pooled")),
        ("imputation", ModelConfig(**GROUP)),  # the generator normalises its inputs itself
        ("full_multimodal", ModelConfig(**GROUP)),
    ],
)
def test_forward_runs_with_bf16_parameters_and_fp32_buffers(method, cfg):
    model = make_model(method, cfg)
    _cast_parameters_only(model, torch.bfloat16)
    assert {b.dtype for b in model.buffers()} == {torch.float32}  # the case that broke
    out = model(make_batch([RGB, DEPTH]))
    assert out["deploy_logits"].dtype == torch.bfloat16
    assert torch.isfinite(out["deploy_logits"].float()).all()
    deploy = model.deploy_module()
    assert deploy(make_batch([RGB, DEPTH])).dtype == torch.bfloat16


UNET = ModelConfig(width=4, depth=2, feature_dim=8, hallucination="unet")


def test_unet_hallucination_decodes_the_privileged_input_at_full_resolution():
    model = make_model("osmd", UNET)
    assert isinstance(model.E_h, DecoderEncoder) and model.recon_dense
    batch = make_batch([RGB, DEPTH])
    out = model(batch)
    depth = model.E_p.encoders["depth"].normalize(batch["depth"])
    torch.testing.assert_close(out["recon_target"], depth.flatten(1))  # 12x12, not pooled
    assert out["recon"].shape == (4, 144) and out["z_h"].shape == (4, 8)
    assert _grad_owners(model, out["recon"].sum()) == {"E_h", "D_h"}
    assert _grad_owners(model, model(batch)["deploy_logits"].sum()) == {"E_o", "E_h", "F", "H"}
    # E_h is its own network: it shares no parameter with E_p (or E_o).
    assert not param_ids(model.E_h) & (param_ids(model.E_p) | param_ids(model.E_o))


def test_unet_hallucination_deploys_without_privileged_specs():
    model = make_model("osmd", UNET).eval()
    fresh = build_deploy_net("osmd", [RGB], [], NUM_CLASSES, UNET, None).eval()
    assert not hasattr(fresh, "E_p")
    fresh.load_state_dict(model.deploy_module().state_dict(), strict=True)
    batch = make_batch([RGB, DEPTH])
    torch.testing.assert_close(fresh({"rgb": batch["rgb"]}), model(batch)["deploy_logits"])


def test_unet_hallucination_rejects_non_image_ordinary_inputs_and_shared_stages():
    with pytest.raises(ValueError, match="image ordinary"):
        make_model("osmd", UNET, ordinary=(META,))
    shared = ModelConfig(
        width=4, depth=2, feature_dim=8, hallucination="unet", hallucination_shared_stages=1
    )
    with pytest.raises(ValueError, match="shares no stages"):
        make_model("osmd", shared)
