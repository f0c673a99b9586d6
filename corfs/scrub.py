"""`corfs verify CACHE [IMAGE]`: re-read clean local chunks, check them against their recorded
digests (zero chunks must read as zeros) and mark bad ones absent so they are fetched again.
An unmounted cache is locked and fixed directly; a mounted one is read alongside the running
daemon, which is then told to forget the bad chunks (it only forgets chunks still clean)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from . import control
from .digest import chunk_digest, is_zero
from .errors import UsageError
from .store import CacheStore, ChunkState, ImageRecord

# Chunks per forget command: the command is an xattr value, which the kernel refuses (E2BIG)
# above 64 KiB; 4096 indexes of up to 10 digits fit with room for the image's name.
FORGET_BATCH = 4096


@dataclass(frozen=True)
class ScrubReport:
    image: str
    checked: int
    bad: int
    bad_chunks: list[int]


def _find_bad(store: CacheStore, record: ImageRecord) -> tuple[int, list[int]]:
    states, _ = store.load_states(record)
    digests = store.digests_of(record.name)
    fd = store.data_fd(record.name)
    checked, bad = 0, []
    for index, state in enumerate(states):
        if state not in (ChunkState.CLEAN, ChunkState.ZERO):
            continue
        offset = index * record.chunk_size
        data = os.pread(fd, min(record.chunk_size, record.size - offset), offset)
        checked += 1
        ok = is_zero(data) if state == ChunkState.ZERO else chunk_digest(data) == digests.get(index)
        if not ok:
            bad.append(index)
    return checked, bad


def verify_cache(cache_dir: str, image: str | None = None) -> list[ScrubReport]:
    mounted = CacheStore.is_locked(cache_dir)
    store = CacheStore.open(cache_dir, lock=not mounted, create=False)
    try:
        records = [r for r in store.records() if image is None or r.name == image]
        if image is not None and not records:
            raise UsageError(f"{cache_dir} has no image {image!r}")
        reports = []
        for record in records:
            checked, bad = _find_bad(store, record)
            if bad:
                _forget(store, record.name, bad, mounted)
            reports.append(ScrubReport(record.name, checked, len(bad), bad))
        return reports
    finally:
        store.close()


def _forget(store: CacheStore, name: str, chunks: list[int], mounted: bool) -> None:
    if mounted:
        mountpoint = (store.read_small_file(control.MOUNTPOINT_FILE) or "").strip()
        for start in range(0, len(chunks), FORGET_BATCH):
            batch = chunks[start : start + FORGET_BATCH]
            control.send_command(mountpoint, {"op": "forget", "image": name, "chunks": batch})
    else:
        for index in chunks:
            store.record(name, index, ChunkState.ABSENT)
        store.commit_sync()


def print_reports(reports: list[ScrubReport], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"images": [asdict(r) for r in reports]}))
        return
    for r in reports:
        verdict = "ok" if not r.bad else f"{r.bad} bad, marked absent: {r.bad_chunks[:20]}"
        print(f"{r.image}: {r.checked} local chunks checked, {verdict}")
