"""The cache directory (CACHE): the names of its files, where an image's data file lives, and
the modes that keep all of it private to its owner.

Its layout (the names: the constants below, named nowhere else):
    corfs.lock            flock: one mount (or offline writer) at a time
    state.db              images(name, size, chunk_size, identity, ...) and chunks(image, idx,
                          state, digest); a chunk that has no row is absent;
                          handoffs(name, dest, ...): images handed over to QEMU live
                          (`corfs detach --qmp/--virsh`): under way (a journal for
                          recovery, handoff.py) or done (never served again)
    data/<name>           sparse data file of the image's full size; a fully local image *is*
                          its raw file (<name>: data_file_name, within NAME_MAX)
    mountpoint            where the live mount is (for `corfs status CACHE`)
    trace.json            chunk order recorded with --record-trace

Privacy: CACHE holds the guest's bytes and the base's identity, so it is its owner's alone:
the directory and every directory in it 0700, every file 0600 (state.db's -wal and -shm take
state.db's mode from SQLite). Everything in CACHE is created through `private_open` /
`ensure_private_dir`, whose modes do not depend on the caller's umask; a mount tightens a cache
made looser before (`tighten_private`). A mount refuses a CACHE holding anything another user
(root aside) owns: while it was open to others they could plant files, directories or
symbolic links in it (a `mountpoint.tmp` pointing at one of the user's files was overwritten
at mount), and as their owner could open them again after any chmod. `private_open` does not
follow a symbolic link either. A directory that is no cache yet must hold nothing but what a
first mount cut short leaves (`check_new_cache`): the walk would make a stranger's files
private too.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
from urllib.parse import quote

from .durable import fsync_dir
from .errors import UsageError

log = logging.getLogger(__name__)

# ---- the layout of CACHE: the one place that names its files (see the module docstring) ----
LOCK_FILE = "corfs.lock"
STATE_DB = "state.db"
DATA_DIR = "data"
MOUNTPOINT_FILE = "mountpoint"
TRACE_FILE = "trace.json"


def is_cache_dir(path: str) -> bool:
    """Whether PATH is a corfs cache already initialised (checked without creating anything)."""
    return os.path.exists(os.path.join(path, STATE_DB))


# What a cache that has no STATE_DB yet may hold (one whose first mount was cut short), and
# the directory a file system's root comes with.
_NAMES_BEFORE_STATE_DB = (LOCK_FILE, STATE_DB, DATA_DIR, MOUNTPOINT_FILE, TRACE_FILE, "lost+found")


def _ours_before_state_db(cache_dir: str, name: str) -> bool:
    """Whether entry `name` of a CACHE with no STATE_DB yet may be there: corfs's own, or a
    log file (--log-file CACHE/corfs.log is opened before the cache is)."""
    if name.removesuffix(".tmp") in _NAMES_BEFORE_STATE_DB or name.startswith(f"{STATE_DB}-"):
        return True  # STATE_DB's -wal, -shm, -journal
    path = os.path.join(cache_dir, name)
    return name.endswith(".log") and os.path.isfile(path) and not os.path.islink(path)


def check_new_cache(cache_dir: str, shown: str | None = None) -> None:
    """UsageError if CACHE is not a corfs cache yet holds files corfs did not make: its first
    mount would make all of them private (chmod go-rwx, recursively: CACHE=/var/cache, or a
    home directory) and write its files among them. `shown`: CACHE as the user named it, for
    the message (cache_dir may be a held_path)."""
    if is_cache_dir(cache_dir):
        return
    try:
        names = os.listdir(cache_dir)
    except OSError:
        return  # the opening that follows says why it cannot use it
    foreign = sorted(name for name in names if not _ours_before_state_db(cache_dir, name))
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise UsageError(
            f"cache {shown or cache_dir} is not a corfs cache and not empty (it holds "
            f"{foreign[0]!r}"
            f"{more}): name an empty or new directory"
        )


def recorded_mountpoint(cache_dir: str) -> str | None:
    """Where the mount of CACHE said it is (MOUNTPOINT_FILE), or None; whether that mount
    still runs is for the lock to say (cache_files.is_locked)."""
    try:
        with open(os.path.join(cache_dir, MOUNTPOINT_FILE)) as f:
            # As written, not strip()ped: a mountpoint may end in a space or a newline.
            return f.read() or None
    except OSError:
        return None


# ---- private files ---------------------------------------------------------------------------
# The one place that decides the modes of what is in CACHE (see the module docstring).

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
_GROUP_OTHER = 0o077
PRIVATE_UMASK = _GROUP_OTHER  # the CLI's and the daemon's: no file of theirs open to others


def held_path(fd: int) -> str:
    """A path to the file or directory open as `fd` that no rename and no symbolic link can
    re-point: the kernel resolves /proc/self/fd/N to the open file itself. A mount reaches CACHE
    only through it once CACHE was checked (CacheStore.open): a name of CACHE that another
    user controls (a link of theirs in /tmp, a parent directory of theirs) could otherwise
    be pointed at a directory of theirs mid-mount, whose data/IMAGE links to a file of the
    user's, and the next store would write that file."""
    return f"/proc/self/fd/{fd}"


