from __future__ import annotations

import itertools
import os
import random

import pytest

from tests.remote.proxy import FaultProxy
from tests.servers import TEST_BUCKET, moto_server, nginx_server  # noqa: F401

_serial = itertools.count()


class Site:
    """A fresh directory on the shared nginx holding disk.raw, and a fault proxy before it."""

    def __init__(self, nginx, proxy: FaultProxy, sub: str) -> None:
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
def site(nginx_server):  # noqa: F811
    proxy = FaultProxy(upstream_port=nginx_server.port).start()
    yield Site(nginx_server, proxy, f"r{next(_serial)}-{os.getpid()}/")
    proxy.stop()


__all__ = ["TEST_BUCKET"]
