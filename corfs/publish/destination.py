"""Where `corfs publish` writes: a local directory or an S3 prefix, behind one small
`Destination` protocol (holds / put / get / list / sync). See publisher.py for what is written.

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

Modes: published objects are made to be served (by a web server, to other users' mounts), so
they are 0644 and the directories corfs creates 0755 whatever the umask (the CLI's is 077, for
the cache). Who may read them is up to DEST's own directory: an existing DEST keeps its mode.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Protocol

from ..durable import fsync_dir
from ..errors import BaseNotFound, CorfsError, UsageError
from ..manifest import image_name_of
from ..s3_errors import s3_error

log = logging.getLogger(__name__)

TMP_DIR = ".corfs-tmp"
_STALE_TMP_SECONDS = 3600
PUBLIC_FILE_MODE = 0o644
PUBLIC_DIR_MODE = 0o755
_TMP_DIR_MODE = 0o700  # half-written objects are nobody's business

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

    def get(self, key: str) -> bytes | None: ...

    def list_manifests(self) -> dict[str, int]:
        """{manifest key: size} of the manifests at the top of DEST."""
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
    os.chmod(path, mode)  # mkdir's mode went through the umask


class DirDestination:
    def __init__(self, root: str) -> None:
        self.root = root
        self.description = root
        self._tmp = os.path.join(root, TMP_DIR)
        self._unsynced_dirs: set[str] = set()  # directories that got a name since `sync`
        self._dirs_lock = threading.Lock()  # puts run in worker threads

    @classmethod
    def open(cls, path: str) -> DirDestination:
        root = os.path.abspath(path)
        if os.path.exists(root) and not os.path.isdir(root):
            raise UsageError(f"destination {path} is not a directory")
        try:
            _make_dirs(root, PUBLIC_DIR_MODE)
            _make_dirs(os.path.join(root, TMP_DIR), _TMP_DIR_MODE)
            probe = os.path.join(root, TMP_DIR, f"probe-{uuid.uuid4().hex}")
            with open(probe, "wb"):
                pass
            os.unlink(probe)
        except OSError as exc:
            raise UsageError(f"destination {path} is not writable: {exc.strerror}") from None
        dest = cls(root)
        dest._remove_stale_tmp()
        return dest

    def _remove_stale_tmp(self) -> None:
        """Temp files of runs that were killed; a concurrent run's are younger than this."""
        cutoff = time.time() - _STALE_TMP_SECONDS
        with os.scandir(self._tmp) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *key.split("/"))

    def _note_name(self, path: str) -> None:
        """`path` got a name, perhaps in directories just made: `sync` fsyncs all of them."""
        with self._dirs_lock:
            parent = os.path.dirname(path)
            while len(parent) >= len(self.root):
                self._unsynced_dirs.add(parent)
                parent = os.path.dirname(parent)

    def holds(self, key: str, intact: Callable[[bytes], bool]) -> bool:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                data = f.read()
                if not intact(data):
                    log.warning("%s is damaged (%d bytes): writing it again", path, len(data))
                    return False
                os.fsync(f.fileno())  # a killed run's, maybe never synced: as if it were new
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise CorfsError(f"reading {path}: {exc.strerror}") from None
        self._note_name(path)
        return True

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = os.path.join(self._tmp, f"{uuid.uuid4().hex}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.fchmod(fd, PUBLIC_FILE_MODE)  # os.open's mode went through the umask
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)  # before the rename: the name never points at unwritten blocks
            finally:
                os.close(fd)
            _make_dirs(os.path.dirname(path), PUBLIC_DIR_MODE)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise CorfsError(f"writing {path}: {exc.strerror}") from None
        self._note_name(path)

    def get(self, key: str) -> bytes | None:
        try:
            with open(self._path(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CorfsError(f"reading {self._path(key)}: {exc.strerror}") from None

    def list_manifests(self) -> dict[str, int]:
        found = {}
        with os.scandir(self.root) as entries:
            for entry in entries:
                if image_name_of(entry.name) is not None and entry.is_file():
                    found[entry.name] = entry.stat().st_size
        return found

    def sync(self) -> None:
        with self._dirs_lock:
            dirs, self._unsynced_dirs = self._unsynced_dirs, set()
        try:
            for path in sorted(dirs, reverse=True):  # deeper ones first, DEST itself last
                fsync_dir(path)
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
    ) -> S3Destination:
        import boto3
        import botocore.config

        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise UsageError(f"destination {url!r} names no bucket (s3://bucket/prefix)")
        prefix = prefix.strip("/")
        prefix = prefix + "/" if prefix else ""
        config = botocore.config.Config(
            max_pool_connections=max(10, connections),
            retries={"max_attempts": 5, "mode": "standard"},
        )
        description = f"s3://{bucket}/{prefix}"
        try:
            session = boto3.Session(profile_name=profile, region_name=region)
            client = session.client("s3", endpoint_url=endpoint_url, config=config)
        except Exception as exc:  # botocore.exceptions.ProfileNotFound and friends
            raise s3_error(exc, description) from None
        dest = cls(client, bucket, prefix, description)
        try:
            with dest._errors(""):
                client.head_bucket(Bucket=bucket)
        except BaseNotFound:  # the command line named it: publish does not create buckets
            raise UsageError(f"S3 bucket {bucket} does not exist ({description})") from None
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
        try:
            with self._errors(key):
                self.client.head_object(Bucket=self.bucket, Key=self.prefix + key)
        except BaseNotFound:
            return False
        return True

    def put(self, key: str, data: bytes) -> None:
        with self._errors(key):
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data)

    def get(self, key: str) -> bytes | None:
        if not self.exists(key):
            return None
        with self._errors(key):
            return self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"].read()

    def list_manifests(self) -> dict[str, int]:
        found = {}
        with self._errors(""):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix, Delimiter="/"
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(self.prefix) :]
                    if image_name_of(key) is not None:
                        found[key] = obj["Size"]
        return found

    def sync(self) -> None:
        pass  # a PUT that returned is durable


def open_destination(
    dest: str,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    profile: str | None = None,
    connections: int = 10,
) -> Destination:
    if dest.startswith("s3://"):
        return S3Destination.open(
            dest,
            endpoint_url=endpoint_url,
            region=region,
            profile=profile,
            connections=connections,
        )
    if "://" in dest:
        raise UsageError(f"cannot publish to {dest!r}: use a directory or s3://bucket/prefix")
    return DirDestination.open(dest)