def private_open(path: str, flags: int, *, dir_fd: int | None = None) -> int:
    """os.open of a file in CACHE (or of a detached image); one it creates is 0600 whatever
    the umask (a umask only takes bits away from the mode given). Never through a symbolic
    link (ELOOP): one planted in CACHE would have its target truncated and written."""
    flags |= os.O_CLOEXEC | os.O_NOFOLLOW
    return os.open(path, flags, PRIVATE_FILE_MODE, dir_fd=dir_fd)


def ensure_private_dir(path: str) -> None:
    """Create a directory of CACHE (0700 whatever the umask) unless it is there already, and
    its missing parents as mkdir -p does (their mode the umask's); each new name is made
    durable in its parent, or a power cut could take CACHE/data away under chunks recorded
    local."""
    _make_dir_durably(os.path.abspath(path), PRIVATE_DIR_MODE)


def _make_dir_durably(path: str, mode: int) -> None:
    parent = os.path.dirname(path)
    if os.path.isdir(path) or parent == path:
        return
    if not os.path.lexists(parent):  # a file there: mkdir below says "Not a directory"
        _make_dir_durably(parent, 0o777)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        if os.path.isdir(path):  # made meanwhile by another
            return
        raise
    try:
        fsync_dir(parent)
    except PermissionError:  # a parent we may write but not read (mode -wx): as before
        log.debug("cannot sync %s (not readable): %s is not durable yet", parent, path)


def tighten_private(cache_dir: str, shown: str | None = None) -> list[str]:
    """Take group and other permissions off CACHE and everything in it (a cache made by an
    older corfs, or copied with a loose umask); what changed, as "path 0644->0600" with paths
    relative to CACHE. UsageError if any of it belongs to another user (see the module
    docstring). Symbolic links of the user's own are left alone (their mode means nothing;
    never follow). `shown`: CACHE as the user named it, for messages (cache_dir may be a
    held_path: the directory that was opened, whatever its name names meanwhile)."""
    changed = []
    user = os.geteuid()

    def relative(path: str) -> str:
        return os.path.relpath(path, cache_dir)

    def named(path: str) -> str:  # as the user would name it
        return os.path.normpath(os.path.join(shown or cache_dir, relative(path)))

    def tighten(path: str, follow: bool = False) -> None:
        st = os.stat(path, follow_symlinks=follow)
        if st.st_uid not in (user, 0):  # root's: no other user could have planted it
            raise UsageError(
                f"cache {shown or cache_dir}: {named(path)} belongs to uid {st.st_uid}, not to "
                f"uid {user} who mounts: a cache must be its user's alone (remove it, or chown "
                "the cache)"
            )
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode) or not mode & _GROUP_OTHER:
            return
        try:
            os.chmod(path, mode & ~_GROUP_OTHER)
        except OSError as exc:  # another user's file in CACHE: refuse rather than expose it
            raise UsageError(
                f"cannot make {named(path)} private to its owner: {exc.strerror}"
            ) from None
        kind = "/" if stat.S_ISDIR(st.st_mode) else ""
        changed.append(f"{relative(path)}{kind} {mode:04o}->{mode & ~_GROUP_OTHER:04o}")

    # CACHE itself may be named through a symbolic link (to a cache on another disk, or a
    # held_path): the directory it names is the one to make private.
    tighten(cache_dir, follow=True)
    for top, dirs, files in os.walk(cache_dir):  # os.walk does not follow links to dirs
        for name in dirs + files:
            tighten(os.path.join(top, name))
    return changed


def log_tightened(cache_dir: str, changed: list[str], *, new: bool = False) -> None:
    """Say what was made private: a warning for a cache in use (another user may hold one of
    its files open), news for a new one (an empty directory made with mkdir is 0755: nobody
    could have opened anything in it, and a warning at every first mount was noise)."""
    if changed and new:
        log.info("new cache %s made private to its owner (%s)", cache_dir, ", ".join(changed))
    elif changed:
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        log.warning(
            "cache %s was open to other users; made it private to its owner (a file another "
            "user opened before stays open to them: start the cache anew if one may have): %s%s",
            cache_dir,
            ", ".join(changed[:5]),
            more,
        )


_NAME_MAX = 255  # bytes in a file name on every file system a cache is likely to live on
_LONG_NAME_KEEP = 200  # characters of the quoted name kept before the digest


def data_file_name(image: str) -> str:
    """The data file's name: the image name %-quoted (readable, and what every cache before
    long names used: old caches keep their files), or for a name whose quoted form exceeds
    NAME_MAX (a 200-byte UTF-8 name quotes to 600) a prefix of it plus "%~" and a SHA-256 of
    the name. "%~" never occurs in quoted output, so the two forms cannot collide; the digest
    is cryptographic because a hostile base could otherwise craft two names sharing a file."""
    quoted = quote(image, safe="") or "%00"
    if len(quoted) <= _NAME_MAX:
        return quoted
    prefix = re.sub(r"%[0-9A-F]?$", "", quoted[:_LONG_NAME_KEEP])  # no cut escape
    digest = hashlib.sha256(image.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return f"{prefix}%~{digest}"


def data_path_in(cache_dir: str, name: str) -> str:
    """Where CACHE keeps image `name`'s data file (the one place that says)."""
    return os.path.join(cache_dir, DATA_DIR, data_file_name(name))
