"""What the mount answers to operations it does not carry out: an error naming why, never a
success that changed nothing."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from tests.mounting import make_image

from .util import MIB


def test_chmod_and_chown_are_refused_unless_they_change_nothing(tmp_dirs):
    """The mode and owner of an image are the mount's (--mode, --owner): a chmod or chown
    that would change them answered success and changed nothing (a VM manager then believed
    QEMU's user could open the image)."""
    make_image(tmp_dirs.base / "a.raw", MIB, seed=121)
    with tmp_dirs.mount("--no-stream") as m:
        image = m.mnt / "a.raw"
        st = image.stat()
        with pytest.raises(PermissionError) as info:
            os.chmod(image, 0o600)
        assert info.value.errno == errno.EPERM
        with pytest.raises(PermissionError) as info:
            os.chown(image, st.st_uid + 1, -1)
        assert info.value.errno == errno.EPERM
        with pytest.raises(PermissionError) as info:
            os.chown(image, -1, st.st_gid + 1)
        assert info.value.errno == errno.EPERM
        after = image.stat()
        assert (after.st_mode, after.st_uid, after.st_gid) == (st.st_mode, st.st_uid, st.st_gid)
        os.chmod(image, stat.S_IMODE(st.st_mode))  # no change: fine (cp -p, install -m)
        os.chown(image, st.st_uid, st.st_gid)
        m.stop()


def test_names_cannot_be_made_or_removed(tmp_dirs):
    """The images are the base's: creating, removing or renaming a name is not permitted
    (EPERM), not "Function not implemented" (ENOSYS), which reads as a broken system."""
    make_image(tmp_dirs.base / "a.raw", MIB, seed=122)
    with tmp_dirs.mount("--no-stream") as m:
        image, new = m.mnt / "a.raw", m.mnt / "new.raw"
        attempts = {
            "create": lambda: os.close(os.open(new, os.O_CREAT | os.O_WRONLY, 0o644)),
            "mknod": lambda: os.mkfifo(new),
            "mkdir": lambda: os.mkdir(new),
            "symlink": lambda: os.symlink("a.raw", new),
            "link": lambda: os.link(image, new),
            "unlink": lambda: os.unlink(image),
            "rename": lambda: os.rename(image, new),
            "rmdir": lambda: os.rmdir(image),
        }
        answers = {}
        for name, attempt in attempts.items():
            try:
                attempt()
                answers[name] = 0
            except OSError as exc:
                answers[name] = exc.errno
        want = {name: errno.EPERM for name in attempts}
        want["rmdir"] = errno.ENOTDIR  # the kernel's answer: a.raw is no directory
        assert answers == want
        assert os.listdir(m.mnt) == ["a.raw"]
        m.stop()


def test_xattr_names_that_are_no_status_page_are_enodata(tmp_dirs):
    """'²' passes str.isdigit() but not int(): the page number of a status xattr named so
    raised ValueError inside the handler (EIO, and a traceback in the log per request, from
    any user who can reach the mount)."""
    make_image(tmp_dirs.base / "a.raw", MIB, seed=123)
    with tmp_dirs.mount("--no-stream") as m:
        for name in ("user.corfs.status.\u00b2", "user.corfs.status.\u0661",
                     "user.corfs.status.x", "user.other"):
            with pytest.raises(OSError) as info:
                os.getxattr(m.mnt, name)
            assert info.value.errno == errno.ENODATA, name
        assert os.getxattr(m.mnt, "user.corfs.status.1")  # a page: ASCII digits
        assert "Traceback" not in m.log_text()
        m.stop()


@pytest.mark.parametrize(
    "command",
    [
        b'{"op": "bandwidth", "rate": 1e999}',  # int(inf): OverflowError
        b'{"op": "forget", "image": "a.raw", "chunks": [1e999]}',
        b"[" * 60_000,  # json.loads: RecursionError (an xattr value is at most 64 KiB)
    ],
    ids=["rate-inf", "chunk-inf", "nested"],
)
def test_a_malformed_control_command_is_einval(tmp_dirs, command):
    """Refused as a bad command (EINVAL, one log line), not an internal error (EIO, a
    traceback in the log)."""
    make_image(tmp_dirs.base / "a.raw", MIB, seed=124)
    with tmp_dirs.mount("--no-stream") as m:
        with pytest.raises(OSError) as info:
            os.setxattr(m.mnt, "user.corfs.control", command)
        assert info.value.errno == errno.EINVAL
        assert "Traceback" not in m.log_text()
        m.stop()
