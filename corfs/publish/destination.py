"""Where `corfs publish` writes: a local directory or an S3 prefix, behind one small
`Destination` protocol (holds / put / get / update / sync). See publisher.py for what is written.

One rule per kind of destination:
- A directory gets each object under a temp name in DEST/.corfs-tmp, fsynced, then renamed
  into place; `sync` fsyncs every directory that got a new name since the last one. An object
  already there is read and checked before it is trusted (a power cut between a rename and the
  writeback can leave it short or garbage; reading a local file is cheap), and fsynced as if
  it were new.
- S3: a PUT is whole, and durable once it returns, so an object there is one a PUT stored
  entirely; it is trusted as it is (checking it would download every chunk again).
  Its answers become errors by s3_errors.py, the mapper base reads use: a 403 is
  BaseAccessDenied here as there.

`update` is the one read-modify-write (index.json, which every publish into DEST extends):
two publishes running at once must not lose each other's entries. A directory takes an
exclusive flock on DEST/.corfs-tmp/index.lock around it. S3 writes it conditionally
(If-Match the ETag it read, If-None-Match: * where there was none) and on a conflict reads,
merges and tries again.

S3 needs no ListBucket permission (nor HeadBucket's): without it S3 answers 403, not 404, for
a key that is not there, so a 403 on a HEAD or GET is "not known to be there" (the object is
written, harmless: chunks are content-addressed, and a manifest is replaced anyway); a
refusal that is real shows on the PUT that follows. Only the index is written create-only
when it could not be read, so an index that exists but is unreadable is an error, never
replaced.

Modes: published objects are made to be served (by a web server, to other users' mounts), so
they are 0644 and the directories corfs creates 0755 whatever the umask (the CLI's is 077, for
the cache). Who may read them is up to DEST's own directory: an existing DEST keeps its mode.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import random
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from typing import Protocol

from ..base import describe_url, parse_s3_url
from ..errors import BaseAccessDenied, BaseChanged, BaseNotFound, CorfsError, UsageError
from ..s3_errors import refuse_blind_redirects, s3_error
from .dest_dirs import PUBLIC_DIR_MODE, TEMP_NAME, create_new, hold_tmp_dir, open_key_dir

log = logging.getLogger(__name__)

TMP_DIR = ".corfs-tmp"
INDEX_LOCK = "index.lock"  # in TMP_DIR; never removed, as a lock file must not be
_STALE_TMP_SECONDS = 3600
PUBLIC_FILE_MODE = 0o644
_TMP_DIR_MODE = 0o700  # half-written objects are nobody's business
_UPDATE_ATTEMPTS = 20  # conditional writes of index.json lost to other publishes, at most
DEFAULT_IO_TIMEOUT = 60.0  # S3: seconds without a connection or answer bytes (botocore's)
S3_ATTEMPTS = 5  # S3: attempts of each request (botocore's standard retries)
# A socket timeout past ~1e9 s overflows in the layers below (inf: an HTTPClientError that
# says nothing of why); `--io-timeout inf` asks for none, and three years is none.
_NEVER = 1e8

# ---- destinations --------------------------------------------------------------------------


class Destination(Protocol):
    description: str

    def holds(self, key: str, intact: Callable[[bytes], bool]) -> bool:
        """Whether a whole object is at `key`. Where reading it back is cheap, one for which
        `intact(its bytes)` is true; a damaged one is logged and left for `put` to replace.
        True counts as a `put` for `sync`."""
        ...

    def put(self, key: str, data: bytes) -> None:
        """Store `data` at `key` whole: readers see the old object or the new, never a part."""
        ...

    def get(self, key: str) -> bytes | None:
        """The object at `key`; None if there is none (S3: or it may not be read)."""
        ...

    def update(self, key: str, change: Callable[[bytes | None], bytes | None]) -> None:
        """Replace the object at `key` by `change(its bytes or None)` (None: leave it), with no
        other publisher's update between the read and the write: none is lost."""
        ...

    def sync(self) -> None:
        """Make everything put (or found held) so far durable, before a manifest names it."""
        ...


