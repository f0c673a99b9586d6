"""Fixtures shared by the whole suite; the mount helpers themselves live in tests/mounting.py,
the servers in tests/servers.py. One nginx and one moto serve the whole session (each test
works under its own prefix).

There is deliberately no "FUSE available" skip guard: a machine where FUSE is broken must
fail the FUSE tests, not skip them quietly.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.mounting import CorfsDirs, CorfsMount, fuse_mounts_below, lazy_unmount
from tests.servers import FAKE_AWS_ENV, TEST_BUCKET, Moto, Nginx


@pytest.fixture
def tmp_dirs(tmp_path: Path) -> CorfsDirs:
    """Empty base/, cache/, mnt/ (and logs/ for corfs logs) under this test's tmp_path."""
    return CorfsDirs.under(tmp_path)


@pytest.fixture
def corfs_mount() -> Iterator[Callable[..., CorfsMount]]:
    """Start mounts that are always cleaned up at teardown, even if the test forgot:

    m = corfs_mount(tmp_dirs.base, tmp_dirs.cache, tmp_dirs.mnt, "--no-stream")
    """
    mounts: list[CorfsMount] = []

    def start(*args: Any, **kw: Any) -> CorfsMount:
        m = CorfsMount(*args, **kw)
        mounts.append(m)
        m.start()
        return m

    yield start
    for m in reversed(mounts):
        m.cleanup(keep_log=True)


@pytest.fixture(scope="session", autouse=True)
def _unmount_leftovers(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[None]:
    """Safety net: at session end, lazily unmount any FUSE mount left below our tmp dirs.

    Only this session's base temp dir is swept: other pytest sessions on the machine may
    have live mounts under their own.
    """
    yield
    root = tmp_path_factory.getbasetemp()
    leftovers = fuse_mounts_below(root)
    if not leftovers:
        return
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        for mountpoint in leftovers:
            cleared = lazy_unmount(mountpoint)
            print(
                f"\nconftest: left-over FUSE mount at {mountpoint} "
                f"{'unmounted (fusermount3 -u -z)' if cleared else 'could NOT be unmounted'}",
                file=sys.stderr,
            )


@pytest.fixture(scope="session")
def nginx_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    base = tmp_path_factory.mktemp("nginx")
    server = Nginx(root=base / "root", workdir=base / "work").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    """moto with the fake credentials in os.environ (the store under test uses botocore's
    standard chain) and the bucket TEST_BUCKET."""
    saved = {k: os.environ.get(k) for k in FAKE_AWS_ENV}
    os.environ.update(FAKE_AWS_ENV)
    server = Moto(workdir=tmp_path_factory.mktemp("moto")).start()
    server.client().create_bucket(Bucket=TEST_BUCKET)
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def moto_with_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    """moto that checks credentials: the fake ones are unknown to it."""
    server = Moto(tmp_path_factory.mktemp("moto-auth"), {"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    server.start()
    yield server
    server.stop()
