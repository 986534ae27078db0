"""Reliability and safety without Ray (issue 8): bad data and configs are refused before any
training step, writes never leave half a file under a final name, non-finite weights are never
exported or loaded, tampered deployment models and unsafe YAML are refused, and the wandb
mode never goes online against WANDB_MODE. The runs with Ray are in
tests/integration/test_reliability_runs.py; docs/reliability.md lists what each test proves.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from osmd_ray import deploy as deploy_mod
from osmd_ray.cli import main as osmd_main
from osmd_ray.config import Config, load_config, save_config
from osmd_ray.data import checker, schema, writer
from osmd_ray.data.schema import ModalitySpec
from osmd_ray.data.writer import write_dataset
from osmd_ray.deploy import export_deploy, load_deploy
from osmd_ray.errors import ConfigError, DataError, DeployError

# --- a small dataset and ways to damage it ------------------------------------------------------

ROWS = {"train": 16, "val": 4, "test": 5}
ROWS_PER_SHARD = 4  # train: 4 shards, val: 1, test: 2


def make_dataset(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    splits = {
        split: {
            "rgb": rng.integers(0, 256, (n, 3, 4, 4), dtype=np.uint8),
            "imu": rng.normal(size=(n, 2, 6)).astype(np.float32),
            "label": np.arange(n) % 3,
        }
        for split, n in ROWS.items()
    }
    write_dataset(
        str(root),
        splits,
        task="classification",
        num_classes=3,
        rows_per_shard=ROWS_PER_SHARD,
        progress=False,
    )
    return root


@pytest.fixture
def ds(tmp_path) -> Path:
    return make_dataset(tmp_path / "ds")


def edit_manifest(root: Path, edit) -> None:
    path = root / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def rewrite_shard(root: Path, rel: str, change) -> None:
    """Rewrite one shard through ``change`` and record its new size and sha256, so that only
    what ``change`` did to the values or the schema is wrong."""
    table = change(pq.read_table(root / rel))
    pq.write_table(table, root / rel)
    blob = (root / rel).read_bytes()

    def fix(data):
        for shard in data["splits"][rel.split("/")[0]]:
            if shard["path"] == rel:
                shard.update(bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())

    edit_manifest(root, fix)


def set_column(table: pa.Table, name: str, values) -> pa.Table:
    if isinstance(values, np.ndarray) and values.ndim > 1:
        values = pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(values))
    return table.set_column(table.schema.get_field_index(name), name, values)


def tensor(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).combine_chunks().to_numpy_ndarray().copy()


def truncate(root: Path, rel: str) -> None:
    blob = (root / rel).read_bytes()
    (root / rel).write_bytes(blob[: len(blob) // 2])


def flip_a_byte(root: Path, rel: str) -> None:
    blob = bytearray((root / rel).read_bytes())
    blob[len(blob) // 3] ^= 0x01  # same size: only the checksum can tell
    (root / rel).write_bytes(bytes(blob))


def poison(value: float):
    def change(t):
        imu = tensor(t, "imu")
        imu[0, 0, 3] = value
        return set_column(t, "imu", imu)

    return change


def relabel(value: int):
    def change(t):
        label = t.column("label").to_numpy().copy()
        label[0] = value
        return set_column(t, "label", pa.array(label))

    return change


def as_float_rgb(t):
    return set_column(t, "rgb", tensor(t, "rgb").astype(np.float32))


def narrower_rgb(t):
    return set_column(t, "rgb", tensor(t, "rgb")[:, :, :, :3])


def empty_val(root: Path) -> None:
    edit_manifest(root, lambda d: d["splits"].update(val=[]))
    (root / "val" / "part-00000.parquet").unlink()


def no_test_split(root: Path) -> None:
    edit_manifest(root, lambda d: d["splits"].pop("test"))
    for shard in (root / "test").iterdir():
        shard.unlink()


# (damage, what the error must say); each names the file (or manifest) and the problem.
DAMAGES = {
    "truncated parquet": (
        lambda r: truncate(r, "train/part-00001.parquet"),
        ["train/part-00001.parquet: ", "bytes, but manifest.json says", "not readable as Parquet"],
    ),
    "missing shard": (
        lambda r: (r / "train/part-00002.parquet").unlink(),
        ["train/part-00002.parquet: missing (listed in manifest.json)"],
    ),
    "checksum mismatch": (
        lambda r: flip_a_byte(r, "test/part-00000.parquet"),
        ["test/part-00000.parquet: sha256 ", "differs from manifest.json's"],
    ),
    "wrong dtype": (
        lambda r: rewrite_shard(r, "val/part-00000.parquet", as_float_rgb),
        ["val/part-00000.parquet: column 'rgb' holds float values, the manifest says uint8"],
    ),
    "wrong shape": (
        lambda r: rewrite_shard(r, "train/part-00003.parquet", narrower_rgb),
        ["train/part-00003.parquet: column 'rgb' holds tensors of shape (3, 4, 3)"],
    ),
    "nan in a modality": (
        lambda r: rewrite_shard(r, "train/part-00000.parquet", poison(math.nan)),
        ["train/part-00000.parquet: column 'imu': NaN or inf in 1 row(s) (first: row 0)"],
    ),
    "inf in a modality": (
        lambda r: rewrite_shard(r, "test/part-00001.parquet", poison(math.inf)),
        ["test/part-00001.parquet: column 'imu': NaN or inf in 1 row(s)"],
    ),
    "label too large": (
        lambda r: rewrite_shard(r, "train/part-00003.parquet", relabel(3)),
        ["train/part-00003.parquet: label: 1 row(s) with labels outside [0, 3)"],
    ),
    # -100 is cross_entropy's ignore_index: a training step would skip it without a word.
    "negative label": (
        lambda r: rewrite_shard(r, "val/part-00000.parquet", relabel(-100)),
        ["val/part-00000.parquet: label: 1 row(s) with labels outside [0, 3) (first: row 0, -100)"],
    ),
    "empty split": (empty_val, ["manifest.json: split 'val' is empty (no rows)"]),
    "future schema version": (
        lambda r: edit_manifest(r, lambda d: d.update(schema_version=schema.SCHEMA_VERSION + 1)),
        ["manifest.json: schema_version 2 is newer", "upgrade osmd_ray"],
    ),
    "missing split": (no_test_split, ["training needs the splits train, val, test", "no test"]),
}


def train_config(root: Path, *extra: str) -> Config:
    return load_config(
        None,
        [
            f"data.root={root}",
            "data.ordinary=[rgb]",
            "data.privileged=[imu]",
            "data.batch_size=4",
            "data.eval_batch_size=4",
            "scaling.num_workers=2",
            "tracking.wandb=false",
            *extra,
        ],
    )


class RayStarted(Exception):
    """Raised instead of starting Ray: everything before it accepted the run."""


@pytest.fixture
def no_ray(monkeypatch):
    """runner.train up to the point where Ray would start, never further."""
    from osmd_ray import cluster
    from osmd_ray.train import runner

    def refuse(*_args, **_kwargs):
        raise RayStarted

    monkeypatch.setattr(cluster, "ensure_ray", refuse)
    return runner


def test_a_good_dataset_passes_every_check_before_ray_starts(ds, tmp_path, no_ray):
    with pytest.raises(RayStarted):
        no_ray.train(train_config(ds), str(tmp_path / "run"))


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_bad_data_is_refused_by_training_before_any_step(ds, tmp_path, no_ray, damage):
    """Every kind of damage stops `train` at its data check: no Ray, no run folder."""
    apply, fragments = DAMAGES[damage]
    apply(ds)
    out = tmp_path / "run"
    with pytest.raises(DataError) as info:
        no_ray.train(train_config(ds), str(out))
    for fragment in fragments:
        assert fragment in str(info.value)
    assert not out.exists(), "a refused dataset must not create the run folder"


def test_data_check_lists_every_problem_at_once(ds, capsys):
    """`osmd data check` reports seven kinds of damage in one run, each naming its file."""
    several = [
        "truncated parquet",
        "missing shard",
        "checksum mismatch",
        "nan in a modality",
        "label too large",
        "empty split",
    ]
    for name in several:  # each damages its own shard (or the manifest)
        DAMAGES[name][0](ds)
    rewrite_shard(ds, "test/part-00001.parquet", as_float_rgb)  # val is gone: wrong dtype here
    assert osmd_main(["data", "check", str(ds)]) == 1
    report = capsys.readouterr().out
    assert report.splitlines()[0].endswith(f"problem(s) in {ds}:")
    expected = [f for name in several for f in DAMAGES[name][1]]
    expected.append("test/part-00001.parquet: column 'rgb' holds float values")
    for fragment in expected:
        assert fragment in report, f"{fragment!r} missing from:\n{report}"

    # A manifest from a future schema version is refused on its own (nothing else is read).
    edit_manifest(ds, lambda d: d.update(schema_version=schema.SCHEMA_VERSION + 1))
    assert osmd_main(["data", "check", str(ds)]) == 1
    assert "is newer than this osmd_ray understands" in capsys.readouterr().out


# --- configs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lr=-1", "train.lr"),
        ("train.epochs=zero", "train.epochs"),
        ("loss.w_jann=1", "loss.w_jann"),
        ("scaling.num_workers=-1", "scaling.num_workers"),
        ("data.privileged=[rgb]", "data.privileged"),
        ("train.precision=bf16", "train.precision"),
        ("model.dropout=1.5", "model.dropout"),
        ("seed=-3", "seed"),
    ],
)
def test_cli_bad_override_exits_2_naming_the_key_without_a_traceback(
    ds, tmp_path, capsys, override, key
):
    out = tmp_path / "run"
    code = osmd_main(
        ["train", "--config", "configs/osmd_synth.yaml", "--out", str(out), f"data.root={ds}"]
        + [override]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert f"'{key}'" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_batch_larger_than_a_workers_share_is_a_config_error(ds, tmp_path, no_ray):
    # 16 train rows over 2 workers: 8 each; a batch of 9 would never make a step (drop_last).
    with pytest.raises(ConfigError) as info:
        no_ray.train(train_config(ds, "data.batch_size=9"), str(tmp_path / "run"))
    assert info.value.key == "data.batch_size" and "no training step" in str(info.value)


def test_more_workers_than_evaluation_rows_is_a_config_error(ds, tmp_path, no_ray):
    # val has 4 rows: a fifth worker would evaluate nothing and fail inside the worker.
    with pytest.raises(ConfigError) as info:
        no_ray.train(
            train_config(ds, "scaling.num_workers=5", "data.batch_size=1"), str(tmp_path / "r")
        )
    assert info.value.key == "scaling.num_workers" and "'val'" in str(info.value)


MANIFEST = schema.Manifest(
    schema_version=1,
    task="classification",
    num_classes=4,
    ignore_index=-100,
    label_shape=(),
    modalities={
        "rgb": ModalitySpec("rgb", "image", (3, 16, 16), "uint8"),
        "depth": ModalitySpec("depth", "image", (1, 16, 16), "float32"),
        "imu": ModalitySpec("imu", "sequence", (2, 12), "float32"),
    },
    splits={},
    normalization={
        "rgb": {"mean": [120.0, 110.0, 100.0], "std": [60.0, 55.0, 50.0]},
        "depth": {"mean": [3.0], "std": [1.5]},
        "imu": {"mean": [0.0, 0.0], "std": [1.0, 1.0]},
    },
)


def _batch(rows: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "rgb": torch.randint(0, 256, (rows, 3, 16, 16), generator=g, dtype=torch.uint8),
        "depth": torch.rand((rows, 1, 16, 16), generator=g) * 6,
        "imu": torch.randn((rows, 2, 12), generator=g),
        "label": torch.randint(0, 4, (rows,), generator=g),
    }


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from(["osmd", "ordinary_only", "full_multimodal"]),
    privileged=st.sampled_from([["depth"], ["imu"], ["depth", "imu"]]),
    width=st.integers(1, 12),
    depth=st.integers(1, 6),
    feature_dim=st.integers(1, 24),
    fusion=st.sampled_from(["ctn", "concat", "sum"]),
    shared_translator=st.booleans(),
    share_fusion=st.booleans(),
    shared_stages=st.integers(0, 6),
    dropout=st.floats(0.0, 0.99),
    norm=st.sampled_from(["batch", "group"]),
    teacher_detach=st.booleans(),
    recon_mode=st.sampled_from(["dense", "pooled"]),
    recon_size=st.integers(1, 8),
    weights=st.lists(st.sampled_from([0.0, 0.5, 1.0, 10.0]), min_size=6, max_size=6),
    alignment=st.sampled_from(["jmmd", "mmd"]),
    num_kernels=st.integers(1, 8),
    kernel_mul=st.floats(1.01, 8.0),
    rows=st.integers(2, 6),
)
def test_every_valid_config_trains_a_step_or_is_a_config_error(
    method,
    privileged,
    width,
    depth,
    feature_dim,
    fusion,
    shared_translator,
    share_fusion,
    shared_stages,
    dropout,
    norm,
    teacher_detach,
    recon_mode,
    recon_size,
    weights,
    alignment,
    num_kernels,
    kernel_mul,
    rows,
):
    """A config that validation accepts never reaches a traceback from inside torch: the model
    builds for the data's shapes and one forward/backward gives finite losses and gradients."""
    from osmd_ray.methods import build_model, method_losses

    names = ("w_deploy", "w_teacher", "w_priv", "w_jan", "w_mimic", "w_recon")
    overrides = [
        f"method={method}",
        f"data.privileged=[{', '.join(privileged)}]",
        f"model.width={width}",
        f"model.depth={depth}",
        f"model.feature_dim={feature_dim}",
        f"model.fusion={fusion}",
        f"model.shared_translator={str(shared_translator).lower()}",
        f"model.share_fusion={str(share_fusion).lower()}",
        f"model.hallucination_shared_stages={shared_stages}",
        f"model.dropout={dropout}",
        f"model.norm={norm}",
        f"model.teacher_detach_ordinary={str(teacher_detach).lower()}",
        f"model.recon_mode={recon_mode}",
        f"model.recon_size={recon_size}",
        f"loss.alignment={alignment}",
        f"loss.num_kernels={num_kernels}",
        f"loss.kernel_mul={kernel_mul}",
    ] + [f"loss.{n}={w}" for n, w in zip(names, weights, strict=True)]
    try:
        cfg = load_config(None, overrides)
    except ConfigError as e:
        assert e.key and f"'{e.key}'" in str(e)
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only contend on a busy machine
    try:
        torch.manual_seed(0)
        model = build_model(cfg, MANIFEST)
        model.train()
        batch = _batch(rows, seed=rows)
        outputs = model(batch)
        losses = method_losses(outputs, batch["label"], None, cfg.method, cfg.loss)
        assert all(bool(torch.isfinite(v).all()) for v in losses.values()), losses
        losses["total"].backward()
    finally:
        torch.set_num_threads(threads)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)


