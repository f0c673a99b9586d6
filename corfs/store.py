"""The local chunk store in CACHE: one sparse data file per image plus the chunk state of every
image in one SQLite database (WAL).

The layout of CACHE and the privacy of what is in it: cache_layout.py; its lock and small files:
cache_files.py. The schema and the rows' types and checks: store_rows.py. What the rows may say
after a crash: crash_view.py.

Data files are DataFiles (datafile.py: descriptors, how bytes reach them, stores in flight), one
per image, opened here on first use (`data_file`) so that `commit` can sync those touched.

Invariant: never mark before durable. Marks are collected in memory (`record`) and written by
`commit()`, which first fdatasyncs every data file touched and only then commits the rows it
snapshotted before syncing. So after a crash, every row says the truth about bytes on disk.
State is mutated only on the trio thread; `commit` swaps the pending map out there, and only
the fdatasync and the SQL run in a worker thread.

The trio thread never waits for a commit: a commit holds `_db_lock` across its SQL, whose WAL
fsync (synchronous=FULL) can take as long as the disk likes. What the mount asks while it
serves (image records, dedup lookups) comes from memory: the records are read at open and
kept by create_image/drop_image, the digests are a DigestIndex kept by `record`. SQL on the
trio thread is left to mount setup and offline tools, before any commit runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from .buffers import aligned_copy
from .cache_files import take_lock
from .cache_layout import (
    DATA_DIR,
    STATE_DB,
    check_new_cache,
    data_path_in,
    ensure_private_dir,
    held_path,
    is_cache_dir,
    log_tightened,
    private_open,
    tighten_private,
)
from .crash_view import CrashView, Marks
from .digest import Buffer, chunk_digest
from .digest_index import DigestIndex
from .durable import fsync_dir
from .errors import CacheError, CacheFull, UsageError, cache_os_error
from .store_rows import (
    SCHEMA,
    SCHEMA_VERSION,
    ChunkState,
    HandoffRecord,
    ImageRecord,
    check_chunk_rows,
    checked_record,
)

if TYPE_CHECKING:  # imported where used: offline readers (`corfs status CACHE`) never load them
    import trio

    from .datafile import DataFile

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class StoreStatistics:
    commits: int
    pending_marks: int
    sync_failure: str | None  # set once a data sync failed: nothing more is recorded




@dataclass
class _Batch:
    """One commit's work: sync these data files, then write these marks."""

    touched: set[str]  # images whose data files changed
    fds: list[int]  # their open data files
    pending: Marks
    # (data file, the image's modification time) of the images written or stored into: the
    # kernel moved the file's mtime (DataFile.mtime_ns)
    stamps: list[tuple[int, int]]


class _SyncFailed(Exception):
    """fdatasync of a data file failed: the bytes behind pending marks may not be on disk."""

    def __init__(self, cause: CacheError) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _disk_full(path: str) -> bool:
    """No room left for us on the file system of `path` (root may use the reserved blocks)."""
    try:
        vfs = os.statvfs(path)
    except OSError:
        return False
    return (vfs.f_bfree if os.geteuid() == 0 else vfs.f_bavail) == 0


def _sqlite_opened_held(root: str) -> bool:
    """Whether SQLite has the held CACHE's own state.db, -wal and -shm open (those there).
    It resolves the path it is given (/proc/self/fd/N/state.db) to the directory's name and
    opens by that name: a CACHE re-pointed in between (another user's parent directory) gave
    it another directory's files. Compared by inode with this process's open descriptors."""
    wanted = set()
    for name in (STATE_DB, f"{STATE_DB}-wal", f"{STATE_DB}-shm"):
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(os.path.join(root, name), follow_symlinks=False)
            wanted.add((st.st_dev, st.st_ino))
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            st = os.stat(f"/proc/self/fd/{fd}")
            wanted.discard((st.st_dev, st.st_ino))
    return not wanted