def _make_dirs(path: str, mode: int) -> None:
    """mkdir -p: `path` gets `mode` and the parents it creates PUBLIC_DIR_MODE, whatever the
    umask."""
    if os.path.isdir(path):
        return
    _make_dirs(os.path.dirname(path), PUBLIC_DIR_MODE)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        return  # another worker made it
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchmod(fd, mode)  # mkdir's mode went through the umask; never through a link
    finally:
        os.close(fd)


def _close_all(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


class DirDestination:
    def __init__(self, root: str) -> None:
        self.root = root
        self.description = root
        self._tmp = os.path.join(root, TMP_DIR)
        # Held by descriptor, as the key directories below (dest_dirs.py); DEST itself is
        # the user's name, followed where it is a link.
        self._root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._tmp_fd = hold_tmp_dir(self._tmp)
        except BaseException:
            os.close(self._root_fd)
            raise
        self.close = weakref.finalize(self, _close_all, self._root_fd, self._tmp_fd)
        self._unsynced_dirs: set[tuple[str, ...]] = set()  # those that got a name since `sync`
        self._dirs_lock = threading.Lock()  # puts run in worker threads

    @classmethod
    def open(cls, path: str) -> DirDestination:
        if not path:  # abspath('') is the current directory: an unset "$DEST" in a script
            raise UsageError("the destination is empty: name a directory or s3://bucket/prefix")
        root = os.path.abspath(path)
        if os.path.exists(root) and not os.path.isdir(root):
            raise UsageError(f"destination {path} is not a directory")
        try:
            _make_dirs(root, PUBLIC_DIR_MODE)
            _make_dirs(os.path.join(root, TMP_DIR), _TMP_DIR_MODE)  # (a link: refused below)
        except OSError as exc:
            raise UsageError(f"destination {path} is not writable: {exc.strerror}") from None
        try:
            dest = cls(root)  # and whether the temp dir is writable (dest_dirs.py)
        except OSError as exc:
            raise UsageError(f"destination {path}: {exc.strerror}") from None
        dest._remove_stale_tmp()
        return dest

    def _remove_stale_tmp(self) -> None:
        """Temp files of runs that were killed; a concurrent run's are younger than this. Only
        files named as ours: whatever else is there is left alone."""
        cutoff = time.time() - _STALE_TMP_SECONDS
        with os.scandir(self._tmp_fd) as entries:
            for entry in entries:
                if not TEMP_NAME.fullmatch(entry.name):
                    continue
                with contextlib.suppress(OSError):
                    if (
                        entry.is_file(follow_symlinks=False)
                        and entry.stat(follow_symlinks=False).st_mtime < cutoff
                    ):
                        os.unlink(entry.name, dir_fd=self._tmp_fd)

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *key.split("/"))

    def _note_name(self, key: str) -> None:
        """`key` got a name, perhaps in directories just made: `sync` fsyncs all of them."""
        parts = tuple(key.split("/")[:-1])
        with self._dirs_lock:
            for depth in range(len(parts) + 1):
                self._unsynced_dirs.add(parts[:depth])

    def _open_object(self, key: str) -> int:
        """The object at `key`, read-only, through the key's directories by descriptor (as
        `put` writes it: review, a link at DEST/chunks showed objects that put refuses);
        FileNotFoundError where it is not, ELOOP where it is a link."""
        *parts, leaf = key.split("/")
        key_dir = open_key_dir(self._root_fd, self.root, parts, make=False)
        try:
            return os.open(leaf, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=key_dir)
        finally:
            os.close(key_dir)

    def holds(self, key: str, intact: Callable[[bytes], bool]) -> bool:
        path = self._path(key)
        try:
            with open(self._open_object(key), "rb") as f:
                data = f.read()
                if not intact(data):
                    log.warning("%s is damaged (%d bytes): writing it again", path, len(data))
                    return False
                os.fsync(f.fileno())  # a killed run's, maybe never synced: as if it were new
        except FileNotFoundError:
            return False
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return False  # a link where an object belongs: `put` replaces it
            raise CorfsError(f"reading {path}: {exc.strerror}") from None
        self._note_name(key)
        return True

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = f"{uuid.uuid4().hex}.tmp"  # in the held temp dir
        try:
            fd = create_new(tmp, self._tmp_fd)
            try:
                os.fchmod(fd, PUBLIC_FILE_MODE)  # os.open's mode went through the umask
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)  # before the rename: the name never points at unwritten blocks
            finally:
                os.close(fd)
            *parts, leaf = key.split("/")
            key_dir = open_key_dir(self._root_fd, self.root, parts)
            try:
                os.replace(tmp, leaf, src_dir_fd=self._tmp_fd, dst_dir_fd=key_dir)
            finally:
                os.close(key_dir)
        except (OSError, CorfsError) as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self._tmp_fd)
            if isinstance(exc, CorfsError):
                raise
            raise CorfsError(f"writing {path}: {exc.strerror}") from None
        self._note_name(key)

    def get(self, key: str) -> bytes | None:
        try:
            with open(self._open_object(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CorfsError(f"{self._path(key)} is a link: refused") from None
            raise CorfsError(f"reading {self._path(key)}: {exc.strerror}") from None

    def update(self, key: str, change: Callable[[bytes | None], bytes | None]) -> None:
        lock = os.path.join(self._tmp, INDEX_LOCK)  # for messages: opened in the held dir
        try:
            flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(INDEX_LOCK, flags, 0o600, dir_fd=self._tmp_fd)
        except OSError as exc:
            raise CorfsError(f"opening {lock}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held a moment: a read, a small write
            new = change(self.get(key))
            if new is not None:
                self.put(key, new)
                # Its new name durable before the run ends: nothing lists DEST to mend a lost
                # entry later (each run adds only its own).
                self.sync()
        finally:
            os.close(fd)  # releases the lock

    def sync(self) -> None:
        with self._dirs_lock:
            dirs, self._unsynced_dirs = self._unsynced_dirs, set()
        try:
            for parts in sorted(dirs, key=len, reverse=True):  # deeper first, DEST itself last
                fd = open_key_dir(self._root_fd, self.root, list(parts), make=False)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            with self._dirs_lock:
                self._unsynced_dirs |= dirs
            raise CorfsError(f"syncing {self.root}: {exc.strerror}") from None


class S3Destination:
    def __init__(self, client, bucket: str, prefix: str, description: str) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix
        self.description = description

    @classmethod
    def open(
        cls,
        url: str,
        *,
        endpoint_url: str | None,
        region: str | None,
        profile: str | None,
        connections: int,
        io_timeout: float,
    ) -> S3Destination:
        import boto3
        import botocore.config

        bucket, prefix = parse_s3_url(url, "destination")
        prefix = prefix.strip("/")
        prefix = prefix + "/" if prefix else ""
        config = botocore.config.Config(
            max_pool_connections=max(10, connections),
            retries={"max_attempts": S3_ATTEMPTS, "mode": "standard"},
            # botocore's timeouts are per connect and per socket read: a stalled endpoint
            # held each request 60 s an attempt (5 minutes a chunk) whatever the user needed
            connect_timeout=min(io_timeout, _NEVER),
            read_timeout=min(io_timeout, _NEVER),
        )
        description = f"s3://{bucket}/{prefix}"
        try:
            session = boto3.Session(profile_name=profile, region_name=region)
            client = session.client("s3", endpoint_url=endpoint_url, config=config)
            refuse_blind_redirects(client)
        except Exception as exc:  # botocore.exceptions.ProfileNotFound and friends
            raise s3_error(exc, description) from None
        dest = cls(client, bucket, prefix, description)
        try:
            with dest._errors(""):
                client.head_bucket(Bucket=bucket)
        except BaseNotFound:  # the command line named it: publish does not create buckets
            raise UsageError(f"S3 bucket {bucket} does not exist ({description})") from None
        except BaseAccessDenied:  # HeadBucket needs ListBucket: the writes will tell
            log.debug("%s: may not check the bucket (no ListBucket): going on", description)
        return dest

    @contextlib.contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        """S3's answers about `key` as the error tree, by the one mapper (s3_errors.py)."""
        try:
            yield
        except CorfsError:
            raise
        except Exception as exc:
            raise s3_error(exc, self.description + key) from None

    def holds(self, key: str, intact: Callable[[bytes], bool]) -> bool:
        # A PUT is whole (see the module docstring): no need, and no cheap way, to read it back.
        return self.exists(key)

    def exists(self, key: str) -> bool:
        """Whether `key` is known to be there: a 403 may be a missing key (no ListBucket)."""
        try:
            with self._errors(key):
                self.client.head_object(Bucket=self.bucket, Key=self.prefix + key)
        except (BaseNotFound, BaseAccessDenied):
            return False
        return True

    def put(self, key: str, data: bytes) -> None:
        with self._errors(key):
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data)

    def get(self, key: str) -> bytes | None:
        return self._get_tagged(key)[0]

    def _get_tagged(self, key: str) -> tuple[bytes | None, str | None, bool]:
        """(bytes, ETag, refused): (None, None, False) if there is none, (None, None, True)
        on a 403 (a missing key without ListBucket, or one we may not read)."""
        try:
            with self._errors(key):
                answer = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)
                return answer["Body"].read(), answer["ETag"], False
        except BaseNotFound:
            return None, None, False
        except BaseAccessDenied:
            return None, None, True

    def update(self, key: str, change: Callable[[bytes | None], bytes | None]) -> None:
        from botocore.exceptions import ParamValidationError  # boto3 is optional

        lost_a_race = False  # a 412 came: the object exists now, whatever a 403 said before
        for attempt in range(_UPDATE_ATTEMPTS):
            old, etag, refused = self._get_tagged(key)
            if refused and lost_a_race:  # it is there and may not be read: never replace it
                raise BaseAccessDenied(
                    f"{self.description}{key} exists but may not be read: not replacing it"
                )
            new = change(old)
            if new is None:
                return
            # Written only if it is still what we read: another publish's update in between
            # makes S3 refuse (412, or 409 for two at once) and we merge again.
            condition = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}
            try:
                with self._errors(key):
                    try:
                        self.client.put_object(
                            Bucket=self.bucket, Key=self.prefix + key, Body=new, **condition
                        )
                    except ParamValidationError:  # a botocore from before S3 had them (2024)
                        log.warning("%s%s: this botocore cannot write conditionally; a "
                                    "publish running at once may drop this entry",
                                    self.description, key)
                        self.put(key, new)
                return
            except BaseChanged:  # someone else's update came first: read it and merge
                lost_a_race = True
            except CorfsError as exc:
                status = getattr(exc, "http_status", None)
                if status == 501:  # an S3-compatible store without conditional writes
                    log.warning("%s%s: the endpoint cannot write conditionally (%s); a "
                                "publish running at once may drop this entry",
                                self.description, key, exc)
                    self.put(key, new)
                    return
                if status != 409:  # 409: a conditional write of it was in flight; wait
                    raise
                time.sleep(random.uniform(0.05, 0.1) * 2 ** min(attempt, 4))
        raise CorfsError(
            f"{self.description}{key}: changed by other publishes {_UPDATE_ATTEMPTS} times "
            "while this one updated it; run publish again"
        )

    def sync(self) -> None:
        pass  # a PUT that returned is durable


def open_destination(
    dest: str,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    profile: str | None = None,
    connections: int = 10,
    io_timeout: float = DEFAULT_IO_TIMEOUT,
) -> Destination:
    if dest.startswith("s3://"):
        return S3Destination.open(
            dest,
            endpoint_url=endpoint_url,
            region=region,
            profile=profile,
            connections=connections,
            io_timeout=io_timeout,
        )
    if "://" in dest:
        raise UsageError(
            f"cannot publish to {describe_url(dest)}: use a directory or s3://bucket/prefix"
        )
    return DirDestination.open(dest)
