"""A real S3-protocol server on loopback for the storage tests (DESIGN §8, issue 6).

moto in server mode, in a thread of the test process, on 127.0.0.1 and a free port (as
s3fs's own test suite does): clients talk HTTP to it exactly as to an S3-compatible store,
nothing in the client is mocked.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class S3Server:
    endpoint: str
    server: object

    def create_bucket(self, prefix: str = "osmd") -> str:
        """A new empty bucket; returns ``s3://<name>``."""
        import boto3

        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        boto3.client("s3", endpoint_url=self.endpoint).create_bucket(Bucket=name)
        return f"s3://{name}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server on loopback, with AWS_ENDPOINT_URL and test credentials in the
    environment of this process (and so of a local Ray instance started after it)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield S3Server(endpoint, server)
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    return s3_server.create_bucket()


@pytest.fixture(scope="session")
def ray_s3(s3_server: S3Server, ray_local):
    """The session's local Ray instance, with the S3 settings in its workers' environment.

    Ray workers take the environment of the driver at ``ray.init``; when an earlier test
    started Ray before the S3 server existed, restart it so training workers and Ray Data
    read tasks find the endpoint and credentials (as `osmd train` started after exporting
    them would).
    """
    import ray

    from osmd_ray import cluster

    @ray.remote(num_cpus=0)
    def worker_env() -> tuple[str | None, str | None]:
        return os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("AWS_ACCESS_KEY_ID")

    if ray.get(worker_env.remote()) != (s3_server.endpoint, S3_ENV["AWS_ACCESS_KEY_ID"]):
        ray.shutdown()
        cluster.ensure_ray(worker_cpus=2, use_gpu=False)
    return ray_local


@pytest.fixture
def auth_s3_endpoint() -> Iterator[str]:
    """A second moto server that checks credentials (none of ours are valid there): a store
    that refuses the credentials, for the fault tests. A subprocess, since moto reads this
    setting once per process."""
    port = free_port()
    proc = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1"]
        + ["-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("moto_server with authentication did not start within 30 s")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