def _sql_error(exc: sqlite3.Error, what: str) -> CacheError:
    """The error a failed statement on the state database becomes: CacheFull when the cache
    disk is full (ENOSPC to a client: QEMU's default werror=enospc pauses the VM until there is
    room, where EIO would reach the guest as a disk error)."""
    if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "full" in str(exc):
        return CacheFull(f"cache disk full while {what}: {exc}")
    return CacheError(f"{what}: {exc}")


@dataclass(frozen=True)
class CacheHooks:
    """Told of cache I/O as it happens (metrics.py), possibly from worker threads."""

    written: Callable[[int], None] = lambda nbytes: None  # bytes written to a data file
    synced: Callable[[float], None] = lambda seconds: None  # a commit's duration


class CacheStore:
    def __init__(
        self,
        cache_dir: str,
        root_fd: int,
        db: sqlite3.Connection,
        lock_fd: int | None,
        hooks: CacheHooks = CacheHooks(),
    ) -> None:
        self.cache_dir = cache_dir  # as the user named it: for messages and status
        self.root = held_path(root_fd)  # CACHE as checked at open: for every access
        self._root_fd: int | None = None  # owned once __init__ succeeded (open closes it if not)
        self._hooks = hooks
        self._db = db
        self._db_lock = threading.Lock()
        self._lock_fd = lock_fd
        self._data_files: dict[str, DataFile] = {}  # opened on first use, closed by drop/close
        self._syncs = 0  # commits waiting for or holding the commit lock
        self._pending: Marks = {}
        self._touched: set[str] = set()
        self._crash_view = CrashView()  # of the images a mount serves (load_states(track=True))
        self.sync_failure: str | None = None  # set once a data sync failed: see commit()
        # Once a sync failed, the chunks whose bytes no successful sync covered (take_unsynced)
        self._unsynced: dict[str, set[int]] = {}
        # Told once, on the trio thread, when a sync fails (mount.py: the images forget what it
        # lost at once, and the kernel's cached pages of it go, before any reader comes back)
        self.on_sync_failure: Callable[[], None] = lambda: None
        self.commits = 0
        # Read once here (no commit can run yet), then kept in memory: see the module docstring.
        try:
            self._records = {
                row[0]: checked_record(ImageRecord(*row), cache_dir)
                for row in db.execute("SELECT name, size, chunk_size, identity, base FROM images")
            }
            check_chunk_rows(db, cache_dir)
            self._digest_index = DigestIndex(
                db.execute(
                    "SELECT image, idx, digest FROM chunks WHERE state = ? AND digest IS NOT NULL",
                    (ChunkState.CLEAN,),
                )
            )
        except sqlite3.Error as exc:
            self.close()
            raise CacheError(f"cache database in {cache_dir} is unusable: {exc}") from None
        except CacheError:
            self.close()
            raise
        self._root_fd = root_fd

    # ---- opening -------------------------------------------------------------------------

    @classmethod
    def open(
        cls, cache_dir: str, *, lock: bool = True, create: bool = True,
        hooks: CacheHooks = CacheHooks(),
    ) -> CacheStore:
        """Open (and with `create`, initialise) CACHE. With `lock`, take the exclusive lock
        that keeps two mounts off one cache; CacheLocked if another process holds it."""
        cache_dir = os.path.abspath(cache_dir)
        if not os.path.isdir(cache_dir):
            if os.path.exists(cache_dir) or not create:
                raise UsageError(f"cache {cache_dir} is not a directory")
            try:
                ensure_private_dir(cache_dir)
            except OSError as exc:
                raise UsageError(f"cannot create cache {cache_dir}: {exc.strerror}") from None
        try:  # CACHE is reached through this descriptor from now on (held_path says why)
            root_fd = os.open(cache_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise UsageError(f"cache {cache_dir} cannot be opened: {exc.strerror}") from None
        try:
            store = cls._open_held(cache_dir, root_fd, lock=lock, create=create, hooks=hooks)
        except BaseException:
            os.close(root_fd)
            raise
        return store

    @classmethod
    def _open_held(
        cls, cache_dir: str, root_fd: int, *, lock: bool, create: bool, hooks: CacheHooks
    ) -> CacheStore:
        root = held_path(root_fd)
        if create and not os.access(root, os.W_OK | os.X_OK, effective_ids=True):
            raise UsageError(f"cache {cache_dir} is not writable")
        if create:
            check_new_cache(root, cache_dir)
        db_path = os.path.join(root, STATE_DB)
        if not create and not os.path.exists(db_path):
            raise UsageError(f"{cache_dir} is not a corfs cache (no {STATE_DB})")
        new = create and not is_cache_dir(root)  # check_new_cache: nothing of others' in it
        lock_fd = take_lock(root, cache_dir) if lock else None
        try:
            if create:
                log_tightened(cache_dir, tighten_private(root, cache_dir), new=new)
                # SQLite would create it 0644 (less the umask); its -wal and -shm copy its mode.
                os.close(private_open(db_path, os.O_RDWR | os.O_CREAT))
            db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=5000")
            if create:
                db.executescript(SCHEMA)
                db.execute(
                    "INSERT OR IGNORE INTO meta VALUES('schema_version', ?)", (str(SCHEMA_VERSION),)
                )
                ensure_private_dir(os.path.join(root, DATA_DIR))
                fsync_dir(root)  # state.db's name (SQLite syncs only its journals')
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()  # opens -wal, -shm
            if not _sqlite_opened_held(root):
                db.close()
                raise UsageError(f"cache {cache_dir} moved while it was opened: mount again")
        except sqlite3.Error as exc:
            if lock_fd is not None:
                os.close(lock_fd)
            shown_db = os.path.join(cache_dir, STATE_DB)
            if _disk_full(root):  # SQLite says "disk I/O error" when it cannot make its
                # WAL or shared memory file: "unusable" would invite deleting the cache
                raise CacheFull(
                    f"cache disk full: the cache database {shown_db} cannot be opened ({exc})"
                ) from None
            raise CacheError(f"cache database {shown_db} is unusable: {exc}") from None
        except OSError as exc:
            if lock_fd is not None:
                os.close(lock_fd)
            raise UsageError(f"cache {cache_dir} is not writable: {exc.strerror}") from None
        except UsageError:  # tighten_private: an entry it cannot make private, or another's
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        return cls(cache_dir, root_fd, db, lock_fd, hooks)

    def close(self) -> None:
        for data_file in self._data_files.values():
            data_file.close()
        self._data_files.clear()
        self._db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if self._root_fd is not None:
            os.close(self._root_fd)
            self._root_fd = None

    # ---- image records -------------------------------------------------------------------

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._db_lock:
            return self._db.execute(sql, args).fetchall()

    def records(self) -> list[ImageRecord]:
        return [self._records[name] for name in sorted(self._records)]

    def record_of(self, name: str) -> ImageRecord | None:
        """From memory: no lock, no SQL (Image's dedup asks on the trio thread)."""
        return self._records.get(name)

    def create_image(
        self, name: str, size: int, chunk_size: int, identity: str, base: str
    ) -> ImageRecord:
        path = self.data_path(name)
        try:
            with os.fdopen(private_open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "wb") as f:
                f.truncate(size)
                os.fsync(f.fileno())
            # The new name must survive a power cut before any chunk of it is recorded.
            fsync_dir(os.path.dirname(path))
        except OSError as exc:
            raise cache_os_error(exc, f"creating {data_path_in(self.cache_dir, name)}") from None
        with self._db_lock:
            self._db.execute("DELETE FROM chunks WHERE image = ?", (name,))
            self._db.execute(
                "INSERT OR REPLACE INTO images VALUES(?, ?, ?, ?, ?, ?)",
                (name, size, chunk_size, identity, base, time.time()),
            )
        self._digest_index.drop_image(name)
        self._crash_view.forget(name)
        record = self._records[name] = ImageRecord(name, size, chunk_size, identity, base)
        return record

    def drop_image(self, name: str, *, handed_over: bool = False) -> None:
        """Forget an image's cache (for --reset-stale): rows first, then the data file. With
        `handed_over`, the same SQL transaction marks its handoff done (the commit point of a
        live handoff: handoff.py); the data file then lives on under the handoff's DEST."""
        data_file = self._data_files.pop(name, None)
        if data_file is not None:
            data_file.close()
        for key in [key for key in self._pending if key[0] == name]:
            del self._pending[key]  # a later commit must not bring rows of it back
        self._touched.discard(name)
        self._unsynced.pop(name, None)
        with self._db_lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM chunks WHERE image = ?", (name,))
                self._db.execute("DELETE FROM images WHERE name = ?", (name,))
                if handed_over:
                    self._db.execute("UPDATE handoffs SET done = 1 WHERE name = ?", (name,))
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise _sql_error(exc, f"forgetting {name} in the cache database") from None
        self._records.pop(name, None)
        self._digest_index.drop_image(name)
        self._crash_view.forget(name)
        self.remove_data_file(name)

    def remove_data_file(self, name: str) -> None:
        """Unlink an image's data file name and make that durable (its inode may live on as
        a handoff's DEST)."""
        path = self.data_path(name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            fsync_dir(os.path.dirname(path))

    # ---- live handoffs (handoff.py) ---------------------------------------------------------

    def handoffs(self) -> list[HandoffRecord]:
        try:
            rows = self._query(
                "SELECT name, size, dest, via, qemu_path, done, at FROM handoffs ORDER BY name"
            )
        except sqlite3.OperationalError:  # a cache made before handoffs, opened read-only
            return []
        return [
            HandoffRecord(name, size, dest, via, qemu_path, bool(done), at)
            for name, size, dest, via, qemu_path, done, at in rows
        ]

    async def drop_handed_over(self, name: str) -> None:
        """The commit point of a live handoff: drop_image(handed_over=True) while no commit
        runs (one in a worker thread may hold this image's descriptor)."""
        async with self._commit_lock:
            self.drop_image(name, handed_over=True)

    def begin_handoff(self, record: HandoffRecord) -> None:
        """Journal a handoff before its first step (durable: synchronous=FULL)."""
        self._execute_durably(
            "INSERT INTO handoffs VALUES(?, ?, ?, ?, ?, 0, ?)",
            (record.name, record.size, record.dest, record.via, record.qemu_path, record.at),
        )

    def end_handoff(self, name: str) -> None:
        """Drop a handoff's row: an aborted one (rolled back), or a done one the user wants
        served from the base again (`corfs mount --forget-detached`)."""
        self._execute_durably("DELETE FROM handoffs WHERE name = ?", (name,))

    def mark_dirty(self, name: str) -> None:
        """Every clean or zero chunk of `name` becomes dirty: its data file may hold bytes
        written by QEMU outside corfs (a handoff rolled back after a crash), so neither verify
        nor a refetch may ever take the base's bytes for it."""
        self._execute_durably(
            "UPDATE chunks SET state = ?, digest = NULL WHERE image = ? AND state IN (?, ?)",
            (ChunkState.DIRTY, name, ChunkState.CLEAN, ChunkState.ZERO),
        )
        self._digest_index.drop_image(name)
        self._crash_view.all_dirty(name)

    def _execute_durably(self, sql: str, args: tuple) -> None:
        with self._db_lock:
            try:
                self._db.execute(sql, args)
            except sqlite3.Error as exc:
                raise _sql_error(exc, "writing the cache database") from None

    def load_states(self, record: ImageRecord, *, track: bool = False) -> tuple[bytearray, int]:
        """Per-chunk states of an image (one byte each) and its count of dirty chunks. With
        `track` (a mount's Image), what the database may say is kept from now on
        (`may_say_clean`)."""
        count = record.geometry.chunk_count
        states = bytearray(count)
        rows = self._query("SELECT idx, state FROM chunks WHERE image = ?", (record.name,))
        for idx, state in rows:
            if 0 <= idx < count:
                states[idx] = state
        if track:
            self._crash_view.track(record.name, states)
        return states, sum(1 for _, s in rows if s == ChunkState.DIRTY)

    def digests_of(self, name: str) -> dict[int, bytes]:
        rows = self._query(
            "SELECT idx, digest FROM chunks WHERE image = ? AND state = ?", (name, ChunkState.CLEAN)
        )
        return {idx: digest for idx, digest in rows if digest is not None}

    def find_by_digest(self, digest: bytes) -> tuple[str, int] | None:
        """A clean chunk with these bytes in any image of this cache (for dedup): committed, or
        written and marked but not committed yet (so dedup works within the commit interval).
        O(1) from memory, no lock: it never waits for a commit (digest_index.py). Callers check
        the bytes they read against the digest, so a stale answer is harmless."""
        return self._digest_index.find(digest)

    # ---- data files ----------------------------------------------------------------------

    def data_path(self, name: str) -> str:
        return data_path_in(self.root, name)

    def data_file(self, name: str) -> DataFile:
        """Image `name`'s data file, opened on first use (the one place data files are opened
        for a mount; `commit` syncs the descriptors of those touched)."""
        data_file = self._data_files.get(name)
        if data_file is None:
            record = self._records.get(name)
            if record is None:
                raise CacheError(f"{name} is not in the cache")
            from .datafile import DataFile  # the data path: offline readers never load it

            data_file = DataFile(
                self.data_path(name), name, record.geometry, self._hooks.written,
                self._after_syncs, self._sync_pending,
            )
            self._data_files[name] = data_file
        return data_file

    def data_fd(self, name: str) -> int:
        return self.data_file(name).fd

    def write_data(self, name: str, offset: int, data: bytes | memoryview) -> None:
        """A buffered write outside a mount's Image (offline tools, tests)."""
        self.data_file(name).write(offset, data)

    def read_by_digest(self, digest: bytes, length: int) -> Buffer | None:
        """Verified bytes of a clean chunk of `length` bytes with this digest, from any image
        here (dedup), in an aligned buffer so that they, too, are stored with O_DIRECT; None if
        there is none or its bytes no longer match. The length is checked too: a manifest may
        name, for a chunk, the digest of a chunk of another length (another chunk size, a
        short last chunk), and those bytes would be stored over the chunks after it."""
        found = self.find_by_digest(digest)
        if found is None:
            return None
        name, index = found
        record = self._records.get(name)
        if record is None:
            return None
        geometry = record.geometry
        if geometry.chunk_length(index) != length:
            return None
        try:
            data = self.data_file(name).read(
                geometry.chunk_start(index), geometry.chunk_length(index)
            )
        except (OSError, CacheError):
            return None
        return aligned_copy(data) if chunk_digest(data) == digest else None

    # ---- durable marks -------------------------------------------------------------------

    def record(self, name: str, idx: int, state: ChunkState, digest: bytes | None = None) -> None:
        """Queue a chunk's new state for the next commit. The caller has already written its
        bytes to the data file (the commit syncs that file before the row is written)."""
        self._pending[(name, idx)] = (int(state), digest)
        self._touched.add(name)
        if self.sync_failure is not None and state in (ChunkState.CLEAN, ChunkState.ZERO):
            self._unsynced.setdefault(name, set()).add(idx)  # no commit will sync it
        self._digest_index.set(name, idx, digest if state == ChunkState.CLEAN else None)

    def has_uncommitted_mark(self, name: str, idx: int) -> bool:
        """Whether chunk `idx` of `name` has a mark other than dirty waiting for the next
        commit (filled or forgotten since the last one: its bytes may not be synced)."""
        mark = self._pending.get((name, idx))
        return mark is not None and mark[0] != ChunkState.DIRTY

    def take_unsynced(self, name: str) -> list[int]:
        """Once a data sync failed: the chunks of `name` not asked for before whose bytes no
        successful sync covered: marked clean or zero since the last good commit (a fill), or
        dirty with no dirty row committed (a client write to a chunk absent or filled since
        then). Their bytes went to the page cache, whose writeback may have failed (Linux then
        calls the pages clean: once evicted they read what the disk holds, zeros in a hole), so
        they must not be served from the data file any more. Not a chunk with a dirty row:
        under its unsynced writes are bytes an earlier sync made durable, which a failed
        writeback leaves as they were (what a remount serves too)."""
        return sorted(self._unsynced.pop(name, ()))

    def touch(self, name: str) -> None:
        """The data file of `name` changed: the next commit must sync it."""
        self._touched.add(name)

    def may_say_clean(self, name: str, idx: int) -> bool:
        """Whether the database may say chunk `idx` of `name` is clean or zero if the daemon
        died now (crash_view.py): before a write changes its bytes, its dirty mark must be
        made durable (Image.write). For images loaded with track=True."""
        return self._crash_view.may_say_clean(name, idx)

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    async def commit(self) -> None:
        """Make every mark recorded so far durable: fdatasync, then commit the rows.

        A failed fdatasync stops all further commits (CacheError from then on): Linux reports a
        writeback error once and then marks the pages clean, so a retry could "succeed" with
        the bytes never on disk and record chunks local that are not. What was committed
        before stays true; a restart of the mount starts from there. Any other failure (the
        SQL step) puts the marks back for the next commit."""
        import trio  # see the top

        self._syncs += 1  # stream stores give way from now (`_sync_pending`)
        try:
            async with self._commit_lock:
                # No await between the snapshot and the thread: what we sync is what we snapshot.
                batch = self._take_batch()
                if batch is not None:
                    with self._keeping_marks_on_failure(batch):
                        await trio.to_thread.run_sync(self._sync_and_write, batch)
                    self._crash_view.note(batch.pending, (ChunkState.DIRTY, ChunkState.ABSENT))
        finally:
            self._syncs -= 1

    async def commit_dirty_marks(self, name: str, indexes: list[int]) -> None:
        """Make chunks `indexes` of `name` dirty in the database now, before a client write
        changes bytes it may call clean or zero (Image.write). Only these rows, without the
        data sync of a full commit (a guest's first write to each chunk of a thick image waits
        for this): a dirty mark is true of a chunk whose earlier bytes are durable whatever
        its bytes become, so it may go ahead of the data. Under the commit lock, so that no
        batch taken before (a clean mark of one of them) lands after it."""
        import trio  # see the top

        async with self._commit_lock:  # even after a sync failure: a dirty row is never wrong
            await trio.to_thread.run_sync(self._write_dirty_rows, name, indexes)
        self._crash_view.set(name, indexes, ChunkState.DIRTY)

    def _write_dirty_rows(self, name: str, indexes: list[int]) -> None:
        rows = [(ChunkState.DIRTY, name, i, ChunkState.CLEAN, ChunkState.ZERO) for i in indexes]
        with self._db_lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany(
                    "UPDATE chunks SET state = ?, digest = NULL "
                    "WHERE image = ? AND idx = ? AND state IN (?, ?)",
                    rows,
                )
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise _sql_error(exc, f"marking chunks of {name} dirty") from None

    def _sync_pending(self) -> bool:
        """A commit waits or runs (read by data-file write threads: an int, under the GIL)."""
        return self._syncs > 0

    async def _after_syncs(self) -> None:
        """Once no commit runs: stream stores wait here, so that a commit's fdatasync (a
        guest's flush) does not queue behind a stream of direct writes at the disk."""
        import trio  # see the top

        if self._commit_lock.locked():
            async with self._commit_lock:
                pass
        else:
            await trio.lowlevel.checkpoint()

    def commit_sync(self) -> None:
        """The same as `commit`, for shutdown and scrub paths outside trio."""
        batch = self._take_batch()
        if batch is not None:
            with self._keeping_marks_on_failure(batch):
                self._sync_and_write(batch)
            self._crash_view.note(batch.pending, (ChunkState.DIRTY, ChunkState.ABSENT))

    def _take_batch(self) -> _Batch | None:
        """The data files to sync and the marks to write, taken out of the queue (None when
        there is nothing to commit). CacheError once a sync has failed."""
        if self.sync_failure is not None:
            raise CacheError(self.sync_failure)
        pending, self._pending = self._pending, {}
        touched, self._touched = self._touched, set()
        fds = [self._data_files[name].fd for name in touched if name in self._data_files]
        changed = touched | {name for name, _ in pending}
        stamps = [
            (self._data_files[name].fd, self._data_files[name].mtime_ns)
            for name in changed
            if name in self._data_files
        ]
        batch = _Batch(touched, fds, pending, stamps)
        self._crash_view.note(pending, (ChunkState.CLEAN, ChunkState.ZERO))  # durable any moment
        return batch if batch.pending or batch.fds else None

    @contextlib.contextmanager
    def _keeping_marks_on_failure(self, batch: _Batch) -> Iterator[None]:
        try:
            yield
        except _SyncFailed as failed:
            self.sync_failure = (
                f"the cache disk failed to sync ({failed.cause}): nothing more is recorded "
                "as local; restart the mount"
            )
            log.error("%s", self.sync_failure)
            for marks in (batch.pending, self._pending):  # the batch's and those since
                for (name, idx), (state, _) in marks.items():
                    if state != ChunkState.ABSENT and (
                        state != ChunkState.DIRTY or not self._crash_view.says_dirty(name, idx)
                    ):
                        self._unsynced.setdefault(name, set()).add(idx)
            self.on_sync_failure()
            raise failed.cause from None
        except BaseException:
            # Not durable: put the marks back (newer marks taken meanwhile win), and the
            # files, so the next commit syncs them again.
            for key, value in batch.pending.items():
                self._pending.setdefault(key, value)
            self._touched |= batch.touched
            raise

    def _sync_and_write(self, batch: _Batch) -> None:
        started = time.monotonic()
        try:
            self._sync_and_write_rows(batch)
        finally:
            self._hooks.synced(time.monotonic() - started)

    def _sync_and_write_rows(self, batch: _Batch) -> None:
        pending = batch.pending
        try:
            for fd, mtime_ns in batch.stamps:
                with contextlib.suppress(OSError):  # a time, not data: never a sync failure
                    os.utime(fd, ns=(mtime_ns, mtime_ns))
            for fd in batch.fds:
                os.fdatasync(fd)
        except OSError as exc:
            raise _SyncFailed(cache_os_error(exc, "syncing the cache")) from None
        if not pending:
            return
        absent = [
            (name, idx) for (name, idx), (state, _) in pending.items() if state == ChunkState.ABSENT
        ]
        present = [
            (name, idx, state, digest)
            for (name, idx), (state, digest) in pending.items()
            if state != ChunkState.ABSENT
        ]
        with self._db_lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany("DELETE FROM chunks WHERE image = ? AND idx = ?", absent)
                self._db.executemany("INSERT OR REPLACE INTO chunks VALUES(?, ?, ?, ?)", present)
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise _sql_error(exc, "committing chunk state") from None
        self.commits += 1

    @cached_property
    def _commit_lock(self) -> trio.Lock:
        """Made on first use (by the trio thread): see the import of trio at the top."""
        import trio

        return trio.Lock()

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(self.commits, len(self._pending), self.sync_failure)
