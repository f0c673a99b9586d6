"""`corfs detach CACHE IMAGE DEST`: a fully local image written out as a standalone raw file,
sparse where the image has zero chunks. Refuses an image that is not fully local, and a cache
that is mounted.

DEST is written under DEST.corfs-tmp, synced, then renamed into place. The temp file is created
O_EXCL | O_NOFOLLOW relative to DEST's directory: whatever is already there (a symlink planted
to make us write elsewhere, a leftover of a killed run) makes detach fail, never followed nor
removed. DEST is 0600, like the cache it comes from: the guest's bytes are the user's alone
until they choose otherwise (chmod, or the owner libvirt's QEMU needs)."""

from __future__ import annotations

import contextlib
import os

from .cache_layout import STATE_DB, is_cache_dir, private_open
from .digest import chunk_digest
from .errors import CacheError, CacheLocked, NotLocalError, UsageError
from .fileio import pread_full
from .handoff import (
    check_dest_outside_base,
    check_dest_outside_cache,
    no_image_error,
    unsettled,
)
from .store import CacheStore, ChunkState, ImageRecord

TMP_SUFFIX = ".corfs-tmp"


def detach_image(cache_dir: str, name: str, dest: str) -> int:
    """Copy IMAGE out of CACHE to DEST (written to a temp file, synced, then renamed)."""
    if os.path.lexists(dest):
        raise UsageError(f"{dest} already exists; choose a new file name")
    dest_dir, dest_name = os.path.split(os.path.abspath(dest))
    if not os.path.isdir(dest_dir):
        raise UsageError(f"the directory of {dest} does not exist")
    if not is_cache_dir(cache_dir):
        raise UsageError(f"{cache_dir} is not a corfs cache (no {STATE_DB})")
    check_dest_outside_cache(dest, cache_dir)
    # The lock keeps a mount off the cache while we copy: a live mount's newest writes may
    # not be committed yet, and the copy must not miss them.
    try:
        store = CacheStore.open(cache_dir, lock=True, create=False)
    except CacheLocked:
        raise CacheLocked(f"{cache_dir} is mounted: unmount it first, then detach") from None
    try:
        record = store.record_of(name)
        if record is None:
            raise no_image_error(store, cache_dir, name)
        if why := unsettled(store, name):
            raise UsageError(why)
        check_dest_outside_base(dest, {r.base for r in store.records()})
        states, _ = store.load_states(record)
        missing = states.count(bytes([ChunkState.ABSENT]))
        if missing:
            raise NotLocalError(
                f"{name} is not fully local ({missing} of {len(states)} chunks missing); "
                "let the stream finish first (corfs status)"
            )
        try:
            dir_fd = os.open(dest_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise UsageError(f"cannot open the directory of {dest}: {exc.strerror}") from None
        try:
            _write_out(store, record, states, dir_fd, dest_name, dest)
        finally:
            os.close(dir_fd)
        return record.size
    finally:
        store.close()


def _write_out(
    store: CacheStore,
    record: ImageRecord,
    states: bytearray,
    dir_fd: int,
    dest_name: str,
    dest: str,
) -> None:
    tmp_name = dest_name + TMP_SUFFIX
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    try:
        fd = private_open(tmp_name, flags, dir_fd=dir_fd)
    except FileExistsError:
        raise UsageError(
            f"{dest}{TMP_SUFFIX} is in the way (left by an interrupted detach?): "
            "remove it and retry"
        ) from None
    except OSError as exc:
        raise UsageError(f"cannot create {dest}{TMP_SUFFIX}: {exc.strerror}") from None
    src = store.data_fd(record.name)
    digests = store.digests_of(record.name)
    geometry = record.geometry
    try:
        with os.fdopen(fd, "wb") as out:
            for index, state in enumerate(states):
                if state == ChunkState.ZERO:
                    continue  # leave a hole
                offset = geometry.chunk_start(index)
                data = pread_full(src, geometry.chunk_length(index), offset)
                _check_chunk(store, record, index, state, data, digests.get(index))
                out.seek(offset)
                out.write(data)
            out.truncate(record.size)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp_name, dest_name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)  # the new name survives a power cut too
    except (OSError, CacheError) as exc:
        # Only the name we created: unlink never follows a link, it removes the entry.
        with contextlib.suppress(OSError):
            os.unlink(tmp_name, dir_fd=dir_fd)
        if isinstance(exc, CacheError):
            raise
        raise UsageError(f"writing {dest}: {exc.strerror}") from None


def _check_chunk(
    store: CacheStore, record: ImageRecord, index: int, state: int, data: bytes,
    digest: bytes | None,
) -> None:
    """CacheError unless `data` can be chunk `index`: all of it, and for a clean chunk the
    bytes its digest was recorded for. A damaged cache must not become a standalone image
    that nothing checks any more."""
    short = len(data) < record.geometry.chunk_length(index)
    if short or (state == ChunkState.CLEAN and chunk_digest(data) != digest):
        why = "is cut short in the data file" if short else "fails its digest"
        raise CacheError(
            f"chunk {index} of {record.name} {why}: run corfs verify {store.cache_dir} "
            "and let a mount fetch it again, then detach"
        )
