"""A live handoff's commit point has no deadline on a live mount: a commit holding the
store's commit lock longer than FINISH_TIMEOUT (a slow fdatasync) must not make the handoff
report success with its journal row unsettled (only an unmount bounds the wait)."""

from __future__ import annotations

from pathlib import Path

import trio

import corfs.handoff as handoff
from corfs.errors import CorfsError
from corfs.handoff import Via, claim_for_handoff, hand_over
from tests.core.rig import CS, random_bytes, run_with_mock_clock, wait_until


def test_commit_point_not_given_up_on_a_live_mount(rig_factory, tmp_path: Path, monkeypatch):
    data = random_bytes(4 * CS, seed=3)
    monkeypatch.setattr(handoff, "_switch_qemu", lambda *args: 1)  # QEMU "switched"
    dest = str(tmp_path / "vm.raw")
    outcome = {}

    async def main() -> None:
        async with rig_factory({"a": data}) as rig:
            image = await _complete(rig.image("a"))
            store = rig.store

            async def slow_commit() -> None:  # a commit whose fdatasync takes 20 s
                async with store._commit_lock:
                    await trio.sleep(handoff.FINISH_TIMEOUT + 5)

            claim_for_handoff(image)
            orig_link = handoff._link

            def link_then_slow_commit(data_path: str, dest_path: str) -> None:
                orig_link(data_path, dest_path)
                trio.from_thread.run_sync(rig.nursery.start_soon, slow_commit)

            monkeypatch.setattr(handoff, "_link", link_then_slow_commit)
            outcome["switched"] = await hand_over(
                image, store, str(tmp_path / "mnt" / "a"), dest, Via(qmp="/nonexistent"),
                base="memory://",
            )
            outcome["rows"] = store.handoffs()
            outcome["record"] = store.record_of("a")

    run_with_mock_clock(main)
    assert outcome["switched"] == 1  # reported a success ...
    # ... so the commit point must have been reached: the handoff recorded done, the image
    # dropped from the cache.
    assert [h.done for h in outcome["rows"]] == [True], outcome["rows"]
    assert outcome["record"] is None


def test_no_qemu_switch_starts_once_the_mount_is_stopping(rig_factory, tmp_path: Path,
                                                          monkeypatch):
    """A signal came (mount.py sets `stopping` on every image, then waits only for switches
    under way): a handoff that reaches its switch afterwards is undone, never switches QEMU
    (its drain would meet a mount that no longer answers), and no new one is accepted."""
    data = random_bytes(4 * CS, seed=4)

    def no_switch(*args):
        raise AssertionError("QEMU switched while the mount was stopping")

    monkeypatch.setattr(handoff, "_switch_qemu", no_switch)
    dest = tmp_path / "vm.raw"
    outcome = {}

    async def main() -> None:
        async with rig_factory({"a": data}) as rig:
            image = await _complete(rig.image("a"))
            claim_for_handoff(image)
            image.stopping = True  # the signal came during the handoff's first steps
            try:
                await hand_over(image, rig.store, str(tmp_path / "mnt" / "a"), str(dest),
                                Via(qmp="/nonexistent"), base="memory://")
            except CorfsError as exc:
                outcome["error"] = str(exc)
            outcome["rows"] = rig.store.handoffs()
            outcome["claimed"] = image.handing_over
            try:
                claim_for_handoff(image)
            except CorfsError as exc:
                outcome["second"] = str(exc)

    run_with_mock_clock(main)
    assert "being unmounted" in outcome["error"]
    assert not dest.exists() and outcome["rows"] == [] and not outcome["claimed"]
    assert "being unmounted" in outcome["second"]


async def _complete(image):
    """`image` with all its 4 chunks local (a handoff needs a complete image)."""
    await image.fill_each(range(4))
    await wait_until(lambda: image.complete)
    return image