def test_yaml_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(
        f"seed: !!python/object/apply:os.system ['touch {marker}']\n"
        "train: !!python/object/new:collections.OrderedDict [[[epochs, 1]]]\n"
    )
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    assert not marker.exists()


# --- writes -------------------------------------------------------------------------------------


def disk_full() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_disk_full_inside_a_shard_keeps_the_previous_dataset(ds, tmp_path, monkeypatch):
    before = tree(ds)
    real_write = writer._HashingSink.write
    written = {"bytes": 0}

    def fill_up(self, data):
        written["bytes"] += len(data)
        if written["bytes"] > 3000:  # somewhere inside the second train shard
            raise disk_full()
        return real_write(self, data)

    monkeypatch.setattr(writer._HashingSink, "write", fill_up)
    with pytest.raises(OSError) as info:
        make_dataset_over(ds)
    assert info.value.errno == errno.ENOSPC
    assert tree(ds) == before
    assert sorted(os.listdir(tmp_path)) == ["ds"], "no staging or temporary folder is left"
    assert checker.check_dataset(str(ds)) == []


def test_disk_full_at_the_manifest_keeps_the_previous_dataset(ds, tmp_path, monkeypatch):
    before = tree(ds)
    real_replace = os.replace

    def fail_on_manifest(src, dst, *args, **kwargs):
        if str(dst).endswith("/manifest.json"):
            raise disk_full()
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", fail_on_manifest)
    with pytest.raises(OSError):
        make_dataset_over(ds)
    assert tree(ds) == before
    assert sorted(os.listdir(tmp_path)) == ["ds"]


