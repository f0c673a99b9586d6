"""Where `corfs publish` writes: a local directory or an S3 prefix, behind one small
`Destination` protocol (exists / put / list). A directory gets each object under a temp name in
DEST/.corfs-tmp and renamed into place, synced before the manifest that names it; S3 PUTs are
whole. See publish.py for what is written."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import time
import uuid
from collections.abc import Iterator
from typing import Protocol

from .errors import CorfsError, UsageError
from .manifest import image_name_of

log = logging.getLogger(__name__)

TMP_DIR = ".corfs-tmp"
_STALE_TMP_SECONDS = 3600

# ---- destinations --------------------------------------------------------------------------


class Destination(Protocol):
    description: str

    def exists(self, key: str) -> bool: ...

    def put(self, key: str, data: bytes) -> None:
        """Store `data` at `key` whole: readers see the old object or the new, never a part."""
        ...

    def get(self, key: str) -> bytes | None: ...

    def list_manifests(self) -> dict[str, int]:
        """{manifest key: size} of the manifests at the top of DEST."""
        ...

    def sync(self) -> None:
        """Make everything put so far durable before a manifest refers to it."""
        ...


def _syncfs(fd: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) == 0:
            return
    except (OSError, AttributeError):
        pass
    os.sync()


class DirDestination:
    def __init__(self, root: str) -> None:
        self.root = root
        self.description = root
        self._tmp = os.path.join(root, TMP_DIR)

    @classmethod
    def open(cls, path: str) -> DirDestination:
        root = os.path.abspath(path)
        if os.path.exists(root) and not os.path.isdir(root):
            raise UsageError(f"destination {path} is not a directory")
        try:
            os.makedirs(os.path.join(root, TMP_DIR), exist_ok=True)
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

    def exists(self, key: str) -> bool:
        return os.path.exists(self._path(key))

    def put(self, key: str, data: bytes, *, durable: bool = False) -> None:
        path = self._path(key)
        tmp = os.path.join(self._tmp, f"{uuid.uuid4().hex}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise CorfsError(f"writing {path}: {exc.strerror}") from None
        if durable:
            dir_fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

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
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _syncfs(fd)
        finally:
            os.close(fd)


class S3Destination:
    def __init__(self, client, bucket: str, prefix: str, description: str) -> None:  # noqa: ANN001
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
        import botocore.exceptions

        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise UsageError(f"destination {url!r} names no bucket (s3://bucket/prefix)")
        prefix = prefix.strip("/")
        prefix = prefix + "/" if prefix else ""
        config = botocore.config.Config(
            max_pool_connections=max(10, connections),
            retries={"max_attempts": 5, "mode": "standard"},
        )
        try:
            session = boto3.Session(profile_name=profile, region_name=region)
            client = session.client("s3", endpoint_url=endpoint_url, config=config)
        except botocore.exceptions.BotoCoreError as exc:
            raise UsageError(f"cannot use S3 destination {url}: {exc}") from None
        dest = cls(client, bucket, prefix, f"s3://{bucket}/{prefix}")
        with dest._errors(f"bucket {bucket}"):
            client.head_bucket(Bucket=bucket)
        return dest

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        import botocore.exceptions

        try:
            yield
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "?")
            if code in ("404", "NoSuchBucket"):
                raise UsageError(f"S3 {what} does not exist ({self.description})") from None
            if code in ("403", "AccessDenied"):
                raise UsageError(f"S3 {what}: access denied ({self.description})") from None
            raise CorfsError(f"S3 {what}: {code} ({self.description})") from None
        except botocore.exceptions.NoCredentialsError:
            raise UsageError("S3: no credentials (set AWS_* variables or --profile)") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise CorfsError(f"S3 {what}: {exc}") from None

    def exists(self, key: str) -> bool:
        import botocore.exceptions

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.prefix + key)
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            with self._errors(key):
                raise
        except botocore.exceptions.BotoCoreError:
            with self._errors(key):
                raise
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
        with self._errors("listing"):
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
