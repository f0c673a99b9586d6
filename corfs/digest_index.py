"""Which clean chunk of the cache holds given bytes, by their xxh3-128 digest (for dedup).

Why in memory: a lookup happens on the trio thread for every published chunk a fill wants.
Asking SQLite there took the database lock, which a commit holds across its WAL fsync
(synchronous=FULL): every FUSE request, local reads included, waited for the disk.

Invariants:
- Kept on the trio thread only, beside the chunk marks (CacheStore.record): a chunk is in the
  index from the moment it is marked clean with a digest (its bytes are written by then, as
  for dedup from a pending mark before) until it is marked anything else or its image is
  dropped. Loaded from the committed rows when the store opens.
- One location per digest, which is all dedup needs. When that chunk stops being clean its
  digest is forgotten even if another chunk holds the same bytes; it is found again once such
  a chunk is filled, or after a reopen. A missed copy costs a fetch, never a wrong byte:
  callers check the bytes they read against the digest.
"""

from __future__ import annotations

from collections.abc import Iterable


class DigestIndex:
    def __init__(self, rows: Iterable[tuple[str, int, bytes]] = ()) -> None:
        self._where: dict[bytes, tuple[str, int]] = {}  # digest -> (image, chunk)
        self._digests: dict[str, dict[int, bytes]] = {}  # image -> chunk -> digest
        for name, idx, digest in rows:
            self.set(name, idx, digest)

    def __len__(self) -> int:
        return len(self._where)

    def find(self, digest: bytes) -> tuple[str, int] | None:
        return self._where.get(digest)

    def set(self, name: str, idx: int, digest: bytes | None) -> None:
        """Chunk `idx` of `name` is now clean with `digest`; None: it is not clean any more."""
        chunks = self._digests.get(name)
        old = chunks.pop(idx, None) if chunks is not None else None
        if old is not None and self._where.get(old) == (name, idx):
            del self._where[old]
        if digest is not None:
            self._digests.setdefault(name, {})[idx] = digest
            self._where.setdefault(digest, (name, idx))

    def drop_image(self, name: str) -> None:
        for idx, digest in self._digests.pop(name, {}).items():
            if self._where.get(digest) == (name, idx):
                del self._where[digest]
