"""`corfs verify CACHE [IMAGE]`: re-read clean local chunks, check them against their recorded
digests (zero chunks must read as zeros) and mark bad ones absent so they are fetched again.
An unmounted cache is locked and fixed directly; a mounted one is read alongside the running
daemon, which is then told to forget the bad chunks (it only forgets chunks still clean).

Invariant: a bad chunk is forgotten only while its base lists the image with the identity the
cache recorded (refetch.py), asked at forget time: by the daemon for a mounted cache, here
(opening the base the cache recorded) for an unmounted one. Otherwise the chunk is kept, its
bytes possibly the only copy left, and reported bad with the reason."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import trio

from . import cache_files, control_client
from .base import BaseOptions, BaseStore, open_base
from .cache_layout import recorded_mountpoint
from .digest import chunk_digest, is_zero
from .errors import CacheError, CacheLocked, CorfsError, ForgetRefused
from .fileio import pread_full
from .handoff import no_image_error, unsettled
from .printable import printable
from .refetch import why_base_cannot_supply
from .store import CacheStore, ChunkState, ImageRecord

# Chunks per forget command: the command is an xattr value, which the kernel refuses (E2BIG)
# above 64 KiB; 4096 indexes of up to 10 digits fit with room for the image's name.
FORGET_BATCH = 4096
# An unmounted cache's base is opened just to list it: a dead one must not hold verify long.
OFFLINE_BASE_TIMEOUT = 15.0


@dataclass(frozen=True)
class ScrubReport:
    image: str
    checked: int
    bad: int
    bad_chunks: list[int]
    kept: str | None = None  # why the bad chunks were kept (their base cannot supply them)
    error: str | None = None  # why the image could not be checked at all (its data file)


def _find_bad(
    store: CacheStore, record: ImageRecord, indexes: Iterable[int] | None = None
) -> tuple[int, list[int]]:
    """(chunks checked, bad ones) among `indexes` (default: all), by the committed states."""
    states, _ = store.load_states(record)
    digests = store.digests_of(record.name)
    fd = store.data_fd(record.name)
    geometry = record.geometry
    checked, bad = 0, []
    for index in range(len(states)) if indexes is None else indexes:
        state = states[index]
        if state not in (ChunkState.CLEAN, ChunkState.ZERO):
            continue
        checked += 1
        length = geometry.chunk_length(index)
        try:
            data = pread_full(fd, length, geometry.chunk_start(index))
        except OSError:  # unreadable (EIO: a bad sector): bad, and a refill rewrites it
            bad.append(index)
            continue
        if len(data) < length:  # past the end of a data file cut short: not its bytes
            ok = False
        elif state == ChunkState.ZERO:
            ok = is_zero(data)
        else:
            ok = chunk_digest(data) == digests.get(index)
        if not ok:
            bad.append(index)
    return checked, bad


def verify_cache(
    cache_dir: str, image: str | None = None, *, base: BaseStore | None = None
) -> list[ScrubReport]:
    """Scrub CACHE (or one image of it). `base`: the base of an unmounted cache, asked before
    a bad chunk is forgotten; by default the one the cache recorded is opened."""
    mounted = cache_files.is_locked(cache_dir)
    mountpoint = _mount_serving(cache_dir) if mounted else None
    store = CacheStore.open(cache_dir, lock=not mounted, create=False)
    try:
        records = [r for r in store.records() if image is None or r.name == image]
        if image is not None and not records:
            raise no_image_error(store, cache_dir, image)
        reports = []
        for record in records:
            try:
                checked, bad = _find_bad(store, record)
            except CacheError as exc:  # its data file cannot be opened: only it fails
                reports.append(ScrubReport(record.name, 0, 0, [], error=str(exc)))
                continue
            if bad and mountpoint is not None:
                bad = _still_bad_once_committed(mountpoint, store, record, bad)
            kept = None if mounted or not bad else unsettled(store, record.name)
            if bad and kept is None:
                try:
                    _forget(store, record, bad, mountpoint, base)
                except ForgetRefused as exc:
                    kept = str(exc)
            reports.append(ScrubReport(record.name, checked, len(bad), bad, kept))
        return reports
    finally:
        store.close()


def _mount_serving(cache_dir: str) -> str:
    """The mountpoint of the live mount of CACHE, whose lock is held. CacheLocked if the
    holder is no mount (another verify, a detach) or not one of this cache (a mountpoint file
    a killed mount left, the path since mounted again): forgets must reach its daemon only."""
    mountpoint = recorded_mountpoint(cache_dir)
    if mountpoint is not None:
        try:
            served = control_client.read_status(mountpoint)["cache"]
            if os.path.samefile(served, cache_dir):
                return mountpoint
        except (CorfsError, OSError, KeyError, TypeError):
            pass
    raise CacheLocked(
        f"{cache_dir} is in use by another corfs command (not a mount): verify it once that "
        "is done"
    )


def _still_bad_once_committed(
    mountpoint: str, store: CacheStore, record: ImageRecord, bad: list[int]
) -> list[int]:
    """Those of `bad` still bad by the states the daemon holds now. A mounted cache's database
    lags its daemon (a commit a second, a scan for minutes): a chunk read bad may have been
    written by the guest since its state was read (dirty now: its bytes are right) or be in a
    refill. An fsync of the image through the mount makes the daemon commit what it holds;
    then those chunks are checked again. If that fails, the daemon still forgets only chunks
    it holds clean."""
    try:
        fd = os.open(os.path.join(mountpoint, record.name), os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        return bad
    return _find_bad(store, record, bad)[1]


def _forget(
    store: CacheStore,
    record: ImageRecord,
    chunks: list[int],
    mountpoint: str | None,
    base: BaseStore | None,
) -> None:
    """Forget `chunks`: through the daemon of the mount at `mountpoint`, or here offline."""
    if mountpoint is not None:
        for start in range(0, len(chunks), FORGET_BATCH):
            batch = chunks[start : start + FORGET_BATCH]
            command = {"op": "forget", "image": record.name, "chunks": batch}
            control_client.send_command(mountpoint, command)
        return
    why = trio.run(_why_not_refetchable, record, base)
    if why is not None:
        raise ForgetRefused(f"{record.name}: {why}")
    for index in chunks:
        store.record(record.name, index, ChunkState.ABSENT)
    store.commit_sync()


async def _why_not_refetchable(record: ImageRecord, base: BaseStore | None) -> str | None:
    if base is not None:
        return await why_base_cannot_supply(base, record.name, record.identity, record.size)
    if not record.base:
        return "the cache does not say which base it came from"
    if "://" in record.base:
        # Offline there are none of the mount's base options (auth header, CA, S3 endpoint,
        # profile): without them a request could carry credentials to the wrong place
        # (botocore's default endpoint is AWS). A mount has them: verify through it.
        return f"its base {record.base} is remote: mount CACHE and verify again to refetch them"
    try:
        opened = await open_base(record.base, BaseOptions(io_timeout=OFFLINE_BASE_TIMEOUT))
    except CorfsError as exc:
        return f"its base {record.base} cannot be opened: {exc}"
    try:
        return await why_base_cannot_supply(opened, record.name, record.identity, record.size)
    finally:
        await opened.aclose()


def print_reports(reports: list[ScrubReport], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"images": [asdict(r) for r in reports]}))
        return
    for r in reports:
        image = printable(r.image)  # a name (or an error quoting a server) is the base's text
        if r.error:
            print(f"{image}: not checked: {printable(r.error)}")
            continue
        if not r.bad:
            verdict = "ok"
        elif r.kept:
            verdict = f"{r.bad} bad, kept (the base cannot supply them): {r.bad_chunks[:20]}"
        else:
            verdict = f"{r.bad} bad, marked absent: {r.bad_chunks[:20]}"
        print(f"{image}: {r.checked} local chunks checked, {verdict}")
        if r.kept:
            print(f"  {printable(r.kept)}")
