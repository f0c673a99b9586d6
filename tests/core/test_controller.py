"""The status a mount serves (`corfs status --json`), built by Controller from its components'
statistics: every key and value, in order, for images local, dirty, failing, handed over and
behind a failed cache sync (the JSON format is a promise to scripts: it must not drift)."""

from __future__ import annotations

import errno
import json
import os

import pytest

from corfs.config import StreamConfig
from corfs.control import Controller
from corfs.errors import CorfsError
from corfs.store import HandoffRecord
from corfs.stream import StreamWorker
from tests.core.rig import CS, random_bytes, run_with_mock_clock

A = random_bytes(5 * CS + 17, seed=1)
B = random_bytes(2 * CS, seed=2)


def _expected(cache: str) -> str:
    fetched = {"requests": 3, "bytes_fetched": 3 * CS, "retries": 0, "failures": 1,
               "digest_mismatches": 2, "dedup_hits": 0}
    return json.dumps({
        "mounted": True, "mountpoint": "/mnt", "cache": cache, "base": "memory://",
        "bandwidth_bps": 7000,
        "images": [
            {"name": "a", "size": 5 * CS + 17, "chunk_size": CS, "local_bytes": 2 * CS,
             # "error", not "idle": after the failed sync below no image can fill any more
             "dirty_bytes": CS, "fill_ratio": 2 * CS / (5 * CS + 17), "state": "error",
             "rate_bps": 0.0, "eta_s": None,
             "error": "a: chunk 3 failed its digest check twice (expected XXX)",
             "failing_chunks": 1, "fill_errors": 1, "failing_chunk_indexes": [3],
             "detached_to": None,
             "handoff_error": None, "handing_over": False,
             "stream_paused": False},
            {"name": "b", "size": 2 * CS, "chunk_size": CS, "local_bytes": 0, "dirty_bytes": 0,
             "fill_ratio": 0.0, "state": "error", "rate_bps": 0.0, "eta_s": None,
             "error": "SYNC", "failing_chunks": 0, "fill_errors": 0, "failing_chunk_indexes": [],
             "detached_to": None, "handoff_error": None, "handing_over": False,
             "stream_paused": False},
            {"name": "gone", "size": 3 * CS, "chunk_size": 0, "local_bytes": 3 * CS,
             "dirty_bytes": 0, "fill_ratio": 1.0, "state": "detached", "rate_bps": 0.0,
             "eta_s": 0.0, "error": None, "failing_chunks": 0, "fill_errors": 0,
             "failing_chunk_indexes": [],
             "detached_to": "/vm/gone.raw", "handoff_error": None, "handing_over": False,
             "stream_paused": False},
        ],
        "fetcher": fetched,
        # chunk 0 read and stored behind its reader; nothing waits; the default budget
        "write_behind": {"limit_bytes": 256 << 20, "queued_bytes": 0, "stored_chunks": 1,
                         "dropped_chunks": 0, "store_failures": 0},
        "schema_version": 1,
    })


def test_status_json_keys_and_values(rig_factory, monkeypatch) -> None:
    async def main() -> None:
        async with rig_factory({"a": A, "b": B}, published=True) as rig:
            a = rig.image("a")
            rig.source("a").faults.corrupt_at = {3 * CS + 7}
            await a.read(0, 1)
            await a.write(CS, b"x" * CS)
            with pytest.raises(CorfsError):
                await a.read(3 * CS, 1)

            def failing_sync(fd: int) -> None:
                raise OSError(errno.EIO, "I/O error")

            monkeypatch.setattr(os, "fdatasync", failing_sync)
            with pytest.raises(CorfsError):
                await rig.store.commit()
            monkeypatch.undo()
            images = list(rig.images.values())
            stream = StreamWorker(images, StreamConfig(enabled=False, bandwidth=7000))
            controller = Controller(
                images, stream, store=rig.store, base="memory://", mountpoint="/mnt",
                fetcher=rig.fetcher,
                write_behind=rig.image("a").write_behind,
                handed_over_before=[
                    HandoffRecord("gone", 3 * CS, "/vm/gone.raw", "{}", "/mnt/gone", True, 0.0)
                ],
            )
            got = json.dumps(controller.status().to_dict())
            status = json.loads(got)
            expected = _expected(str(rig.cache_dir))
            expected = expected.replace("SYNC", rig.store.sync_failure or "none")
            digest_error = status["images"][0]["error"]
            assert digest_error.startswith("a: chunk 3 failed its digest check twice")
            expected = expected.replace(
                "a: chunk 3 failed its digest check twice (expected XXX)", digest_error
            )
            assert got == expected

    run_with_mock_clock(main)
