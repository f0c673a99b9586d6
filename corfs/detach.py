"""`corfs detach CACHE IMAGE DEST`: a fully local image written out as a standalone raw file,
sparse where the image has zero chunks. Refuses an image that is not fully local, and a cache
that is mounted."""

from __future__ import annotations

import contextlib
import os

from .errors import CacheLocked, NotLocalError, UsageError
from .store import CacheStore, ChunkState


def detach_image(cache_dir: str, name: str, dest: str) -> int:
    """Copy IMAGE out of CACHE to DEST (written to a temp file, synced, then renamed)."""
    if os.path.exists(dest):
        raise UsageError(f"{dest} already exists; choose a new file name")
    if not os.path.isdir(os.path.dirname(os.path.abspath(dest))):
        raise UsageError(f"the directory of {dest} does not exist")
    if not os.path.exists(os.path.join(cache_dir, "state.db")):
        raise UsageError(f"{cache_dir} is not a corfs cache (no state.db)")
    # The lock keeps a mount off the cache while we copy: a live mount's newest writes may
    # not be committed yet, and the copy must not miss them.
    try:
        store = CacheStore.open(cache_dir, lock=True, create=False)
    except CacheLocked:
        raise CacheLocked(f"{cache_dir} is mounted: unmount it first, then detach") from None
    try:
        record = store.record_of(name)
        if record is None:
            raise UsageError(f"{cache_dir} has no image {name!r}")
        states, _ = store.load_states(record)
        missing = states.count(bytes([ChunkState.ABSENT]))
        if missing:
            raise NotLocalError(
                f"{name} is not fully local ({missing} of {len(states)} chunks missing); "
                "let the stream finish first (corfs status)"
            )
        tmp = f"{dest}.corfs-tmp"
        src = store.data_fd(name)
        try:
            with open(tmp, "wb") as out:
                for index, state in enumerate(states):
                    if state == ChunkState.ZERO:
                        continue  # leave a hole
                    offset = index * record.chunk_size
                    length = min(record.chunk_size, record.size - offset)
                    out.seek(offset)
                    out.write(os.pread(src, length, offset))
                out.truncate(record.size)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dest)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise UsageError(f"writing {dest}: {exc.strerror}") from None
        return record.size
    finally:
        store.close()
