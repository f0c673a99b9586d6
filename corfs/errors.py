"""The one error tree of corfs. Each class carries the errno the mount answers with and the
exit code the CLI ends with; they are translated in exactly two places, fuse_ops and cli.

    CorfsError                      EIO, exit 1
    ├── UsageError                  EINVAL, exit 2   bad arguments or paths
    ├── CacheError                  EIO, exit 3      CACHE unusable or inconsistent
    │   ├── CacheLocked             EBUSY, exit 3    another mount holds CACHE
    │   └── CacheFull               ENOSPC, exit 3
    ├── ReadOnlyError               EROFS, exit 1
    ├── ImageHandedOver             ESTALE, exit 1   its data file is QEMU's now (detach --qmp)
    ├── HandoffFailed               EIO, exit 1      a live handoff failed (rolled back, but:)
    │   └── HandoffUnconfirmed      EIO, exit 1      ... its QEMU switch failed unconfirmed:
    │                                                finished instead (DEST kept)
    ├── OutOfImageError             ENOSPC, exit 1   a write wholly past the end of an image
    ├── NotLocalError               EIO, exit 1      detach of an image that is not fully local
    ├── ControlError                EINVAL, exit 4   a control command refused, or aimed at
    │   │                                            something that is no corfs mount
    │   ├── HandoffUnderWay         EBUSY, exit 4    an image a live handoff is taking over
    │   └── ForgetRefused           ESTALE, exit 4   a bad chunk kept: the base cannot supply it
    └── BaseError                   EIO, exit 5      BASE failed
        ├── BaseUnavailable         EIO, exit 5      timed out after retries / unusable
        │   └── BaseUnreachable     EIO, exit 5      no answer (refused, DNS, timeout, 5xx)
        ├── BaseNotFound            ENOENT, exit 5
        ├── BaseAccessDenied        EACCES, exit 5
        ├── BaseChanged             ESTALE, exit 5   the base image is not the one cached
        ├── BaseCorrupt             EIO, exit 5      digest mismatch, bad manifest, short body
        │   └── BaseProtocolError   EIO, exit 5      an answer no sane server sends (absurd
        │                                            sizes, unparseable numbers, oversized body)
        ├── TransientBaseError      EIO, exit 5      worth retrying (5xx, reset, stall)
        │   └── RedirectTargetDown  EIO, exit 5      an image's redirect to another origin
        │                                            does not answer: that image's failure
        └── ChunkUnavailable        EIO, exit 5      a read's chunk: its base object or image
                                                     is gone or forbidden (never ENOENT/EACCES)
    QmpError (under CorfsError)     EIO, exit 1      QEMU's monitor unreachable or refusing
        ├── NoNodesOnPath           EIO, exit 1      QEMU has no block node on the path
        └── SwitchFailed            EIO, exit 1      a live switch failed (and was undone)
"""

from __future__ import annotations

import errno

from .printable import printable


class CorfsError(Exception):
    errno: int = errno.EIO
    exit_code: int = 1


class UsageError(CorfsError):
    errno = errno.EINVAL
    exit_code = 2


class CacheError(CorfsError):
    exit_code = 3


class CacheLocked(CacheError):
    errno = errno.EBUSY


class CacheFull(CacheError):
    errno = errno.ENOSPC


class ShortWrite(CacheFull):
    """The data file took part of a write: its first `written` bytes changed, not the rest.
    Its errno is that of the failure that stopped it (ENOSPC when the file just took no
    more)."""

    def __init__(self, message: str, errno_: int = errno.ENOSPC, written: int = 0) -> None:
        super().__init__(message)
        self.errno = errno_
        self.written = written


class ReadOnlyError(CorfsError):
    errno = errno.EROFS


class ImageHandedOver(CorfsError):
    """A live handoff made the image's data file DEST: this mount no longer serves it."""

    errno = errno.ESTALE


class HandoffFailed(CorfsError):
    """A live handoff to QEMU failed at some step; everything done was undone (but for
    HandoffUnconfirmed)."""


class HandoffUnconfirmed(HandoffFailed):
    """A live handoff's QEMU switch failed and QEMU could not be got off DEST (or could not
    be asked): the handoff was finished (DEST kept, the image no longer served), unconfirmed."""


