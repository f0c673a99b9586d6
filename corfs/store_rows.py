"""What state.db holds: its schema, the rows read out of it (ChunkState, ImageRecord,
HandoffRecord), and the checks that a row is one corfs could have written (a damaged row must
stop every command in one line, not fail as a traceback wherever it is first used). The store
that reads and writes them: store.py."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from enum import IntEnum

from .errors import CacheError
from .geometry import ChunkGeometry

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images(
    name TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    chunk_size INTEGER NOT NULL,
    identity TEXT NOT NULL,
    base TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks(
    image TEXT NOT NULL,
    idx INTEGER NOT NULL,
    state INTEGER NOT NULL,
    digest BLOB,
    PRIMARY KEY(image, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunks_by_digest ON chunks(digest) WHERE digest IS NOT NULL;
CREATE TABLE IF NOT EXISTS handoffs(
    name TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    dest TEXT NOT NULL,
    via TEXT NOT NULL,
    qemu_path TEXT NOT NULL,
    done INTEGER NOT NULL,
    at REAL NOT NULL
);
"""


class ChunkState(IntEnum):
    ABSENT = 0
    CLEAN = 1  # equal to base; digest recorded
    ZERO = 2  # equal to base and all zeros: a hole in the data file
    DIRTY = 3  # written through the mount; no longer equal to base


@dataclass(frozen=True)
class HandoffRecord:
    """An image handed over (done) or being handed over (not done) to a running QEMU."""

    name: str
    size: int
    dest: str  # the data file's new name, which QEMU opens
    via: str  # how to reach that QEMU (handoff.Via as JSON)
    qemu_path: str  # the file QEMU had open: MNT/IMAGE
    done: bool
    at: float


@dataclass(frozen=True)
class ImageRecord:
    name: str
    size: int
    chunk_size: int
    identity: str
    base: str

    @property
    def geometry(self) -> ChunkGeometry:
        return ChunkGeometry(self.size, self.chunk_size)


def checked_record(record: ImageRecord, cache_dir: str) -> ImageRecord:
    """`record` if corfs could have written it; else CacheError: a damaged row must stop every
    command in one line, not as a traceback wherever its geometry is first needed."""
    try:
        record.geometry  # noqa: B018 (checks size and chunk size)
        if not isinstance(record.size, int):
            raise TypeError(f"size {record.size!r}")
    except (ValueError, TypeError) as exc:
        raise CacheError(
            f"cache database in {cache_dir} is damaged: image {record.name!r}: {exc}"
        ) from None
    return record


def check_chunk_rows(db: sqlite3.Connection, cache_dir: str) -> None:
    """CacheError if a chunk row has a state corfs never writes: such a chunk would be served
    from the data file as local (any non-absent state is), its bytes vouched for by nothing."""
    known = ", ".join(str(int(state)) for state in ChunkState if state != ChunkState.ABSENT)
    row = db.execute(
        f"SELECT image, idx, state FROM chunks WHERE state NOT IN ({known}) "
        "OR typeof(idx) != 'integer' LIMIT 1"
    ).fetchone()
    if row is not None:
        image, idx, state = row
        raise CacheError(
            f"cache database in {cache_dir} is damaged: chunk {idx!r} of image {image!r} "
            f"has state {state!r}"
        )
