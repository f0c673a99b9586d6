"""Issue 2, point 5: crash safety. Rounds of: mount with streaming on and 64 KiB chunks, a
reader and a writer at work, kill -9 at a random moment; the next mount must serve, for every
4 KiB block, the base bytes or the written bytes that were acknowledged by fsync, and for
writes not yet synced either the old or the new content of the block, never anything else."""

from __future__ import annotations

import contextlib
import random
import signal
import sqlite3
import struct
import threading
import time

import pytest

from tests.mounting import CorfsMount, make_image, run_corfs

from .util import (
    KIB,
    MIB,
    direct_read,
    direct_write,
    image_status,
    live_status,
    status,
    wait_for,
)

BLOCK = 4 * KIB
SIZE = 16 * MIB
ROUNDS = 20


def _pattern(seq: int, block: int) -> bytes:
    """The bytes write number `seq` puts in `block`: unique per (write, block)."""
    return struct.pack("<QQ", seq, block) * (BLOCK // 16)


class Model:
    """Per 4 KiB block: its durable content (None = base) and the contents of writes issued
    since the last fsync. Any of those may be found after a crash."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.durable: dict[int, bytes] = {}
        self.unsynced: dict[int, list[bytes]] = {}

    def issue(self, offset: int, blocks: list[bytes]) -> None:
        with self.lock:  # recorded before the write is sent: it may land at any moment
            for i, data in enumerate(blocks):
                self.unsynced.setdefault(offset // BLOCK + i, []).append(data)

    def synced(self) -> None:
        with self.lock:  # fsync returned: every write before it is durable
            for block, contents in self.unsynced.items():
                self.durable[block] = contents[-1]
            self.unsynced.clear()

    def touched(self) -> set[int]:
        with self.lock:
            return set(self.durable) | set(self.unsynced)

    def allowed(self, block: int, base: bytes) -> list[bytes]:
        with self.lock:
            first = self.durable.get(block, base[block * BLOCK : (block + 1) * BLOCK])
            return [first, *self.unsynced.get(block, [])]


def _check(image: bytes, base: bytes, model: Model, where: str) -> None:
    assert len(image) == len(base), where
    touched = model.touched()
    bad = []
    for block in range(len(base) // BLOCK):
        got = image[block * BLOCK : (block + 1) * BLOCK]
        if block not in touched:
            if got != base[block * BLOCK : (block + 1) * BLOCK]:
                bad.append((block, "base"))
        elif got not in model.allowed(block, base):
            bad.append((block, "written"))
    assert not bad, f"{where}: {len(bad)} blocks wrong, first: {bad[:5]}"


def _writer(path, model: Model, rng: random.Random, seq0: int, stop, done: list[int]) -> None:
    seq = seq0
    with contextlib.suppress(OSError):  # ENOTCONN / ECONNABORTED once killed
        while not stop.is_set():
            nblocks = rng.choice((1, 1, 2, 4, 16))
            block = rng.randrange(0, SIZE // BLOCK - nblocks)
            seq += 1
            blocks = [_pattern(seq, block + i) for i in range(nblocks)]
            model.issue(block * BLOCK, blocks)
            sync = rng.random() < 0.3
            direct_write(path, block * BLOCK, b"".join(blocks), fsync=sync)
            if sync:
                model.synced()
            done[0] += 1


def _reader(path, base: bytes, model: Model, rng: random.Random, stop, errors: list) -> None:
    with contextlib.suppress(OSError):
        # A pause between reads: random reads alone would make the whole image local within
        # a fraction of a second, and the kill must land while chunks are still being filled.
        while not stop.wait(0.005):
            off = rng.randrange(0, SIZE // BLOCK) * BLOCK
            length = rng.choice((4, 64, 128, 256)) * KIB
            got = direct_read(path, off, length)
            touched = model.touched()  # after the read: includes every write that could land
            for i in range(len(got) // BLOCK):
                block = off // BLOCK + i
                if (
                    block not in touched
                    and got[i * BLOCK : (i + 1) * BLOCK]
                    != base[block * BLOCK : (block + 1) * BLOCK]
                ):
                    errors.append(f"reader saw wrong bytes in untouched block {block}")
                    return


@pytest.mark.slow
def test_kill9_rounds_keep_every_byte_right(tmp_dirs, tmp_path):
    """Each round starts from an empty cache and streams at a limited rate, so the kill
    lands while the stream, the reader's fills and the writer all change the cache."""
    base_path = make_image(tmp_dirs.base / "disk.raw", SIZE, seed=21, zero_blocks=(3, 9))
    base = base_path.read_bytes()
    rng = random.Random(1234)
    options = ("--chunk-size", "64k")
    writes = mid_stream = 0
    for round_no in range(ROUNDS):
        model = Model()
        cache = tmp_path / f"cache{round_no}"
        with CorfsMount(
            base_path.parent,
            cache,
            tmp_dirs.mnt,
            *options,
            "--bandwidth",
            "8M",
            log_dir=tmp_dirs.logs,
        ) as m:
            path = m.mnt / "disk.raw"
            stop = threading.Event()
            errors: list[str] = []
            done = [0]
            threads = [
                threading.Thread(
                    target=_writer,
                    args=(path, model, random.Random(rng.random()), round_no << 32, stop, done),
                ),
                threading.Thread(
                    target=_reader,
                    args=(path, base, model, random.Random(rng.random()), stop, errors),
                ),
            ]
            for t in threads:
                t.start()
            try:
                time.sleep(rng.uniform(0.1, 0.6))
                local = live_status(m.mnt)["images"][0]["local_bytes"]
                m.kill9()
            finally:
                stop.set()
                for t in threads:
                    t.join(30)
            assert not any(t.is_alive() for t in threads), "a client thread hung"
            assert not errors, errors
            writes += done[0]
            mid_stream += local < SIZE
        with CorfsMount(
            base_path.parent, cache, tmp_dirs.mnt, *options, "--no-stream", log_dir=tmp_dirs.logs
        ) as m:
            image = (m.mnt / "disk.raw").read_bytes()
            _check(image, base, model, f"remount after round {round_no}")
            m.stop()
    assert base_path.read_bytes() == base  # BASE untouched through it all
    assert writes >= 5 * ROUNDS, f"only {writes} writes completed: the test did little"
    assert mid_stream >= ROUNDS // 2, f"only {mid_stream} kills landed mid-stream"


# A daemon whose cache disk takes SLOW_STORE_S per store (issue 13.1): a sitecustomize on its
# PYTHONPATH slows DataFile's writes, so its write-behind queue is full when it is killed.
SLOW_STORE_S = 2.5
_SLOW_STORES = f"""
import time
from corfs import datafile
_real = datafile.DataFile._write_run
def _slow(self, way, offset, pieces):
    time.sleep({SLOW_STORE_S})
    return _real(self, way, offset, pieces)
datafile.DataFile._write_run = _slow
"""


@pytest.mark.parametrize("signals", [1, 2], ids=["waits", "second-signal-skips"])
def test_a_clean_stop_stores_what_was_fetched_first(tmp_dirs, tmp_path, signals):
    """SIGTERM while fetched chunks wait to be stored (stores crawl here): the daemon stores
    them before it exits (it dropped them, to be fetched again), the mount gone at once. A
    second signal ends that wait: what was not stored is fetched again next time."""
    from tests.mounting import REPO_ROOT

    size = 1 * MIB
    base_path = make_image(tmp_dirs.base / "disk.raw", size, seed=24)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_SLOW_STORES)
    with CorfsMount(
        base_path.parent, tmp_dirs.cache, tmp_dirs.mnt, "--chunk-size", "64k", "--no-stream",
        log_dir=tmp_dirs.logs, env={"PYTHONPATH": f"{hook}:{REPO_ROOT}"},
    ) as m:
        for offset in range(0, size, size // 4):  # four fills: four stores of 2.5 s each
            assert direct_read(m.mnt / "disk.raw", offset, size // 4) == (
                base_path.read_bytes()[offset : offset + size // 4]
            )
        assert image_status(live_status(m.mnt), "disk.raw")["local_bytes"] < size, "no test"
        started = time.monotonic()
        if signals == 2:
            assert m.proc is not None
            m.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: "storing the fetched chunks first" in m.log_text(), 10,
                     "the store wait")
        m.stop(timeout=60)
        took = time.monotonic() - started
    assert "storing the fetched chunks first" in m.log_text()
    local = image_status(status(tmp_dirs.cache), "disk.raw")["local_bytes"]
    if signals == 1:
        assert local == size
    else:
        assert "not waiting for the fetched chunks to be stored" in m.log_text()
        assert local < size and took < 4 * SLOW_STORE_S, (local, took)


def test_kill9_with_a_full_write_behind_queue_keeps_every_byte_right(tmp_dirs, tmp_path):
    """Cold reads are answered while their stores crawl; writes land at chunk and folio-span
    boundaries beside queued chunks, some fsynced; kill -9 with the queue full. The next mount
    must find no chunk recorded local whose bytes did not reach the data file, and every byte
    right (the base's, or a write's as the model allows)."""
    from tests.mounting import REPO_ROOT

    size = 4 * MIB
    base_path = make_image(tmp_dirs.base / "disk.raw", size, seed=22)
    base = base_path.read_bytes()
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_SLOW_STORES)
    cache = tmp_path / "cache"
    model = Model()
    chunk = 64 * KIB
    with CorfsMount(
        base_path.parent, cache, tmp_dirs.mnt, "--chunk-size", "64k", "--no-stream",
        log_dir=tmp_dirs.logs, env={"PYTHONPATH": f"{hook}:{REPO_ROOT}"},
    ) as m:
        path = m.mnt / "disk.raw"
        start = time.monotonic()
        assert direct_read(path, 0, 2 * MIB) == base[: 2 * MIB]
        assert time.monotonic() - start < 2, "the reader waited for the cache disk"
        # Boundaries of queued chunks: inside one, across one's start and end, a whole one,
        # across a 2 MiB folio span's edge, each fsynced or not.
        for seq, (offset, nblocks, sync) in enumerate((
            (3 * chunk + BLOCK, 1, True),
            (5 * chunk - BLOCK, 2, False),
            (8 * chunk, chunk // BLOCK, True),
            (2 * MIB - BLOCK, 2, True),
            (20 * chunk + 2 * BLOCK, 1, False),
        ), start=1):
            blocks = [_pattern(seq, offset // BLOCK + i) for i in range(nblocks)]
            model.issue(offset, blocks)
            direct_write(path, offset, b"".join(blocks), fsync=sync)
            if sync:
                model.synced()
        # The writes waited for the stores in their spans; a last cold read fills the queue.
        start = time.monotonic()
        got = direct_read(path, 2 * MIB, 2 * MIB)
        assert got[BLOCK:] == base[2 * MIB + BLOCK :]  # (its first block was written above)
        assert time.monotonic() - start < 2, "the reader waited for the cache disk"
        queued = live_status(m.mnt)["write_behind"]["queued_bytes"]
        assert queued > 0, "nothing was queued when the daemon was killed"
        m.kill9()
    with CorfsMount(
        base_path.parent, cache, tmp_dirs.mnt, "--no-stream", log_dir=tmp_dirs.logs
    ) as m:
        _check((m.mnt / "disk.raw").read_bytes(), base, model, "remount after the kill")
        m.stop()
    assert base_path.read_bytes() == base


def test_what_a_remount_serves_after_a_kill9_stays_put(tmp_dirs, tmp_path):
    """A client writes into a chunk committed clean and the daemon is killed before its next
    commit: the chunk must not be left recorded clean (equal to the base, with the base's
    digest) over bytes that are not the base's. The next mount served the written bytes,
    and a later `corfs verify` took them for damage and put the base's back: bytes the guest
    had read since changed under it with no write. Here another connection holds the
    database's write lock so that the kill lands before the next commit (without it, any kill
    within a commit interval of the write does the same)."""
    chunk = 64 * KIB
    make_image(tmp_dirs.base / "a.raw", 8 * chunk, seed=23, block_size=chunk)
    written = b"N" * (4 * KIB)
    with tmp_dirs.mount("--no-stream", "--chunk-size", "64k") as m:
        path = m.mnt / "a.raw"
        direct_read(path, 0, chunk)
        direct_write(path, 5 * chunk, b"D" * (4 * KIB), fsync=True)  # commits chunk 0 clean
        db = sqlite3.connect(tmp_dirs.cache / "state.db", isolation_level=None)
        db.execute("BEGIN IMMEDIATE")
        writer = threading.Thread(target=_write_quietly, args=(path, written))
        try:
            writer.start()
            time.sleep(1.0)  # the write returned long ago, or waits for a commit
            m.kill9()
        finally:
            db.execute("ROLLBACK")
            db.close()
        writer.join(30)
        assert not writer.is_alive()
    with tmp_dirs.mount("--no-stream", "--chunk-size", "64k") as m:
        before = direct_read(m.mnt / "a.raw", 0, chunk)
        m.stop()
    result = run_corfs("verify", tmp_dirs.cache)
    assert result.returncode == 0, result.stdout + result.stderr
    with tmp_dirs.mount("--no-stream", "--chunk-size", "64k") as m:
        assert direct_read(m.mnt / "a.raw", 0, chunk) == before
        m.stop()


def _write_quietly(path, data: bytes) -> None:
    with contextlib.suppress(OSError):  # ENOTCONN once the daemon is killed
        direct_write(path, 0, data)