class OutOfImageError(CorfsError):
    errno = errno.ENOSPC  # what a block device answers for a write past its end


class NotLocalError(CorfsError):
    pass


class ControlError(CorfsError):
    errno = errno.EINVAL  # the control file refuses the command written to it
    exit_code = 4


class HandoffUnderWay(ControlError):
    """A command on an image that a live handoff is taking over (handoff.py): later."""

    errno = errno.EBUSY


class ForgetRefused(ControlError):
    """A chunk that failed a scrub is kept: its base is gone or changed, so forgetting it
    would lose the only copy of its bytes."""

    errno = errno.ESTALE


class BaseError(CorfsError):
    exit_code = 5
    http_status: int | None = None  # the HTTP answer it came from, if any (metrics.py)


class BaseUnavailable(BaseError):
    pass


class BaseUnreachable(BaseUnavailable):
    """The base did not answer, or only with server failures: it may answer later. A mount
    then serves what its cache holds and keeps trying (base_images.BaseLink); anything else a
    base says (403, 404, a bad certificate) needs the user and refuses the mount."""


class BaseNotFound(BaseError):
    errno = errno.ENOENT


class BaseAccessDenied(BaseError):
    errno = errno.EACCES


class BaseChanged(BaseError):
    errno = errno.ESTALE


class BaseCorrupt(BaseError):
    pass


class BaseProtocolError(BaseCorrupt):
    """The base answered outside the protocol or our bounds: a size that does not parse or is
    absurd, a body larger than its kind can be. Not retried as transient."""


class TransientBaseError(BaseError):
    """A failure that may go away: the fetcher retries it until --io-timeout."""


class RedirectTargetDown(TransientBaseError):
    """The base answered with a redirect to another origin (a mirror, a CDN) that does not
    answer. Retried like any transient failure, but a listing leaves that one image out: the
    base itself answers, and its other images must not fail with it."""


class ChunkUnavailable(BaseError):
    """A chunk a client needs cannot be filled because the base lacks or forbids it. A
    read(2) answering ENOENT or EACCES would tell QEMU the image file is gone or forbidden;
    it is the disk's data that is missing: EIO."""


def chunk_error(error: CorfsError) -> CorfsError:
    """The error a client read or write gets for a chunk whose fill failed with `error`."""
    if isinstance(error, (BaseNotFound, BaseAccessDenied)):
        return ChunkUnavailable(str(error))
    return type(error)(str(error))


def internal_error(exc: BaseException, doing: str = "") -> CorfsError:
    """What a bug becomes where it must fail one operation, not the daemon (the caller logs
    its traceback): its type, never its repr. An exception's arguments hold whatever it was
    handed (a UnicodeEncodeError, the whole text it could not encode: a request with its
    credentials), and this text reaches the status, which other users may read."""
    return CorfsError(f"internal error{' ' + doing if doing else ''}: {type(exc).__name__}")


def leaf_error(exc: BaseException) -> CorfsError | None:
    """The CorfsError inside (possibly nested) single-member exception groups, if that is
    all there is; trio wraps errors raised inside nurseries."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, CorfsError) else None


def error_line(error: CorfsError) -> str:
    """The one line a user reads for `error`: the CLI prints it on stderr; the mount daemon
    logs it and hands it to the command waiting for it, which prints it the same way. Line
    breaks in a message from elsewhere (a path, a server, QEMU) become spaces, other control
    characters escapes."""
    return "corfs: " + printable(" ".join(str(error).splitlines()))


class QmpError(CorfsError):
    """QEMU's monitor could not be reached or refused a command; the message is QEMU's."""


class NoNodesOnPath(QmpError):
    """QEMU has no block node on the path to switch."""


class SwitchFailed(QmpError):
    """A live switch failed at a named step; what was done has been undone."""


def cache_os_error(exc: OSError, what: str) -> CacheError:
    """The error a failed file operation in CACHE becomes: CacheFull for a full disk."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return CacheFull(f"cache disk full while {what}")
    return CacheError(f"{what}: {exc.strerror}")
