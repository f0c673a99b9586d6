"""Fixtures of the store tests (a BaseStore without a mount). Backends for the contract suite:
the same test runs against each `BaseStore`. To add one (the published adapter), write a class
with the `Backend` shape below and add its name to BACKENDS and a branch to the `backend`
fixture. `site`: a fault proxy in front of the session's nginx, for the HTTP store's tests.
nginx_server and moto_server are tests/conftest.py's."""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest

from corfs.base import BaseOptions
from corfs.errors import BaseError, BaseNotFound, UsageError
from tests.hostile import HostileServer
from tests.proxy import FaultProxy
from tests.servers import TEST_BUCKET, Nginx

BACKENDS = ["dir", "http", "s3"]

_serial = itertools.count()


class Backend(Protocol):
    kind: str
    url: str  # the base as given to open_base
    options: BaseOptions
    missing_error: type[BaseError] | tuple[type[Exception], ...]

    def put(self, name: str, data: bytes) -> None:
        """Create or rewrite an image; a rewrite always changes its identity."""

    def put_object(self, key: str, data: bytes) -> None: ...

    def remove(self, name: str) -> None: ...

    def missing_url(self) -> str:
        """A base that does not exist."""

    def single_url(self, name: str) -> str | None:
        """A base naming one image, or None if the store has no such form."""


class FileTreeBackend:
    """Images as files in a directory: the dir store directly, or the same files behind
    nginx. Rewrites are in place (as `dd` over the image would be) and move the mtime by
    whole seconds, because nginx's ETag is mtime-size in seconds."""

    def __init__(self, kind: str, root: Path, url: str) -> None:
        self.kind = kind
        self.root = root
        self.url = url
        self.options = BaseOptions(io_timeout=6.0)
        self.missing_error: tuple[type[Exception], ...] = (
            (UsageError, BaseNotFound) if kind == "dir" else (BaseNotFound,)
        )
        self._mtime = 1_600_000_000
        root.mkdir(parents=True, exist_ok=True)

    def put(self, name: str, data: bytes) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as f:  # keep the inode: an in-place rewrite
            f.truncate(0)
            f.write(data)
        self._mtime += 10
        os.utime(path, (self._mtime, self._mtime))

    def put_object(self, key: str, data: bytes) -> None:
        self.put(key, data)

    def remove(self, name: str) -> None:
        (self.root / name).unlink()

    def missing_url(self) -> str:
        if self.kind == "dir":
            return str(self.root / "no-such-dir")
        return self.url + "no-such-dir/"

    def single_url(self, name: str) -> str | None:
        return None if self.kind == "dir" else self.url + name


class S3Backend:
    kind = "s3"
    missing_error = (BaseNotFound,)

    def __init__(self, moto, prefix: str) -> None:
        self.client = moto.client()
        self.prefix = prefix
        self.url = f"s3://{TEST_BUCKET}/{prefix}"
        self.options = BaseOptions(io_timeout=6.0, endpoint_url=moto.endpoint, region="us-east-1")

    def put(self, name: str, data: bytes) -> None:
        self.client.put_object(Bucket=TEST_BUCKET, Key=self.prefix + name, Body=data)

    def put_object(self, key: str, data: bytes) -> None:
        self.put(key, data)

    def remove(self, name: str) -> None:
        self.client.delete_object(Bucket=TEST_BUCKET, Key=self.prefix + name)

    def missing_url(self) -> str:
        return f"s3://no-such-bucket-corfs/{self.prefix}"

    def single_url(self, name: str) -> str | None:
        return self.url + name


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    sub = f"t{next(_serial)}-{os.getpid()}/"
    if request.param == "dir":
        return FileTreeBackend("dir", tmp_path / "base", str(tmp_path / "base"))
    if request.param == "http":
        nginx = request.getfixturevalue("nginx_server")
        return FileTreeBackend("http", nginx.root / sub, nginx.url + sub)
    if request.param == "s3":
        return S3Backend(request.getfixturevalue("moto_server"), sub)
    raise AssertionError(request.param)


class Site:
    """A fresh directory on the shared nginx holding disk.raw, and a fault proxy before it."""

    def __init__(self, nginx: Nginx, proxy: FaultProxy, sub: str) -> None:
        self.nginx = nginx
        self.proxy = proxy
        self.sub = sub
        self.root = nginx.root / sub
        self.root.mkdir(parents=True)
        self.data = random.Random(sub).randbytes(3 * (1 << 20) + 333)
        (self.root / "disk.raw").write_bytes(self.data)

    @property
    def url(self) -> str:
        """The base through the proxy."""
        return self.proxy.url + self.sub


@pytest.fixture
def site(nginx_server: Nginx) -> Iterator[Site]:
    proxy = FaultProxy(upstream_port=nginx_server.port).start()
    yield Site(nginx_server, proxy, f"r{next(_serial)}-{os.getpid()}/")
    proxy.stop()


@pytest.fixture
def hostile() -> Iterator[list[HostileServer]]:
    """The HostileServers a test starts (tests.hostile.serve), stopped after it."""
    servers: list[HostileServer] = []
    yield servers
    for server in servers:
        server.stop()
