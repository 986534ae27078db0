"""Where a path or an ``s3://`` URI becomes a filesystem (DESIGN §5, §6 "Object storage").

Every module that reads or writes a dataset, a run folder or results asks this one for its
filesystem, so a local folder and an object-store prefix behave alike:

- :func:`url_to_fs` gives the fsspec filesystem and the protocol-less path (s3fs for
  ``s3://``), with the endpoint of an S3-compatible store from the config key
  ``storage.endpoint_url`` (see :func:`set_endpoint`) or else ``AWS_ENDPOINT_URL``;
- :func:`pyarrow_fs` gives the pyarrow filesystem Ray Train writes checkpoints through
  (``RunConfig(storage_filesystem=...)``), with the same endpoint;
- :func:`check_bucket` fails within seconds, naming the bucket and what to check, when the
  bucket is missing, the credentials are refused or the endpoint does not answer.

Credentials are never passed, stored or logged here: s3fs (botocore) and pyarrow resolve them
in each process from the environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``) or the instance profile. Ray workers of a local instance inherit the
driver's environment; on a cluster, the nodes' own credentials (instance profile) apply.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any, BinaryIO
from urllib.parse import urlparse

import fsspec
from fsspec.implementations.local import LocalFileSystem

from osmd_ray.errors import StorageError

ENDPOINT_ENV = "AWS_ENDPOINT_URL"
REGION_ENVS = ("AWS_REGION", "AWS_DEFAULT_REGION")
DEFAULT_REGION = "us-east-1"
# Seconds: a dead endpoint must fail a check within seconds, never hang (issue 6, faults).
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0
# botocore attempts per request (standard mode backs off between them).
MAX_ATTEMPTS = 3
# Seconds between checks while waiting for a store to come back (wait_for_bucket).
WAIT_POLL_S = 3.0

_endpoint_override: str | None = None


def set_endpoint(url: str | None) -> None:
    """Use ``url`` as the S3 endpoint in this process (the config key ``storage.endpoint_url``;
    empty or None: ``AWS_ENDPOINT_URL``, else AWS itself)."""
    global _endpoint_override
    _endpoint_override = url or None


def endpoint_url() -> str | None:
    """The S3 endpoint in use: ``storage.endpoint_url``, else ``AWS_ENDPOINT_URL``, else None."""
    return _endpoint_override or os.environ.get(ENDPOINT_ENV) or None


def region() -> str:
    for name in REGION_ENVS:
        if os.environ.get(name):
            return os.environ[name]
    return DEFAULT_REGION


def scheme(path: str) -> str:
    """``s3`` for ``s3://b/k``, ``""`` for a local path (``file://`` counts as local)."""
    if "://" not in path:
        return ""
    proto = path.split("://", 1)[0].lower()
    return "" if proto in ("file", "local") else proto


def is_remote(path: str) -> bool:
    return bool(scheme(path))


def bucket_of(path: str) -> str:
    """The bucket of ``s3://bucket/prefix`` ("" for a local path)."""
    return urlparse(path).netloc if is_remote(path) else ""


