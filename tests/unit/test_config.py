"""Config loading, overrides, type checks and validation (osmd_ray/config, DESIGN §7)."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import tempfile
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from osmd_ray.config import (
    Config,
    DataConfig,
    LossConfig,
    apply_overrides,
    check_against_manifest,
    config_from_dict,
    config_to_dict,
    dump_yaml,
    load_config,
    save_config,
    validate,
)
from osmd_ray.config.schema import LOSS_WEIGHTS
from osmd_ray.data.schema import ModalitySpec
from osmd_ray.errors import ConfigError
from osmd_ray.methods import check_config

CONFIGS = Path(__file__).parents[2] / "configs"


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(overrides: list[str], path: Path | None = None) -> ConfigError:
    """The error of a config as a run checks it: its keys, then what its method needs."""
    with pytest.raises(ConfigError) as info:
        check_config(load_config(path, overrides))
    return info.value


def leaf_types() -> dict[str, typing.Any]:
    """Dotted key -> declared type, for every leaf of Config (read from the dataclasses)."""

    def walk(cls: type, prefix: str) -> dict[str, typing.Any]:
        out = {}
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key, tp = f"{prefix}{f.name}", hints[f.name]
            out.update(walk(tp, f"{key}.") if dataclasses.is_dataclass(tp) else {key: tp})
        return out

    return walk(Config, "")


def get(cfg: Config, key: str) -> typing.Any:
    value: typing.Any = cfg
    for name in key.split("."):
        value = getattr(value, name)
    return value


# --- defaults and layering --------------------------------------------------------------------


def test_defaults_without_file_are_the_dataclass_defaults():
    cfg = load_config(None)
    assert cfg == Config()
    assert type(cfg) is Config and type(cfg.data.ordinary) is list


def test_override_wins_over_file_and_later_override_wins(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 4\n  lr: 0.5\nseed: 7\n")
    cfg = load_config(path, ["train.epochs=6", "seed=8", "seed=9"])
    assert (cfg.train.epochs, cfg.train.lr, cfg.seed) == (6, 0.5, 9)
    assert cfg.loss == LossConfig()  # untouched sections keep their defaults


def test_yaml_file_with_bare_exponent_float(tmp_path):
    # YAML 1.1 reads `1e-3` as the string "1e-3"; a float field must still get 0.001.
    cfg = load_config(write(tmp_path, "train:\n  lr: 1e-3\n  epochs: '3'\n"))
    assert cfg.train.lr == 0.001 and type(cfg.train.lr) is float
    assert cfg.train.epochs == 3 and type(cfg.train.epochs) is int


def test_empty_file_and_empty_section_keep_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()
    assert load_config(write(tmp_path, "loss:\n  # w_jan: 2\n")) == Config()


# --- override parsing --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("data.ordinary=[rgb,ir]", "data.ordinary", ["rgb", "ir"]),
        ("data.ordinary=rgb", "data.ordinary", ["rgb"]),
        ("data.privileged=[]", "data.privileged", []),
        ("scaling.use_gpu=true", "scaling.use_gpu", True),
        ("tracking.wandb=false", "tracking.wandb", False),
        ("train.lr=1e-3", "train.lr", 0.001),
        ("train.lr=2", "train.lr", 2.0),
        ("loss.kernel_mul=1.5", "loss.kernel_mul", 1.5),
        ("loss.jmmd_estimator=linear", "loss.jmmd_estimator", "linear"),
        ("seed=3", "seed", 3),
        ("train.epochs=1e1", "train.epochs", 10),
        ("train.epochs=5.0", "train.epochs", 5),
        ("model.fusion=concat", "model.fusion", "concat"),
        ("tracking.group=2024", "tracking.group", "2024"),
        ("tracking.group=true", "tracking.group", "true"),
        ("tracking.group=", "tracking.group", ""),
        ('tracking.group="a b"', "tracking.group", "a b"),
        ("data.root=s3://bucket/x?a=b", "data.root", "s3://bucket/x?a=b"),
        (" seed = 4 ", "seed", 4),
    ],
)
def test_override_values_are_parsed_to_the_field_type(override, key, expected):
    base = ["data.privileged=[]", "method=ordinary_only"] if "privileged=[]" in override else []
    value = get(load_config(None, [*base, override]), key)
    assert value == expected
    assert type(value) is type(expected)


def test_override_of_a_whole_section_merges_into_it():
    cfg = load_config(None, ["loss={w_jan: 0.5, alignment: mmd}"])
    assert (cfg.loss.w_jan, cfg.loss.alignment, cfg.loss.w_teacher) == (0.5, "mmd", 1.0)


def test_override_without_equals_sign():
    err = error_of(["train.lr"])
    assert err.key == "train.lr"
    assert "no '='" in str(err) and "key.sub=value" in str(err)


def test_override_with_malformed_yaml_value():
    err = error_of(["data.ordinary=[rgb,"])
    assert err.key == "data.ordinary"
    assert "not valid YAML" in str(err)


def test_apply_overrides_returns_a_new_config_and_leaves_the_input_alone():
    base = Config()
    new = apply_overrides(base, ["data.ordinary=[rgb, ir]", "train.epochs=2"])
    assert new.data.ordinary == ["rgb", "ir"] and new.train.epochs == 2
    assert base == Config()
    new.data.privileged.append("x")  # no list shared with the input
    assert base.data.privileged == ["depth"]
    with pytest.raises(ConfigError) as info:
        apply_overrides(base, ["train.epochs=0"])
    assert info.value.key == "train.epochs"


# --- unknown keys ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key, suggestion",
    [
        ("methd=osmd", "methd", "method"),
        ("loss.w_jann=1", "loss.w_jann", "loss.w_jan"),
        ("train.w_jan=1", "train.w_jan", "loss.w_jan"),  # right name, wrong section
        ("w_mimic=0.1", "w_mimic", "loss.w_mimic"),
        ("scaling.num_worker=2", "scaling.num_worker", "scaling.num_workers"),
    ],
)
def test_unknown_key_names_it_and_the_closest_valid_key(override, key, suggestion):
    err = error_of([override])
    assert err.key == key
    assert f"unknown config key '{key}' (did you mean '{suggestion}'?)" in str(err)


def test_unknown_key_without_a_close_match_lists_the_section():
    err = error_of(["loss.zzzzzz=1"])
    assert err.key == "loss.zzzzzz"
    assert "valid keys in section 'loss'" in str(err) and "w_jan" in str(err)
    err = error_of(["qqqqq=1"])
    assert "valid keys at the top level" in str(err) and "scaling" in str(err)


def test_unknown_key_in_a_yaml_file_names_the_dotted_key_and_the_file(tmp_path):
    path = write(tmp_path, "loss:\n  w_jann: 1.0\n")
    err = error_of([], path)
    assert err.key == "loss.w_jann"
    assert "did you mean 'loss.w_jan'?" in str(err) and str(path) in str(err)


def test_key_below_a_value_is_unknown():
    err = error_of(["data.ordinary.x=1"])
    assert err.key == "data.ordinary.x" and "not a config section" in str(err)


# --- wrong types -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key, expected_type",
    [
        ("train.epochs=abc", "train.epochs", "an integer"),
        ("train.epochs=2.5", "train.epochs", "an integer"),
        ("seed=true", "seed", "an integer"),
        ("data.ordinary=5", "data.ordinary", "a list of strings"),
        ("data.ordinary=[rgb, 3]", "data.ordinary", "a list of strings"),
        ("data.privileged=", "data.privileged", "a list of strings"),
        ("scaling.use_gpu=maybe", "scaling.use_gpu", "true or false"),
        ("scaling.use_gpu=1", "scaling.use_gpu", "true or false"),
        ("train.lr=fast", "train.lr", "a finite number"),
        ("loss.w_jan=.nan", "loss.w_jan", "a finite number"),
        ("loss.w_jan=inf", "loss.w_jan", "a finite number"),
        ("loss.w_jan=[1]", "loss.w_jan", "a finite number"),
        ("loss=3", "loss", "mapping"),
    ],
)
def test_wrong_type_names_key_and_expected_type(override, key, expected_type):
    err = error_of([override])
    assert err.key == key
    assert expected_type in str(err)
    assert f"'{key}'" in str(err)


def test_wrong_type_message_shows_an_example_fix():
    msg = str(error_of(["train.epochs=abc"]))
    assert "train.epochs=10" in msg and "'abc'" in msg
    assert "write [] for an empty list" in str(error_of(["data.privileged="]))


def test_non_string_in_a_yaml_file_for_a_string_field(tmp_path):
    err = error_of([], write(tmp_path, "tracking:\n  group: 2024\n"))
    assert err.key == "tracking.group" and "a string" in str(err)


def test_validate_checks_types_of_hand_built_configs():
    with pytest.raises(ConfigError) as info:
        validate(Config(seed="3"))  # type: ignore[arg-type]
    assert info.value.key == "seed"
    with pytest.raises(ConfigError) as info:
        validate(Config(data=DataConfig(ordinary="rgb")))  # type: ignore[arg-type]
    assert info.value.key == "data.ordinary"


# --- values and contradictions -----------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, key, fragment",
    [
        (["method=distill"], "method", "osmd, ordinary_only, full_multimodal"),
        (["method=osmdd"], "method", "did you mean 'osmd'?"),
        (["data.privileged=[rgb]"], "data.privileged", "'rgb'"),
        (["data.ordinary=[depth, rgb]"], "data.privileged", "'depth'"),
        (["data.ordinary=[]"], "data.ordinary", "at least one"),
        (["data.privileged=[]"], "data.privileged", "method=ordinary_only"),
        (["method=full_multimodal", "data.privileged=[]"], "data.privileged", "full_multimodal"),
        (["data.ordinary=[rgb, rgb]"], "data.ordinary", "more than once"),
        (["data.privileged=[depth, ir, depth]"], "data.privileged", "more than once"),
        (["model.fusion=attention"], "model.fusion", "ctn, concat, sum"),
        (["loss.alignment=coral"], "loss.alignment", "jmmd, mmd"),
        (["loss.jmmd_estimator=cubic"], "loss.jmmd_estimator", "quadratic, linear"),
        (["model.image_encoder=resnet18"], "model.image_encoder", "timm:<name>"),
        (["model.image_encoder=timm:"], "model.image_encoder", "timm:<name>"),
        (["train.zero_stage=4"], "train.zero_stage", "0, 1, 2, 3"),
        (["train.zero_stage=-1"], "train.zero_stage", "0, 1, 2, 3"),
        (["train.precision=fp16"], "train.precision", "auto, fp32, bf16"),
        (["train.precision=bf16"], "train.precision", "scaling.use_gpu"),
        (["train.nonfinite=ignore"], "train.nonfinite", "error, skip"),
        (["train.epochs=0"], "train.epochs", ">= 1"),
        (["data.batch_size=0"], "data.batch_size", ">= 1"),
        (["data.eval_batch_size=-3"], "data.eval_batch_size", ">= 1"),
        (["train.lr=0"], "train.lr", "> 0"),
        (["train.lr=-1e-3"], "train.lr", "> 0"),
        (["scaling.num_workers=-1"], "scaling.num_workers", ">= 0"),
        (["scaling.cpus_per_worker=0"], "scaling.cpus_per_worker", "> 0"),
        (["model.width=0"], "model.width", ">= 1"),
        (["model.depth=0"], "model.depth", ">= 1"),
        (["model.feature_dim=0"], "model.feature_dim", ">= 1"),
        (["loss.num_kernels=0"], "loss.num_kernels", ">= 1"),
        (["loss.kernel_mul=1"], "loss.kernel_mul", "> 1"),
        (["loss.kernel_mul=0.5"], "loss.kernel_mul", "> 1"),
        (["loss.w_deploy=-1"], "loss.w_deploy", ">= 0"),
        (["loss.w_teacher=-0.1"], "loss.w_teacher", ">= 0"),
        (["loss.w_priv=-1"], "loss.w_priv", ">= 0"),
        (["loss.w_jan=-2"], "loss.w_jan", ">= 0"),
        (["loss.w_mimic=-1e-3"], "loss.w_mimic", ">= 0"),
        (["loss.w_kd=-1"], "loss.w_kd", ">= 0"),
        (["loss.recon_loss=huber"], "loss.recon_loss", "l1"),
        (["loss.kd_source=student"], "loss.kd_source", "privileged"),
        (["model.recon_target=disparity"], "model.recon_target", "inverse"),
        (["model.pool=min"], "model.pool", "max"),
        (["model.hallucination_lr_scale=0"], "model.hallucination_lr_scale", "> 0"),
        (["model.hallucination=decoder"], "model.hallucination", "unet"),
        (["model.hallucination_width=0"], "model.hallucination_width", "> 0"),
        (["model.hallucination_depth=-1"], "model.hallucination_depth", ">= 0"),
        (
            [
                "model.hallucination_width=1",
                "model.hallucination_depth=2",
                "model.hallucination_shared_stages=1",
            ],
            "model.hallucination_depth",
            "hallucination_depth=0",
        ),
        (
            [
                "model.image_encoder=timm:resnet18",
                "model.hallucination_width=1",
                "model.hallucination_depth=2",
            ],
            "model.hallucination_depth",
            "small_cnn",
        ),
        (
            [
                "model.hallucination_width=0.5",
                "model.hallucination_depth=0",
                "model.hallucination_shared_stages=1",
            ],
            "model.hallucination_width",
            "hallucination_shared_stages",
        ),
        (
            ["model.image_encoder=timm:resnet18", "model.hallucination_width=0.5"],
            "model.hallucination_width",
            "small_cnn",
        ),
        (
            ["model.hallucination=unet", "model.hallucination_shared_stages=1"],
            "model.hallucination_shared_stages",
            "model.hallucination=unet",
        ),
        (["model.dropout=1"], "model.dropout", "[0, 1)"),
        (["model.dropout=-0.1"], "model.dropout", "[0, 1)"),
        (
            [f"loss.{w}=0" for w in LOSS_WEIGHTS],
            "loss",
            "every weight",
        ),
        (["model.hallucination_shared_stages=4"], "model.hallucination_shared_stages", "0 and"),
        (["model.hallucination_shared_stages=-1"], "model.hallucination_shared_stages", "0 and"),
        (
            ["model.image_encoder=timm:resnet18", "model.hallucination_shared_stages=1"],
            "model.hallucination_shared_stages",
            "small_cnn",
        ),
        (["seed=-1"], "seed", "seed"),
        (["data.root="], "data.root", "empty"),
        (["tracking.project="], "tracking.project", "tracking.wandb=false"),
    ],
)
def test_bad_values_and_contradictions_name_the_key(overrides, key, fragment):
    err = error_of(overrides)
    assert err.key == key
    assert fragment in str(err)


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.precision=bf16", "scaling.use_gpu=true"],
        ["method=ordinary_only", "data.privileged=[]"],
        ["method=ordinary_only"] + [f"loss.{w}=0" for w in ("w_deploy", "w_jan", "w_priv")],
        [
            "model.hallucination_shared_stages=3",
            "model.hallucination_width=1",
            "model.hallucination_depth=0",
            "model.dropout=0.99",
        ],
        [
            "model.image_encoder=torchvision:resnet18",
            "model.hallucination_width=1",
            "model.hallucination_depth=0",
        ],
        ["loss.kernel_mul=1.01"],
        ["loss.w_deploy=0", "loss.w_teacher=0", "loss.w_priv=0", "loss.w_jan=0", "loss.w_mimic=1"],
        ["tracking.wandb=false", "tracking.project=", "scaling.cpus_per_worker=0.5"],
    ],
)
def test_edge_values_that_are_allowed(overrides):
    check_config(load_config(None, overrides))


# --- files -------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    err = error_of([], path)
    assert err.key == "" and str(path) in str(err) and "does not exist" in str(err)


@pytest.mark.parametrize(
    "text", ["train:\n  lr: [1, 2\n", "a: b: c\n", "x: !!python/name:os.system\n"]
)
def test_malformed_or_unsafe_yaml(tmp_path, text):
    path = write(tmp_path, text)
    err = error_of([], path)
    assert err.key == ""
    assert str(path) in str(err) and "not valid YAML" in str(err)


def test_yaml_top_level_must_be_a_mapping(tmp_path):
    err = error_of([], write(tmp_path, "- method\n- osmd\n"))
    assert err.key == "" and "mapping" in str(err)


def test_duplicate_key_in_yaml_is_an_error_not_last_wins(tmp_path):
    err = error_of([], write(tmp_path, "train:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n"))
    assert err.key == "train.lr" and "twice" in str(err) and "line 4" in str(err)


# --- serialisation -----------------------------------------------------------------------------


def custom_config() -> Config:
    return load_config(
        None,
        [
            "method=full_multimodal",
            "data.ordinary=[rgb, imu]",
            "data.privileged=[depth]",
            "train.lr=3e-4",
            "loss.w_jan=0.25",
            "scaling.use_gpu=true",
            "train.precision=bf16",
            "tracking.group=yes",
            "data.root=s3://bucket/data: set 1",
        ],
    )


def test_save_then_load_gives_an_equal_config(tmp_path):
    cfg = custom_config()
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert os.listdir(path.parent) == ["config.yaml"]  # no temporary file left behind
    save_config(Config(), path)  # overwrites
    assert load_config(path) == Config()


def test_failed_save_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    save_config(Config(), path)
    before = path.read_text()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_config(custom_config(), path)
    assert path.read_text() == before
    assert os.listdir(tmp_path) == ["config.yaml"]


def test_save_refuses_an_invalid_config(tmp_path):
    with pytest.raises(ConfigError) as info:
        save_config(Config(method="nope"), tmp_path / "c.yaml")
    assert info.value.key == "method"
    assert not (tmp_path / "c.yaml").exists()


def test_dict_round_trip_is_plain_and_json_serialisable():
    cfg = custom_config()
    d = config_to_dict(cfg)
    assert json.loads(json.dumps(d)) == d
    assert d["data"]["ordinary"] == ["rgb", "imu"] and d["loss"]["w_jan"] == 0.25
    assert config_from_dict(d) == cfg
    assert config_from_dict({"train": {"epochs": 3}}).train.epochs == 3


def test_config_from_dict_reports_the_same_errors():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"loss": {"w_jann": 1}})
    assert info.value.key == "loss.w_jann" and "loss.w_jan" in str(info.value)
    with pytest.raises(ConfigError) as info:
        config_from_dict({"data": {"privileged": ["rgb"]}})
    assert info.value.key == "data.privileged"


def test_dump_yaml_is_safe_yaml_of_the_dict():
    cfg = custom_config()
    assert yaml.safe_load(dump_yaml(cfg)) == config_to_dict(cfg)
    assert "ordinary: [rgb, imu]" in dump_yaml(cfg)


def test_config_error_survives_pickling():
    err = error_of(["loss.w_jann=1"])
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is ConfigError and copy.key == err.key and str(copy) == str(err)
    assert isinstance(copy, ValueError)


# --- manifest ----------------------------------------------------------------------------------


def manifest(*names: str) -> SimpleNamespace:
    return SimpleNamespace(
        modalities={n: ModalitySpec(n, "image", (3, 8, 8), "uint8") for n in names}
    )


def test_check_against_manifest_accepts_present_modalities():
    check_against_manifest(Config(), manifest("rgb", "depth", "ir"))


@pytest.mark.parametrize(
    "overrides, key, missing",
    [
        (["data.ordinary=[rgb, thermal]"], "data.ordinary", "thermal"),
        (["data.privileged=[lidar]"], "data.privileged", "lidar"),
    ],
)
def test_check_against_manifest_names_missing_modality(overrides, key, missing):
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError) as info:
        check_against_manifest(cfg, manifest("rgb", "depth", "ir"))
    assert info.value.key == key
    assert f"'{missing}'" in str(info.value) and "depth, ir, rgb" in str(info.value)


def test_check_against_manifest_suggests_a_near_name():
    cfg = load_config(None, ["data.privileged=[dpeth]"])
    with pytest.raises(ConfigError, match="did you mean 'depth'"):
        check_against_manifest(cfg, manifest("rgb", "depth"))


# --- shipped configs ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path, tmp_path):
    """Training configs, compare specs and sweep specs alike, each checked by its own loader."""
    from osmd_ray.experiments.compare import load_spec, plan_runs
    from osmd_ray.experiments.sweep import base_config, load_sweep_spec

    top = yaml.safe_load(path.read_text(encoding="utf-8"))
    if "variants" in top:
        assert plan_runs(load_spec(path), str(tmp_path))
    elif "space" in top:
        assert isinstance(base_config(load_sweep_spec(path), str(tmp_path)), Config)
    else:
        assert isinstance(load_config(path), Config)


def test_main_config_spells_out_every_key_and_matches_the_defaults():
    path = CONFIGS / "osmd_synth.yaml"
    assert load_config(path) == Config()

    def keys(d: dict, prefix: str = "") -> set[str]:
        out = set()
        for k, v in d.items():
            out |= keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
        return out

    assert keys(yaml.safe_load(path.read_text())) == set(leaf_types())


# --- properties --------------------------------------------------------------------------------

SCALAR_KEYS = sorted(k for k, tp in leaf_types().items() if tp in (int, float, bool))

junk_text = st.one_of(
    st.text(max_size=12),
    st.integers().map(str),
    st.floats().map(str),
    st.sampled_from(
        ["true", "no", "null", "~", "1e-3", "1_000", "0x1f", ".inf", "[1, 2]", "{a: 1}"]
    ),
)
junk_value = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=12),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def assert_typed_or_named(key: str, build: typing.Callable[[], Config]) -> None:
    try:
        cfg = build()
    except ConfigError as e:
        assert e.key == key, str(e)
        assert f"'{key}'" in str(e)
    else:
        assert type(get(cfg, key)) is leaf_types()[key]


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(SCALAR_KEYS), junk=junk_text)
def test_junk_override_gives_right_type_or_error_naming_the_key(key, junk):
    assert_typed_or_named(key, lambda: load_config(None, [f"{key}={junk}"]))


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(SCALAR_KEYS), junk=junk_value)
def test_junk_dict_value_gives_right_type_or_error_naming_the_key(key, junk):
    *sections, name = key.split(".")
    nested: dict = {name: junk}
    for section in reversed(sections):
        nested = {section: nested}
    assert_typed_or_named(key, lambda: config_from_dict(nested))


names = st.text(min_size=1, max_size=8).filter(lambda s: s.strip() and s != "depth")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    group=st.text(max_size=20),
    root=st.text(min_size=1, max_size=20).filter(str.strip),
    ordinary=st.lists(names, min_size=1, max_size=3, unique=True),
    lr=st.floats(min_value=1e-12, max_value=1e6),
    w_jan=st.floats(min_value=0, max_value=1e6),
)
def test_any_valid_config_survives_save_and_load(group, root, ordinary, lr, w_jan):
    cfg = Config()
    cfg.tracking.group, cfg.data.root, cfg.data.ordinary = group, root, ordinary
    cfg.train.lr, cfg.loss.w_jan = lr, w_jan
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        save_config(cfg, path)
        assert load_config(path) == cfg


def test_a_run_folder_saved_before_a_field_existed_is_still_the_same_run(tmp_path):
    from osmd_ray.config import saved_config_matches

    cfg = load_config(CONFIGS / "osmd_synth.yaml")
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert saved_config_matches(path, cfg) is True
    # As written by a version without loss.jmmd_estimator: the field's default fills it in.
    old = yaml.safe_load(path.read_text())
    del old["loss"]["jmmd_estimator"]
    path.write_text(yaml.safe_dump(old, sort_keys=False))
    assert saved_config_matches(path, cfg) is True
    # A real difference, or text that is no config at all, is another run.
    assert saved_config_matches(path, apply_overrides(cfg, ["loss.jmmd_estimator=linear"])) is False
    path.write_text("loss: [not, a, mapping")
    assert saved_config_matches(path, cfg) is False
    assert saved_config_matches(tmp_path / "missing.yaml", cfg) is None
