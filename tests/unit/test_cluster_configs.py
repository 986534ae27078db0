"""cluster/ and jobs/: the launcher config passes Ray's own validation, the KubeRay manifests
carry what the operator needs, the README names only files that exist, every job has --help."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
JOBS = sorted(p for p in (REPO / "jobs").glob("*.py") if not p.name.startswith("_"))


def _ray_version() -> str:
    import ray

    return ray.__version__


# --- cluster/aws.yaml --------------------------------------------------------------------


def _aws() -> dict:
    return yaml.safe_load((CLUSTER / "aws.yaml").read_text())


def _validate_launcher_config(config: dict) -> None:
    """What `ray up` does before it touches the cloud: fill defaults, then check the schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_aws_config_passes_ray_validation():
    _validate_launcher_config(_aws())


def test_aws_validation_rejects_a_misspelt_key():
    # The check above is only worth something if the schema refuses what Ray would refuse.
    import jsonschema

    config = _aws()
    config["available_node_types"]["gpu_worker"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        _validate_launcher_config(config)


def test_aws_config_gpu_workers_autoscale_on_the_pinned_ray_image():
    config = _aws()
    head = config["head_node_type"]
    workers = {k: v for k, v in config["available_node_types"].items() if k != head}
    assert workers, "aws.yaml needs a worker node type besides the head"
    gpu = [v for v in workers.values() if v.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu, "no worker node type declares a GPU"
    for node_type in gpu:
        assert node_type["min_workers"] < node_type["max_workers"] <= config["max_workers"]
    assert config["available_node_types"][head]["resources"].get("GPU", 0) == 0
    image = config["docker"]["image"]
    assert image == f"rayproject/ray:{_ray_version()}-py311-gpu"
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "osmd_ray" in setup
    assert "DS_ACCELERATOR=cuda" in setup
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in command:
            assert "RAY_AUTH_MODE=token" in command


# --- cluster/kuberay/*.yaml --------------------------------------------------------------


def _manifest(name: str) -> dict:
    docs = [d for d in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()) if d]
    assert len(docs) == 1, f"{name}: expected one document, found {len(docs)}"
    return docs[0]


def _check_cluster_spec(spec: dict, where: str) -> None:
    """The fields the KubeRay operator requires, and what osmd_ray needs from them."""
    assert spec["rayVersion"] == _ray_version(), f"{where}: rayVersion"
    assert spec["authOptions"]["mode"] == "token", f"{where}: token authentication"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), f"{where}: headGroupSpec.rayStartParams"
    containers = head["template"]["spec"]["containers"]
    assert containers and containers[0]["image"].startswith(f"rayproject/ray:{_ray_version()}")
    groups = spec["workerGroupSpecs"]
    assert groups, f"{where}: workerGroupSpecs is empty"
    for group in groups:
        name = group["groupName"]
        assert isinstance(group["rayStartParams"], dict), f"{where}: {name}.rayStartParams"
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (container,) = group["template"]["spec"]["containers"]
        assert container["image"] == f"rayproject/ray:{_ray_version()}-py311-gpu"
        resources = container["resources"]
        for kind in ("requests", "limits"):
            assert int(resources[kind]["nvidia.com/gpu"]) >= 1, f"{where}: {name} GPU {kind}"
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env.get("DS_ACCELERATOR") == "cuda", f"{where}: {name} DS_ACCELERATOR"


def test_raycluster_manifest():
    doc = _manifest("raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    assert doc["metadata"]["name"]
    _check_cluster_spec(doc["spec"], "raycluster.yaml")


def test_rayjob_manifest():
    doc = _manifest("rayjob.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    entrypoint = spec["entrypoint"]
    scripts = re.findall(r"python (jobs/\w+\.py)", entrypoint)
    assert scripts, f"entrypoint runs no jobs/*.py script: {entrypoint}"
    for script in scripts:
        assert (REPO / script).is_file(), f"entrypoint names {script}, which does not exist"
    for config in re.findall(r"--config (\S+)", entrypoint):
        assert (REPO / config).is_file(), f"entrypoint names {config}, which does not exist"
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"]
    assert runtime_env["env_vars"]["DS_ACCELERATOR"] == "cuda"
    _check_cluster_spec(spec["rayClusterSpec"], "rayjob.yaml")


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;@]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_rayjob_installs_the_package_dependencies():
    # The RayJob's pods have no `pip install -e .`: its pip list must cover pyproject.toml.
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {_requirement_name(r) for r in project["dependencies"]} - {"ray"}
    runtime_env = yaml.safe_load(_manifest("rayjob.yaml")["spec"]["runtimeEnvYAML"])
    installed = {_requirement_name(r) for r in runtime_env["pip"]}
    assert wanted <= installed, f"rayjob.yaml runtimeEnvYAML.pip lacks {sorted(wanted - installed)}"


# --- cluster/README.md and cluster/local.sh -----------------------------------------------

_PATH = re.compile(r"(?<![\w./-])((?:cluster|jobs|configs|osmd_ray|tests)/[\w./-]*\w)")


def test_readme_names_only_files_that_exist():
    text = (CLUSTER / "README.md").read_text()
    paths = sorted(set(_PATH.findall(text)))
    assert "cluster/local.sh" in paths and "jobs/train.py" in paths
    missing = [p for p in paths if not (REPO / p).exists()]
    assert not missing, f"cluster/README.md names files that do not exist: {missing}"


def test_local_sh_is_valid_bash_and_refuses_unknown_commands():
    script = CLUSTER / "local.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    result = subprocess.run(["bash", str(script), "restart"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "start [N_WORKER_NODES]" in result.stdout
    # It must never stop other people's Ray instances on a shared machine.
    assert "ray stop" not in script.read_text().replace("never calls `ray stop`", "")


# --- jobs/*.py ---------------------------------------------------------------------------


def test_every_job_is_there():
    assert {p.stem for p in JOBS} >= {"make_data", "train", "compare", "predict"}


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.name)
def test_job_help(job: Path, tmp_path: Path):
    # Run from elsewhere with the repository off sys.path, as `ray job submit` would start it.
    result = subprocess.run(
        [sys.executable, str(job), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
    expected = "synth" if job.stem == "make_data" else "--out"  # make_data lists its commands
    assert expected in result.stdout


def test_job_exits_nonzero_on_bad_input(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "train.py"), "--config", "nope.yaml", "--out", "x"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "nope.yaml" in result.stderr