def s3_options() -> dict[str, Any]:
    """s3fs keyword arguments: endpoint, region, timeouts and retries (never credentials)."""
    options: dict[str, Any] = {
        "client_kwargs": {"region_name": region()},
        "config_kwargs": {
            "connect_timeout": CONNECT_TIMEOUT_S,
            "read_timeout": READ_TIMEOUT_S,
            "retries": {"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
        },
    }
    if endpoint_url():
        options["endpoint_url"] = endpoint_url()
    return options


def url_to_fs(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of ``path`` and the path without its protocol.

    fsspec caches filesystems by their arguments, so every call with the same endpoint
    shares one s3fs instance (and its connection pool).
    """
    if scheme(path) == "s3":
        import s3fs

        fs = s3fs.S3FileSystem(**s3_options())
        return fs, fs._strip_protocol(path)
    return fsspec.core.url_to_fs(path)


def filesystem(path: str) -> fsspec.AbstractFileSystem:
    return url_to_fs(path)[0]


def join(base: str, *parts: str) -> str:
    """``base/part/...``: posix joins under a URI, os.path joins for a local folder."""
    if is_remote(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


def normalize(path: str) -> str:
    """A run folder's canonical name: the absolute local path, or the URI without a trailing
    slash."""
    return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


def split(path: str) -> tuple[str, str]:
    """(parent, name) of a normalized path or URI."""
    if is_remote(path):
        parent, name = posixpath.split(path.rstrip("/"))
        return parent, name
    return os.path.split(os.path.abspath(path))


def exists(path: str) -> bool:
    fs, p = url_to_fs(path)
    return fs.exists(p)


def read_bytes(path: str) -> bytes | None:
    """The bytes at ``path``, or None when there are none."""
    fs, p = url_to_fs(path)
    try:
        with fs.open(p, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def read_text(path: str) -> str | None:
    """The text at ``path``, or None when there is none."""
    data = read_bytes(path)
    return None if data is None else data.decode("utf-8")


def write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` so that a reader sees the old content or the new, never half of it:
    locally through :func:`atomic_writer`; on S3 one PUT, atomic already (an object appears
    whole or not at all)."""
    if is_remote(path):
        fs, p = url_to_fs(path)
        fs.pipe_file(p, data)
        return
    with atomic_writer(path) as f:
        f.write(data)


def temporary_name(path: str) -> str:
    """The hidden name a file is written under before it moves to ``path``: a dot first and
    ``.tmp-`` in it, so no reader (nor a dataset check) takes it for the finished file."""
    head, tail = posixpath.split(path)
    return posixpath.join(head, f".{tail}.tmp-{uuid.uuid4().hex[:12]}")


@contextlib.contextmanager
def atomic_writer(path: str, fs: fsspec.AbstractFileSystem | None = None) -> Iterator[BinaryIO]:
    """A binary file whose content appears at ``path`` whole when the block ends, or not at all.

    ``path`` is a local path or URI, or, with ``fs``, a path inside that fsspec filesystem.
    Locally the file is written under :func:`temporary_name`, flushed to disk (fsync) and
    renamed over ``path``. Elsewhere it streams to a temporary object that is then moved into
    place (for files too large to hold in memory; :func:`write_bytes` makes one PUT). On any
    exception (a full disk) the previous content stays and the temporary is removed.
    """
    if fs is None:
        fs, path = url_to_fs(path)
    if not isinstance(fs, LocalFileSystem):
        yield from _remote_atomic(fs, path)
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = temporary_name(os.path.abspath(path))
    try:
        with open(tmp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _remote_atomic(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[BinaryIO]:
    tmp = temporary_name(path)
    try:
        with fs.open(tmp, "wb") as f:
            yield f
        fs.mv(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            if fs.exists(tmp):
                fs.rm(tmp)
        raise


def upload_dir(local: str, remote: str, last: tuple[str, ...] = ()) -> None:
    """Copy the files under the local folder ``local`` to ``remote`` (a URI), the names in
    ``last`` after all others: a reader that looks for those first (a manifest, meta.json)
    never finds them before the files they describe."""
    fs, base = url_to_fs(remote)
    files = []
    for folder, _, names in os.walk(local):
        for name in names:
            files.append(os.path.relpath(os.path.join(folder, name), local))
    files.sort(key=lambda rel: (rel in last, rel))
    for rel in files:
        fs.put_file(os.path.join(local, rel), posixpath.join(base, rel.replace(os.sep, "/")))


def download_dir(remote: str, local: str) -> None:
    """Copy every object under the prefix ``remote`` into the local folder ``local``."""
    fs, base = url_to_fs(remote)
    base = base.rstrip("/")
    found = fs.find(base)
    if not found:
        raise FileNotFoundError(f"{remote}: no objects under this prefix")
    for key in found:
        target = os.path.join(local, *posixpath.relpath(key, base).split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fs.get_file(key, target)


@contextlib.contextmanager
def local_copy(path: str, prefix: str = "osmd-") -> Any:
    """A local folder with the content of ``path``: ``path`` itself when local, else a
    temporary download removed on exit."""
    if not is_remote(path):
        yield path
        return
    tmp = tempfile.mkdtemp(prefix=prefix)
    try:
        download_dir(path, tmp)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pyarrow_fs(path: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path in it) for Ray Train's ``storage_filesystem``/``storage_path``.

    None as the filesystem for a local path (Ray's default). For ``s3://`` a native pyarrow
    S3FileSystem with the same endpoint and region as :func:`url_to_fs`, and timeouts so a
    dead endpoint fails instead of hanging; credentials resolve from each process's
    environment or instance profile (pyarrow does not pickle credentials it was not given).
    """
    if not is_remote(path):
        return None, os.path.abspath(path)
    if scheme(path) != "s3":
        raise StorageError(f"{path}: only s3:// URIs and local folders are supported")
    from pyarrow import fs as pafs

    kwargs: dict[str, Any] = {
        "region": region(),
        "connect_timeout": CONNECT_TIMEOUT_S,
        "request_timeout": READ_TIMEOUT_S,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS),
    }
    endpoint = endpoint_url()
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**kwargs), path.split("://", 1)[1].rstrip("/")


def check_bucket(path: str, purpose: str = "") -> None:
    """Fail within seconds unless the bucket of ``path`` exists and the credentials may use
    it; the StorageError names the bucket, the endpoint and what to check. Local paths pass.
    """
    if not is_remote(path):
        return
    if scheme(path) != "s3":
        raise StorageError(f"{path}: only s3:// URIs and local folders are supported")
    import s3fs
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    bucket = bucket_of(path)
    where = f"endpoint {endpoint_url()}" if endpoint_url() else "AWS S3 (no AWS_ENDPOINT_URL)"
    what = f" ({purpose})" if purpose else ""
    # A private instance: one attempt, so a dead endpoint answers in about CONNECT_TIMEOUT_S.
    options = s3_options()
    options["config_kwargs"] = {
        **options["config_kwargs"],
        "retries": {"max_attempts": 1, "mode": "standard"},
    }
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    fs.retries = 1
    # Errors are raised ``from None``: the CLI prints the root cause of a failure, and the
    # root cause here is botocore's "404 Not Found" without the bucket or what to check.
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError:
        raise StorageError(
            f"bucket {bucket!r} of {path}{what} does not exist at {where}; create it, or check "
            f"the bucket name and {ENDPOINT_ENV} / storage.endpoint_url"
        ) from None
    except PermissionError as err:
        raise StorageError(
            f"access to bucket {bucket!r} of {path}{what} at {where} was refused ({err}); check "
            "the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the "
            "instance profile) and the bucket's permissions"
        ) from None
    except NoCredentialsError:
        raise StorageError(
            f"no credentials to reach bucket {bucket!r} of {path}{what}: set AWS_ACCESS_KEY_ID "
            "and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or run with an instance profile"
        ) from None
    except (BotoCoreError, ClientError, OSError) as err:
        raise StorageError(
            f"bucket {bucket!r} of {path}{what}: {where} did not answer ({err}); check that the "
            f"store is running and {ENDPOINT_ENV} / storage.endpoint_url points at it"
        ) from None


def wait_for_bucket(path: str, purpose: str = "", timeout_s: float = 300.0) -> None:
    """Return once :func:`check_bucket` passes for ``path``; poll every few seconds and raise
    its last StorageError after ``timeout_s`` (a store outage that does not end)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            check_bucket(path, purpose)
            return
        except StorageError:
            if time.monotonic() >= deadline:
                raise
        time.sleep(WAIT_POLL_S)


def worker_env() -> dict[str, str]:
    """The non-secret S3 settings Ray workers need beside the pickled filesystems: the
    endpoint and region (credentials stay where they are: environment or instance profile)."""
    env = {name: os.environ[name] for name in REGION_ENVS if os.environ.get(name)}
    if endpoint_url():
        env[ENDPOINT_ENV] = endpoint_url()  # type: ignore[assignment]
    return env
