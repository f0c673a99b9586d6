"""Review finding: os.getxattr (CPython) asks with a 128-byte buffer first and again with
XATTR_SIZE_MAX on ERANGE, and pyfuse3 runs the getxattr handler for each ask. The first ask
of the last page clears `_paged`, so the second (the one whose answer is read) takes a new
status of the whole mount: the last page is not from the reading's snapshot, and each
reading costs a second full status."""

from __future__ import annotations

import json
from collections.abc import Callable

import trio
import trio.testing

from corfs import control
from corfs.config import StreamConfig
from corfs.control import Controller
from corfs.control_client import STATUS_XATTR
from corfs.stream import StreamWorker
from tests.core.rig import CS, random_bytes


def _getxattr_like_cpython(controller: Controller, name: str) -> dict:
    for size in (128, 64 << 10):  # posixmodule.c: buffer_sizes = {128, XATTR_SIZE_MAX}
        value = controller.status_xattr(name)
        assert value is not None
        if len(value) <= size:  # pyfuse3 answers ERANGE when the value does not fit
            return json.loads(value)
    raise AssertionError("too large")


def _controller(rig) -> Controller:  # noqa: ANN001
    served = list(rig.images.values())
    return Controller(
        served, StreamWorker(served, StreamConfig(enabled=False)), store=rig.store,
        base="memory://", mountpoint="/mnt", fetcher=rig.fetcher,
    )


def _counted_statuses(controller: Controller) -> Callable[[], int]:
    """From now on, how many full statuses `controller` has built."""
    calls = 0
    real = controller.status

    def counted():  # noqa: ANN202
        nonlocal calls
        calls += 1
        return real()

    controller.status = counted  # type: ignore[method-assign]
    return lambda: calls


def test_a_status_reading_takes_one_snapshot(rig_factory, monkeypatch) -> None:
    monkeypatch.setattr(control, "STATUS_PAGE_BYTES", 700)  # about one image a page

    async def main() -> None:
        images = {name: random_bytes(2 * CS, seed=i) for i, name in enumerate("abcd")}
        async with rig_factory(images) as rig:
            controller = _controller(rig)
            calls = _counted_statuses(controller)
            page = _getxattr_like_cpython(controller, STATUS_XATTR)
            pages = 1
            while page["images_next"] is not None:
                page = _getxattr_like_cpython(controller, f"{STATUS_XATTR}.{page['images_next']}")
                pages += 1
            assert pages > 2
            # page 0 is asked twice (two statuses, as before); the pages after it, none
            assert calls() == 2, calls()

    trio.run(main)


def test_a_page_asked_long_after_the_first_is_a_fresh_status(rig_factory, monkeypatch) -> None:
    """Review finding: the snapshot of a reading was kept for good, and a page asked without
    its first (or minutes later) showed images as they were then. After PAGED_FOR, a fresh
    status (trio's clock: autojump makes the wait instant)."""
    monkeypatch.setattr(control, "STATUS_PAGE_BYTES", 700)

    async def main() -> None:
        images = {name: random_bytes(2 * CS, seed=i) for i, name in enumerate("abcd")}
        async with rig_factory(images) as rig:
            controller = _controller(rig)
            first = _getxattr_like_cpython(controller, STATUS_XATTR)
            second = f"{STATUS_XATTR}.{first['images_next']}"
            before = _getxattr_like_cpython(controller, second)["images"][0]
            assert before["local_bytes"] == 0
            read = rig.image(before["name"])
            await read.read(0, CS)
            await read.wait_stored()  # its first chunk is local now
            assert _getxattr_like_cpython(controller, second)["images"][0] == before  # snapshot
            await trio.sleep(control.PAGED_FOR + 1)
            after = _getxattr_like_cpython(controller, second)["images"][0]
            assert after["name"] == before["name"] and after["local_bytes"] == CS

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_other_users_share_one_status_a_second(rig_factory) -> None:
    """Isolation hunt: with --allow-other any user may read the status, and each read built a
    full status on the trio thread (a loop of them kept every VM's I/O waiting). Readers other
    than the mount's owner share one snapshot for SHARED_STATUS_FOR; the owner's stay fresh."""

    async def main() -> None:
        async with rig_factory({"a": random_bytes(2 * CS, seed=1)}) as rig:
            controller = _controller(rig)
            calls = _counted_statuses(controller)

            def local_bytes(owner: bool) -> int:
                value = controller.status_xattr(STATUS_XATTR, owner=owner)
                assert value is not None
                return json.loads(value)["images"][0]["local_bytes"]

            assert [local_bytes(owner=False) for _ in range(100)] == [0] * 100
            assert calls() == 1
            image = rig.image("a")
            await image.read(0, CS)
            await image.wait_stored()
            assert local_bytes(owner=True) == CS  # fresh for the owner
            assert local_bytes(owner=False) == 0  # the others' snapshot, under a second old
            await trio.sleep(control.SHARED_STATUS_FOR + 0.1)
            assert local_bytes(owner=False) == CS

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
