"""Image streaming through real mounts (issue 3): foreground reads first and shared with the
stream, resuming after kill -9 without refetching, zero chunks kept as holes, boot traces
recorded and replayed, and a base that fails mid-stream then comes back."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from tests.fuse.util import (
    KIB,
    MIB,
    direct_read,
    direct_write,
    image_status,
    live_status,
    wait_complete,
    wait_for,
)
from tests.mounting import CorfsDirs, CorfsMount, make_image, run_corfs, sha256_file

NAME = "disk.raw"


def _image(mnt, name: str = NAME) -> dict:
    return image_status(live_status(mnt), name)


def _local_chunks(cache: Path, name: str = NAME) -> dict[int, int]:
    """{chunk index: state} of every chunk CACHE/state.db records as local (committed ~1/s)."""
    db = sqlite3.connect(f"file:{cache / 'state.db'}?mode=ro", uri=True, timeout=10)
    with contextlib.closing(db):
        rows = db.execute(
            "SELECT idx, state FROM chunks WHERE image = ? AND state != 0", (name,)
        ).fetchall()
    return dict(rows)


def _base_bytes(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


# ---- 1. foreground first ---------------------------------------------------------------


def test_far_read_jumps_the_queue_of_a_slow_stream(tmp_dirs: CorfsDirs) -> None:
    base = make_image(tmp_dirs.base / NAME, 32 * MIB, seed=11)
    # The stream needs 16 s for this image; a read near its end must not wait for that.
    with tmp_dirs.mount("--chunk-size", "64K", "--bandwidth", "2M") as m:
        file = m.mnt / NAME
        wait_for(lambda: _image(m.mnt)["local_bytes"] > 0, 10, "the stream to start")
        for offset in (30 * MIB + 5 * KIB, 20 * MIB, 31 * MIB + 64 * KIB):
            started = time.monotonic()
            data = direct_read(file, offset, 64 * KIB)
            took = time.monotonic() - started
            assert data == _base_bytes(base, offset, 64 * KIB)
            assert took < 1.0, f"a foreground read at {offset} took {took:.2f} s"
        image = _image(m.mnt)
        assert image["state"] == "streaming"
        assert image["local_bytes"] < 16 * MIB, "the stream cannot have got there by itself"

        # Finish at full speed: every byte fetched once, however the reads and stream met.
        assert run_corfs("stream", "bandwidth", m.mnt, "0").returncode == 0
        wait_complete(m.mnt, NAME, 30)
        fetched = live_status(m.mnt)["fetcher"]["bytes_fetched"]
        assert fetched == 32 * MIB, f"fetched {fetched} bytes for a {32 * MIB} byte image"
        assert sha256_file(file) == sha256_file(base)


def test_readers_share_the_fills_the_stream_has_in_flight(tmp_dirs: CorfsDirs) -> None:
    size = 64 * MIB
    base = make_image(tmp_dirs.base / NAME, size, seed=12)
    expected = sha256_file(base)
    with tmp_dirs.mount("--chunk-size", "64K", "--stream-paused") as m:
        file = m.mnt / NAME
        errors: list[BaseException] = []

        def read_all(start: int) -> None:
            try:
                block = 256 * KIB
                offsets = [(start + i * block) % size for i in range(size // block)]
                for offset in offsets:
                    assert len(direct_read(file, offset, block)) == block
            except BaseException as exc:  # reported by the test thread
                errors.append(exc)

        readers = [threading.Thread(target=read_all, args=(i * 16 * MIB,)) for i in range(4)]
        assert run_corfs("stream", "resume", m.mnt).returncode == 0
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(60)
        assert not errors, errors
        wait_complete(m.mnt, NAME, 30)
        fetcher = live_status(m.mnt)["fetcher"]
        assert fetcher["bytes_fetched"] == size, fetcher
        assert sha256_file(file) == expected


# ---- 4. resumable ------------------------------------------------------------------------


def test_kill9_mid_stream_resumes_without_refetching(tmp_dirs: CorfsDirs) -> None:
    size = 64 * MIB
    base = make_image(tmp_dirs.base / NAME, size, seed=13)
    with tmp_dirs.mount("--bandwidth", "16M") as m:
        wait_for(lambda: _image(m.mnt)["local_bytes"] >= 24 * MIB, 20, "24 MiB local")
        time.sleep(1.2)  # at least one commit of chunk state since
        m.kill9()
    with tmp_dirs.mount("--bandwidth", "16M", "--stream-paused") as m:
        image = _image(m.mnt)
        at_remount = image["local_bytes"]
        assert 16 * MIB <= at_remount < size, f"{at_remount} bytes local after kill -9"
        assert image["state"] == "paused"
        assert run_corfs("stream", "resume", m.mnt).returncode == 0
        wait_for(lambda: _image(m.mnt)["local_bytes"] > at_remount, 10, "the stream to resume")
        assert run_corfs("stream", "bandwidth", m.mnt, "0").returncode == 0
        wait_complete(m.mnt, NAME, 30)
        fetched = live_status(m.mnt)["fetcher"]["bytes_fetched"]
        assert fetched <= size - at_remount, (
            f"fetched {fetched} bytes, but only {size - at_remount} were missing at remount"
        )
        assert sha256_file(m.mnt / NAME) == sha256_file(base)
        m.stop()
    assert set(_local_chunks(tmp_dirs.cache)) == set(range(64))


# ---- 5. zeros stay holes ----------------------------------------------------------------


def test_zero_chunks_stay_holes_in_the_cache(tmp_dirs: CorfsDirs) -> None:
    size, data_blocks = 64 * MIB, {0, 17, 40, 63}
    base = make_image(tmp_dirs.base / NAME, size, seed=14, zero_blocks=set(range(64)) - data_blocks)
    with tmp_dirs.mount() as m:
        wait_complete(m.mnt, NAME, 30)
        assert sha256_file(m.mnt / NAME) == sha256_file(base)
        m.stop()
    data_file = tmp_dirs.cache / "data" / NAME
    st = os.stat(data_file)
    assert st.st_size == size
    allocated = st.st_blocks * 512
    assert allocated <= 6 * MIB, f"{allocated} bytes allocated for 4 MiB of data"
    states = _local_chunks(tmp_dirs.cache)
    assert len(states) == 64
    assert {i for i, s in states.items() if s == 2} == set(range(64)) - data_blocks  # ZERO


# ---- 6. record and replay a trace -------------------------------------------------------


def test_recorded_trace_is_streamed_first_by_a_fresh_cache(tmp_dirs: CorfsDirs) -> None:
    size, chunk = 16 * MIB, 64 * KIB  # 256 chunks
    base = make_image(tmp_dirs.base / NAME, size, seed=15)
    order = [200, 90, 150, 60, 230]
    with tmp_dirs.mount("--chunk-size", "64K", "--stream-paused", "--record-trace") as m:
        for index in order:
            assert direct_read(m.mnt / NAME, index * chunk, 4 * KIB) == _base_bytes(
                base, index * chunk, 4 * KIB
            )
        m.stop()
    trace = json.loads((tmp_dirs.cache / "trace.json").read_text())
    entry = trace["images"][NAME]
    assert entry["chunk_size"] == chunk
    assert [i for i in entry["chunks"] if i in order] == order

    trace_file = tmp_dirs.logs / "boot-trace.json"
    trace_file.write_text((tmp_dirs.cache / "trace.json").read_text())
    fresh = tmp_dirs.cache.parent / "cache2"
    fresh.mkdir()
    with CorfsMount(
        tmp_dirs.base,
        fresh,
        tmp_dirs.mnt,
        "--chunk-size",
        "64K",
        "--bandwidth",
        "1M",
        "--trace",
        trace_file,
        log_dir=tmp_dirs.logs,
    ) as m:
        local = wait_for(
            lambda: (found := _local_chunks(fresh)) and set(order) <= set(found) and found,
            15,
            "the traced chunks to be local",
        )
        # Sequentially the stream would have needed 231 chunks to reach all of them.
        assert len(local) < 96, f"{len(local)} chunks local when the traced ones were"
        m.stop()


# ---- 7. the base fails mid-stream --------------------------------------------------------


def test_base_failing_mid_stream_shows_in_status_and_recovers(tmp_dirs: CorfsDirs) -> None:
    size, chunk = 8 * MIB, 64 * KIB
    base = make_image(tmp_dirs.base / NAME, size, seed=16)
    expected = bytearray(base.read_bytes())
    away = tmp_dirs.logs / "moved-away.raw"
    with tmp_dirs.mount("--chunk-size", "64K", "--stream-paused") as m:
        file = m.mnt / NAME
        # The dir base opens an image on its first read: moved away now, every read fails.
        os.rename(base, away)
        written = bytes(range(256)) * (2 * chunk // 256)
        direct_write(file, 4 * chunk, written, fsync=True)  # two whole chunks: no base read
        expected[4 * chunk : 6 * chunk] = written
        with pytest.raises(OSError):
            direct_read(file, 40 * chunk, 4 * KIB)

        assert run_corfs("stream", "resume", m.mnt).returncode == 0
        image = wait_for(lambda: (i := _image(m.mnt))["error"] and i, 10, "an error in status")
        assert NAME in image["error"] and image["state"] != "complete"
        table = run_corfs("status", m.mnt).stdout
        assert "error:" in table, table
        time.sleep(1.5)  # a few failed tries, and a commit of whatever they recorded
        image = _image(m.mnt)
        assert image["local_bytes"] == 2 * chunk, "a chunk became local without its bytes"
        assert image["dirty_bytes"] == 2 * chunk
        assert direct_read(file, 4 * chunk, 2 * chunk) == written  # local chunks still served
        assert _local_chunks(tmp_dirs.cache) == {4: 3, 5: 3}  # only the written ones, DIRTY

        os.rename(away, base)  # back: the stream goes on by itself, nothing to resume
        wait_complete(m.mnt, NAME, 40)
        assert _image(m.mnt)["error"] is None
        assert direct_read(file, 0, size) == bytes(expected)
        m.stop()
    assert _local_chunks(tmp_dirs.cache) == {
        i: (3 if i in (4, 5) else 1) for i in range(size // chunk)
    }