def make_dataset_over(root: Path) -> None:
    rng = np.random.default_rng(9)
    splits = {
        split: {
            "rgb": rng.integers(0, 256, (n, 3, 4, 4), dtype=np.uint8),
            "imu": rng.normal(size=(n, 2, 6)).astype(np.float32),
            "label": np.arange(n) % 3,
        }
        for split, n in ROWS.items()
    }
    write_dataset(
        str(root),
        splits,
        task="classification",
        num_classes=3,
        rows_per_shard=ROWS_PER_SHARD,
        overwrite=True,
        progress=False,
    )


def test_disk_full_while_saving_a_config_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    save_config(Config(), path)
    before = path.read_bytes()

    def fsync(fd):
        raise disk_full()  # where a full disk shows up for buffered writes

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError):
        save_config(load_config(None, ["seed=7"]), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["config.yaml"]


def test_disk_full_while_writing_metrics_keeps_the_previous_file(tmp_path, monkeypatch):
    from osmd_ray.train import run_folder

    path = tmp_path / "metrics.json"
    run_folder.write_json(str(path), {"epochs": 1})
    before = path.read_bytes()

    def fsync(fd):
        raise disk_full()  # where a full disk shows up for buffered writes

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError):
        run_folder.write_json(str(path), {"epochs": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["metrics.json"], "no temporary file is left behind"


# --- deployment models --------------------------------------------------------------------------

RGB = ModalitySpec("rgb", "image", (3, 8, 8), "uint8")
DEPTH = ModalitySpec("depth", "image", (1, 8, 8), "float32")
STATS = {
    "rgb": {"mean": [120.0, 110.0, 100.0], "std": [60.0, 55.0, 50.0]},
    "depth": {"mean": [3.0], "std": [1.5]},
}


def small_model(seed: int = 0, method: str = "osmd"):
    from osmd_ray.config import ModelConfig
    from osmd_ray.methods import build_training_net

    torch.manual_seed(seed)
    model = build_training_net(
        method, [RGB], [DEPTH], 3, ModelConfig(width=4, depth=2, feature_dim=8), STATS
    )
    return model.eval()


def export(model, out: Path) -> None:
    export_deploy(
        model,
        str(out),
        method=model.method,
        ordinary=[RGB],
        privileged=[DEPTH],
        num_classes=3,
        model_cfg=model.cfg,
        normalization=STATS,
    )


def reseal(out: Path, meta: dict) -> None:
    """Write meta.json with checksums that match the files again, as a careless editor (or an
    attacker) who knows the format could: what remains is what the content checks catch."""
    meta["sha256"]["model.safetensors"] = hashlib.sha256(
        (out / "model.safetensors").read_bytes()
    ).hexdigest()
    meta["sha256"]["meta.json"] = deploy_mod._meta_digest(meta)
    (out / "meta.json").write_text(json.dumps(meta))


def test_non_finite_weights_are_never_exported(tmp_path):
    out = tmp_path / "deploy"
    export(small_model(), out)
    before = tree(out)
    diverged = small_model(seed=1)
    with torch.no_grad():
        next(diverged.parameters()).view(-1)[0] = math.nan
    with pytest.raises(ValueError, match=r"refusing to export non-finite weights: 1 tensor"):
        export(diverged, out)
    assert tree(out) == before
    assert sorted(os.listdir(tmp_path)) == ["deploy"]


def test_non_finite_weights_are_refused_on_load(tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "deploy"
    export(small_model(), out)
    state = load_file(str(out / "model.safetensors"))
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = torch.full_like(state[name], math.inf)
    save_file(state, str(out / "model.safetensors"))
    reseal(out, json.loads((out / "meta.json").read_text()))
    with pytest.raises(DeployError, match=rf"holds NaN or inf in 1 tensor\(s\) \({name}\)"):
        load_deploy(str(out))


def test_disk_full_inside_the_export_keeps_the_previous_one(tmp_path, monkeypatch):
    out = tmp_path / "deploy"
    export(small_model(), out)
    before = tree(out)
    real_save = deploy_mod.save_file

    def half_a_file(state, filename, metadata=None):
        real_save(state, filename, metadata=metadata)
        blob = Path(filename).read_bytes()
        Path(filename).write_bytes(blob[: len(blob) // 2])
        raise disk_full()

    monkeypatch.setattr(deploy_mod, "save_file", half_a_file)
    with pytest.raises(OSError):
        export(small_model(seed=2), out)
    monkeypatch.undo()

    real_write_text = Path.write_text

    def meta_fails(self, text, *args, **kwargs):
        if self.name == "meta.json":
            real_write_text(self, text[:20], *args, **kwargs)
            raise disk_full()
        return real_write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", meta_fails)
    with pytest.raises(OSError):
        export(small_model(seed=3), out)
    monkeypatch.undo()
    assert tree(out) == before
    assert sorted(os.listdir(tmp_path)) == ["deploy"], "no temporary folder is left"
    assert load_deploy(str(out)).meta["method"] == "osmd"


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["normalization"]["rgb"]["mean"].__setitem__(0, 0.0),
        lambda m: m.update(class_names=["x", "y", "z"]),
        lambda m: m["model_config"].update(width=5),
        lambda m: m["sha256"].update({"model.safetensors": "0" * 64}),
    ],
    ids=["normalization", "class_names", "model_config", "weights_checksum"],
)
def test_an_edited_meta_json_is_refused(tmp_path, edit):
    out = tmp_path / "deploy"
    export(small_model(), out)
    meta = json.loads((out / "meta.json").read_text())
    edit(meta)
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    with pytest.raises(DeployError, match=r"meta\.json was modified after export"):
        load_deploy(str(out))


def test_meta_json_may_be_reformatted_but_not_replaced_by_junk(tmp_path):
    out = tmp_path / "deploy"
    export(small_model(), out)
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps(meta, sort_keys=True))  # same content
    assert load_deploy(str(out)).meta == meta
    for junk in ("[]", '"meta"', "{}"):
        (out / "meta.json").write_text(junk)
        with pytest.raises(DeployError):
            load_deploy(str(out))


def test_resealed_but_inconsistent_exports_are_still_refused(tmp_path):
    """Checksums that were recomputed after an edit pass, so the content checks must hold."""
    out = tmp_path / "deploy"
    export(small_model(), out)
    meta = json.loads((out / "meta.json").read_text())
    meta["model_config"]["feature_dim"] = 16
    reseal(out, meta)
    with pytest.raises(DeployError, match="does not fit the network"):
        load_deploy(str(out))

    export(small_model(), out)
    blob = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(b"\xff" * 16 + blob[16:])  # a broken header
    reseal(out, json.loads((out / "meta.json").read_text()))
    with pytest.raises(DeployError, match="not a readable safetensors file"):
        load_deploy(str(out))


def test_disk_full_while_writing_predictions_keeps_the_previous_file(tmp_path, monkeypatch):
    from osmd_ray import predict as predict_mod

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    write_dataset(
        str(data),
        {
            s: {
                "rgb": rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8),
                "depth": rng.random((n, 1, 8, 8), dtype=np.float32),
                "label": np.arange(n) % 3,
            }
            for s, n in (("train", 6), ("test", 4))
        },
        task="classification",
        num_classes=3,
        progress=False,
    )
    model_dir = tmp_path / "deploy"
    export(small_model(), model_dir)
    out = tmp_path / "preds" / "p.parquet"
    predict_mod.predict_split(str(model_dir), str(data), "test", str(out))
    before = out.read_bytes()

    real_write_table = pq.write_table

    def half_then_full(table, where, *args, **kwargs):
        real_write_table(table, where, *args, **kwargs)
        where.truncate(50)  # half a file on disk when the disk fills up
        raise disk_full()

    monkeypatch.setattr(pq, "write_table", half_then_full)
    with pytest.raises(OSError):
        predict_mod.predict_split(str(model_dir), str(data), "test", str(out))
    assert out.read_bytes() == before
    assert os.listdir(out.parent) == ["p.parquet"], "no temporary file is left behind"


# --- non-finite losses and weights in the training loop -----------------------------------------


def test_nonfinite_terms_names_every_bad_term():
    from osmd_ray.train.epoch import nonfinite_terms

    losses = {
        "deploy": torch.tensor(0.5),
        "jan": torch.tensor(math.nan),
        "priv": torch.tensor(-math.inf),
        "total": torch.tensor(math.nan),
    }
    assert nonfinite_terms(losses, torch.device("cpu")) == ["jan", "priv", "total"]
    assert nonfinite_terms({"total": torch.tensor(1.0)}, torch.device("cpu")) == []


def test_non_finite_weights_are_never_checkpointed():
    from osmd_ray.errors import NonFiniteLossError
    from osmd_ray.train.loop import check_finite_weights

    weights = {"E_o.w": torch.ones(3), "step": torch.tensor(4)}
    check_finite_weights(weights, epoch=1, step=8, device=torch.device("cpu"))
    check_finite_weights(None, epoch=1, step=8, device=torch.device("cpu"))  # ranks > 0
    weights["H.bias"] = torch.tensor([0.0, math.nan])
    with pytest.raises(NonFiniteLossError) as info:
        check_finite_weights(weights, epoch=1, step=8, device=torch.device("cpu"))
    message = str(info.value)
    assert "non-finite weights after epoch 2, step 8: H.bias" in message
    assert "not checkpointed (the last checkpoint holds epoch 1)" in message


# --- secrets ------------------------------------------------------------------------------------

SECRET = "osmd-secret-marker-7c1e"


@pytest.mark.parametrize(
    "env, mode",
    [
        ({}, "offline"),
        ({"WANDB_API_KEY": SECRET}, "online"),
        ({"WANDB_API_KEY": SECRET, "WANDB_MODE": "offline"}, "offline"),
        ({"WANDB_MODE": "disabled"}, "disabled"),
    ],
)
def test_wandb_mode_honours_wandb_mode_over_an_api_key(monkeypatch, tmp_path, env, mode):
    from osmd_ray.train.tracking import wandb_settings

    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    found = wandb_settings(Config(), str(tmp_path), "run")
    assert found["mode"] == mode
    assert SECRET not in json.dumps(found)
