"""A live handoff's commit point has no deadline on a live mount: a commit holding the
store's commit lock longer than FINISH_TIMEOUT (a slow fdatasync) must not make the handoff
report success with its journal row unsettled (only an unmount bounds the wait)."""

from __future__ import annotations

from pathlib import Path

import trio

import corfs.handoff as handoff
from corfs.handoff import Via, claim_for_handoff, hand_over
from tests.core.rig import CS, random_bytes, run_with_mock_clock, wait_until


def test_commit_point_not_given_up_on_a_live_mount(rig_factory, tmp_path: Path, monkeypatch):
    data = random_bytes(4 * CS, seed=3)
    monkeypatch.setattr(handoff, "_switch_qemu", lambda *args: 1)  # QEMU "switched"
    dest = str(tmp_path / "vm.raw")
    outcome = {}

    async def main() -> None:
        async with rig_factory({"a": data}) as rig:
            image = rig.image("a")
            await image.fill_each(range(4))
            await wait_until(lambda: image.complete)
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
