"""The methods table and what every method promises through its interface."""

from __future__ import annotations

import pytest
import torch

from osmd_ray.config import Config, ModelConfig, apply_overrides
from osmd_ray.config.schema import METHOD_NAMES
from osmd_ray.data.schema import ModalitySpec
from osmd_ray.errors import ConfigError
from osmd_ray.methods import METHODS, build_training_net, check_config, get_method

RGB = ModalitySpec("rgb", "image", (3, 12, 12), "uint8")
DEPTH = ModalitySpec("depth", "image", (1, 12, 12), "float32")
CFG = ModelConfig(width=4, depth=2, feature_dim=8)


def batch(with_depth: bool = True) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = {"rgb": torch.randint(0, 255, (4, 3, 12, 12), generator=gen).to(torch.uint8)}
    if with_depth:
        out["depth"] = torch.rand(4, 1, 12, 12, generator=gen)
    return out


def test_the_table_lists_every_configurable_method_in_order():
    assert tuple(METHODS) == METHOD_NAMES
    assert all(m.name == name for name, m in METHODS.items())


def test_an_unknown_method_is_a_config_error_with_the_closest_name():
    with pytest.raises(ConfigError) as err:
        get_method("labels_onyl")
    assert err.value.key == "method" and "did you mean 'labels_only'?" in str(err.value)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_the_deployment_network_computes_the_training_networks_deploy_logits(name):
    torch.manual_seed(0)
    net = build_training_net(name, [RGB], [DEPTH], 3, CFG, None).eval()
    with torch.no_grad():
        trained = net(batch())["deploy_logits"]
        deployed = net.deploy_module()(batch(with_depth=get_method(name).deploy.reads_privileged))
    torch.testing.assert_close(deployed, trained)
    assert tuple(net.deploy_module().state_dict()) == tuple(
        k for k in net.state_dict() if k.split(".")[0] in get_method(name).deploy.parts
    )


def test_labels_only_is_osmds_deployment_network_and_reads_no_privileged_modality():
    torch.manual_seed(0)
    control = build_training_net("labels_only", [RGB], [DEPTH], 3, CFG, None)
    torch.manual_seed(0)
    osmd = build_training_net("osmd", [RGB], [DEPTH], 3, CFG, None)
    assert control.privileged == ()
    assert [n for n, _ in control.named_children()] == ["E_o", "E_h", "F", "H", "dropout"]
    # Same parts, same initial weights as osmd's deployment network.
    for key, value in osmd.deploy_module().state_dict().items():
        torch.testing.assert_close(control.state_dict()[key], value)
    out = control(batch(with_depth=False))
    assert set(out) == {"z_o", "z_h", "deploy_logits"}
    (stage,) = get_method("labels_only").stages(Config(method="labels_only"))
    assert dict(stage.terms) == {"deploy": 1.0}


def test_labels_only_needs_no_privileged_modality_in_the_config():
    check_config(apply_overrides(Config(), ["method=labels_only", "data.privileged=[]"]))
    with pytest.raises(ConfigError) as err:
        check_config(apply_overrides(Config(), ["method=osmd", "data.privileged=[]"]))
    assert err.value.key == "data.privileged"
