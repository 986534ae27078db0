"""osmd_ray.storage without a server: path handling, endpoint precedence, no credentials
in anything that is pickled or written (the S3 round trips are in tests/integration)."""

from __future__ import annotations

import os
import pickle

import pytest

from osmd_ray import storage
from osmd_ray.config import apply_overrides, dump_yaml, load_config
from osmd_ray.errors import ConfigError

SECRET = "do-not-write-me-4711"


@pytest.fixture
def s3_env(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:5999")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    storage.set_endpoint(None)
    yield
    storage.set_endpoint(None)


def test_paths_local_and_remote():
    assert storage.is_remote("s3://b/p") and storage.scheme("S3://b/p") == "s3"
    assert not storage.is_remote("runs/a") and not storage.is_remote("file:///tmp/a")
    assert storage.bucket_of("s3://my-bucket/a/b") == "my-bucket"
    assert storage.join("s3://b/runs/", "a", "config.yaml") == "s3://b/runs/a/config.yaml"
    assert storage.join("runs", "a") == os.path.join("runs", "a")
    assert storage.normalize("s3://b/runs/a/") == "s3://b/runs/a"
    assert storage.normalize("runs/a") == os.path.abspath("runs/a")
    assert storage.split("s3://b/runs/a/") == ("s3://b/runs", "a")
    assert storage.split("runs/a") == (os.path.abspath("runs"), "a")


def test_endpoint_from_config_wins_over_the_environment(s3_env):
    assert storage.endpoint_url() == "http://127.0.0.1:5999"
    storage.set_endpoint("http://10.0.0.1:9000")
    assert storage.endpoint_url() == "http://10.0.0.1:9000"
    assert storage.s3_options()["endpoint_url"] == "http://10.0.0.1:9000"
    storage.set_endpoint("")  # the config default: back to AWS_ENDPOINT_URL
    assert storage.endpoint_url() == "http://127.0.0.1:5999"


def test_no_credentials_in_options_pickles_or_worker_env(s3_env):
    """Credentials stay in the environment: never in the s3fs options, never inside the
    pickled filesystems that travel to Ray workers, never in the env handed to them."""
    options = storage.s3_options()
    assert SECRET not in repr(options) and "AKIDTEST" not in repr(options)
    assert options["client_kwargs"]["region_name"] == "eu-west-1"
    pa_fs, path = storage.pyarrow_fs("s3://bkt/runs")
    assert path == "bkt/runs"
    assert SECRET.encode() not in pickle.dumps(pa_fs)
    assert b"127.0.0.1:5999" in pickle.dumps(pa_fs)  # the endpoint does travel
    fs, key = storage.url_to_fs("s3://bkt/data/manifest.json")
    assert key == "bkt/data/manifest.json"
    assert SECRET.encode() not in pickle.dumps(fs)
    env = storage.worker_env()
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:5999"
    assert SECRET not in env.values() and "AWS_SECRET_ACCESS_KEY" not in env


def test_local_paths_keep_local_behaviour(tmp_path):
    assert storage.pyarrow_fs(str(tmp_path)) == (None, str(tmp_path))
    storage.check_bucket(str(tmp_path))  # nothing to check, no network
    target = tmp_path / "sub" / "metrics.json"
    storage.write_bytes(str(target), b"{}")
    assert target.read_bytes() == b"{}"
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)
    assert os.listdir(target.parent) == ["metrics.json"], "a temporary file was left behind"
    assert storage.read_text(str(target)) == "{}"
    assert storage.read_text(str(tmp_path / "none.json")) is None
    with storage.local_copy(str(tmp_path)) as local:
        assert local == str(tmp_path)


def test_config_key_storage_endpoint_url():
    cfg = load_config(None, ["storage.endpoint_url=http://127.0.0.1:5000"])
    assert cfg.storage.endpoint_url == "http://127.0.0.1:5000"
    assert "endpoint_url: http://127.0.0.1:5000" in dump_yaml(cfg)
    assert load_config(None).storage.endpoint_url == ""
    for bad in ("127.0.0.1:5000", "ftp://host"):
        with pytest.raises(ConfigError, match="http\\(s\\) URL") as info:
            apply_overrides(load_config(None), [f"storage.endpoint_url={bad}"])
        assert info.value.key == "storage.endpoint_url"
    with pytest.raises(ConfigError, match="holds credentials") as info:
        apply_overrides(load_config(None), [f"storage.endpoint_url=http://user:{SECRET}@h:9"])
    assert SECRET not in str(info.value), "the error message repeats the password"
