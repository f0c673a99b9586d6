"""Fixtures shared by the whole suite; the mount helpers themselves live in tests/mounting.py.

There is deliberately no "FUSE available" skip guard: a machine where FUSE is broken must
fail the FUSE tests, not skip them quietly.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.mounting import CorfsDirs, CorfsMount, fuse_mounts_below, lazy_unmount


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
