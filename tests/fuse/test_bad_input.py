"""Issue 2, point 11: bad input. Each case ends with one clear line on stderr (no traceback),
a non-zero exit, and nothing in BASE or CACHE changed. Also: which base entries are exposed
(symlinks inside BASE yes; symlinks leading out, devices and fifos no)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.mounting import (
    CorfsMount,
    corfs_command,
    corfs_env,
    is_mounted,
    lazy_unmount,
    make_image,
    mount_path,
    mount_table,
    run_corfs,
)

from .util import MIB, assert_one_line_error, snapshot

NOBODY = 65534


@pytest.fixture
def dirs(tmp_dirs):
    make_image(tmp_dirs.base / "a.raw", MIB, seed=91)
    yield tmp_dirs
    lazy_unmount(tmp_dirs.mnt)  # a mount that wrongly came up must not stay


def _mount_fails(base, cache, mnt, *needles, watch=(), env=None):
    """`corfs mount BASE CACHE MNT` fails in one line and changes nothing in `watch`."""
    before, mounts = snapshot(*watch), _mounts_at(mnt)
    result = run_corfs("mount", base, cache, mnt, "--no-stream", timeout=20, env=env)
    line = assert_one_line_error(result, *needles)
    assert snapshot(*watch) == before, "a failed mount changed BASE or CACHE"
    assert _mounts_at(mnt) == mounts, "a failed mount mounted something"
    return line


def _mounts_at(mnt):
    target = mount_path(mnt)
    return [entry for entry in mount_table() if entry[0] == target]


def test_base_missing(dirs, tmp_path):
    _mount_fails(
        tmp_path / "no-such-base", dirs.cache, dirs.mnt, "no-such-base", watch=(dirs.cache,)
    )


def test_base_not_a_directory(dirs):
    _mount_fails(
        dirs.base / "a.raw",
        dirs.cache,
        dirs.mnt,
        "a.raw",
        "not a directory",
        watch=(dirs.base, dirs.cache),
    )


def test_a_ca_file_that_is_no_regular_file_is_one_line(dirs, tmp_path):
    """A FIFO as --ca-file held `corfs mount` for ever, reading the CA."""
    fifo = tmp_path / "ca.fifo"
    os.mkfifo(fifo)
    before = _mounts_at(dirs.mnt)
    result = run_corfs("mount", "https://127.0.0.1:9/images/", dirs.cache, dirs.mnt,
                       "--ca-file", fifo, timeout=20)
    assert_one_line_error(result, "--ca-file", "regular file")
    assert result.returncode == 2
    assert _mounts_at(dirs.mnt) == before
    result = run_corfs("mount", "https://127.0.0.1:9/images/", dirs.cache, dirs.mnt,
                       "--ca-file", tmp_path / "no-such-ca.pem", timeout=20)
    assert_one_line_error(result, "no-such-ca.pem", "No such file")


def test_cache_is_a_file(dirs, tmp_path):
    cache = tmp_path / "cache-file"
    cache.write_bytes(b"not a cache")
    _mount_fails(dirs.base, cache, dirs.mnt, "cache-file", watch=(dirs.base, cache))


@pytest.fixture
def read_only_tmpfs(tmp_path):
    """A tmpfs holding an empty `cache/` dir, remounted read-only; unmounted afterwards."""
    top = tmp_path / "rofs"
    top.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "corfs-test", top], check=True)
    try:
        (top / "cache").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", top], check=True)
        yield top
    finally:
        subprocess.run(["umount", "-l", top], check=False)


@pytest.mark.parametrize("name", ["cache", "new-cache"], ids=["existing", "to-create"])
def test_cache_on_read_only_fs(dirs, read_only_tmpfs, name):
    cache = read_only_tmpfs / name
    line = _mount_fails(dirs.base, cache, dirs.mnt, name, watch=(dirs.base, read_only_tmpfs))
    assert "writ" in line or "create" in line or "read-only" in line.lower(), line


def test_mountpoint_missing(dirs, tmp_path):
    _mount_fails(
        dirs.base,
        dirs.cache,
        tmp_path / "no-mnt",
        "no-mnt",
        "does not exist",
        watch=(dirs.base, dirs.cache),
    )


def test_mountpoint_not_a_directory(dirs, tmp_path):
    mnt = tmp_path / "mnt-file"
    mnt.write_bytes(b"")
    _mount_fails(
        dirs.base,
        dirs.cache,
        mnt,
        "mnt-file",
        "not a directory",
        watch=(dirs.base, dirs.cache, mnt),
    )


def test_mountpoint_already_mounted(dirs, tmp_path):
    with dirs.mount("--no-stream") as m:
        other_cache = tmp_path / "cache2"
        _mount_fails(
            dirs.base, other_cache, dirs.mnt, "already a mountpoint", watch=(dirs.base, other_cache)
        )
        assert (m.mnt / "a.raw").stat().st_size == MIB  # the first mount is unharmed
        m.stop()


def test_mountpoint_already_mounted_reached_through_a_symlink(dirs, tmp_path):
    """os.path.ismount() of a symlink is False: a second mount went on top of the first."""
    link = tmp_path / "mnt-link"
    link.symlink_to(dirs.mnt)
    with dirs.mount("--no-stream") as m:
        other_cache = tmp_path / "cache2"
        assert len(_mounts_at(dirs.mnt)) == 1
        try:
            result = run_corfs("mount", dirs.base, other_cache, link, "--no-stream", "--daemon",
                               timeout=20)
            assert len(_mounts_at(dirs.mnt)) == 1, "a second mount went on top of the first"
        finally:
            if len(_mounts_at(dirs.mnt)) > 1:  # the one stacked on top
                lazy_unmount(dirs.mnt)
        assert_one_line_error(result, "already a mountpoint")
        assert (m.mnt / "a.raw").stat().st_size == MIB  # the first mount is unharmed
        m.stop()


def test_dev_fuse_missing(dirs):
    """/dev is an empty tmpfs in a private mount namespace: no /dev/fuse there."""
    before = snapshot(dirs.base, dirs.cache)
    result = subprocess.run(
        [
            "unshare",
            "-m",
            "sh",
            "-c",
            'mount -t tmpfs corfs-nodev /dev && exec "$@"',
            "sh",
            *corfs_command("mount", dirs.base, dirs.cache, dirs.mnt, "--no-stream"),
        ],
        capture_output=True,
        text=True,
        timeout=20,
        env=corfs_env(),
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert_one_line_error(result, "/dev/fuse")
    assert snapshot(dirs.base, dirs.cache) == before
    assert os.path.exists("/dev/fuse")  # ours is untouched
    assert not is_mounted(dirs.mnt)


def test_two_mounts_on_one_cache(dirs, tmp_path):
    mnt2 = tmp_path / "mnt2"
    mnt2.mkdir()
    with dirs.mount("--no-stream") as m:
        line = _mount_fails(dirs.base, dirs.cache, mnt2, watch=(dirs.base,))
        assert "use" in line or "lock" in line, line
        assert (m.mnt / "a.raw").read_bytes() == (dirs.base / "a.raw").read_bytes()
        m.stop()


def test_dead_mount_gives_the_hint(dirs):
    with dirs.mount("--no-stream") as m:
        m.kill9(unmount=False)
        assert is_mounted(dirs.mnt)
        _mount_fails(
            dirs.base, dirs.cache, dirs.mnt, "fusermount3 -u -z", watch=(dirs.base, dirs.cache)
        )
        # status of the dead mount says the same
        status = run_corfs("status", dirs.mnt)
        assert_one_line_error(status, "fusermount3 -u -z")
    assert not is_mounted(dirs.mnt)  # CorfsMount cleared it


def test_only_regular_files_and_inner_symlinks_are_exposed(dirs, tmp_path):
    outside = make_image(tmp_path / "outside.raw", MIB, seed=92)
    os.symlink(outside, dirs.base / "link-out.raw")
    os.symlink("a.raw", dirs.base / "link-in.raw")
    os.mkfifo(dirs.base / "fifo.raw")
    os.mknod(dirs.base / "null.raw", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    (dirs.base / "subdir").mkdir()
    with dirs.mount("--no-stream") as m:
        assert sorted(os.listdir(m.mnt)) == ["a.raw", "link-in.raw"]
        assert (m.mnt / "link-in.raw").read_bytes() == (dirs.base / "a.raw").read_bytes()
        for name in ("link-out.raw", "fifo.raw", "null.raw", "subdir"):
            assert not (m.mnt / name).exists()
        m.stop()
        log = m.log_text()
    assert "link-out.raw" in log and "fifo.raw" in log and "null.raw" in log
    assert "Traceback" not in log


@pytest.mark.parametrize(
    "option",
    [
        ("--chunk-size", "3k"),
        ("--chunk-size", "128M"),  # beyond a manifest's largest chunk: memory per fill
        ("--random-range", "6k"),
        ("--random-range", "2k"),
        ("--manifest-memory", "0"),  # would leave out every published image
    ],
)
def test_cli_itself_has_no_traceback_for_bad_options(dirs, option):
    result = run_corfs("mount", dirs.base, dirs.cache, dirs.mnt, *option)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert option[0] in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert sys.executable  # run_corfs used our interpreter
    assert not is_mounted(dirs.mnt)


@pytest.mark.parametrize(
    "option",
    [
        ("--io-timeout", "nan"),  # every base read: "deadline must not be NaN", EIO
        ("--mode", "-1"),  # every lookup: OverflowError in st_mode, EIO
        ("--mode", "40644"),  # S_IFDIR bits: the images would not be regular files
        ("--owner", "-5:-5"),
        ("--owner", "4294967296"),
        ("--connections", "-2"),  # an HTTP pool of no connection: "no answer" from the base
    ],
)
def test_numbers_a_mount_cannot_serve_with_are_refused(dirs, option):
    """Refused in one line before anything is mounted: not a mount that answers EIO (with a
    traceback in its log) to every request. --daemon: a wrongly started mount returns."""
    before = snapshot(dirs.base, dirs.cache)
    result = run_corfs("mount", dirs.base, dirs.cache, dirs.mnt, "--daemon",
                       f"{option[0]}={option[1]}", timeout=20)
    assert_one_line_error(result, option[0])
    assert not is_mounted(dirs.mnt)
    assert snapshot(dirs.base, dirs.cache) == before


def test_trace_nested_too_deep_is_one_line(dirs, tmp_path):
    """json.loads raises RecursionError, not ValueError, for deep nesting."""
    trace = tmp_path / "nested.json"
    trace.write_text("[" * 200_000)
    dirs.cache.chmod(0o700)  # else a warning that it was made private comes first
    before = snapshot(dirs.base)
    result = run_corfs("mount", dirs.base, dirs.cache, dirs.mnt, "--trace", trace, timeout=20)
    assert_one_line_error(result, "is not a corfs trace")
    assert not is_mounted(dirs.mnt)
    assert snapshot(dirs.base) == before


@pytest.mark.parametrize(
    "case",
    ["cache-is-base", "cache-is-mnt", "cache-below-mnt", "base-is-mnt", "base-below-cache",
     "mnt-below-cache"],
)
def test_overlapping_base_cache_and_mountpoint_are_refused(dirs, case):
    """CACHE == BASE wrote state.db, data/, corfs.lock into BASE (and made them images of the
    next listing); a CACHE at or below MNT is hidden by the mount, and the daemon's first
    touch of it after mounting waited on itself for ever; a BASE at MNT is read through the
    mount (every image ESTALE)."""
    base, cache, mnt = dirs.base, dirs.cache, dirs.mnt
    if case == "cache-is-base":
        cache = dirs.base
    elif case == "cache-is-mnt":
        cache = dirs.mnt
    elif case == "cache-below-mnt":
        cache = dirs.mnt / "cache"
        cache.mkdir()
    elif case == "base-below-cache":  # the cache's walk made BASE's files 0600
        base = dirs.cache / "images"
        base.mkdir(parents=True)
        make_image(base / "b.raw", MIB, seed=92)
        (base / "b.raw").chmod(0o644)
    elif case == "mnt-below-cache":  # at CACHE/data new data files went through the mount
        mnt = dirs.cache / "data"
        mnt.mkdir(parents=True)
    else:
        base = dirs.mnt
        make_image(base / "b.raw", MIB, seed=92)
    before = snapshot(base)
    try:
        result = run_corfs("mount", base, cache, mnt, "--no-stream", timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail("corfs mount did not refuse (it hung, or mounted)")
    finally:
        lazy_unmount(mnt)
    assert_one_line_error(result, "overlap")
    assert snapshot(base) == before


@pytest.mark.parametrize("daemon", [(), ("--daemon",)], ids=["foreground", "daemon"])
def test_log_file_that_cannot_be_opened_is_one_line(dirs, tmp_path, daemon):
    dirs.cache.chmod(0o700)  # else a warning that it was made private could come first
    before = snapshot(dirs.base, dirs.cache)
    log = tmp_path / "no-such-dir" / "corfs.log"
    result = run_corfs("mount", dirs.base, dirs.cache, dirs.mnt, "--no-stream", *daemon,
                       "--log-file", log, timeout=20)
    assert_one_line_error(result, "--log-file", str(log))
    assert not is_mounted(dirs.mnt)
    assert snapshot(dirs.base, dirs.cache) == before


def test_detach_wait_timeout_nan_is_refused(dirs, tmp_path):
    """--timeout nan: `now > deadline` is never true, so --wait waited for ever on an image
    the stream (paused here) does not complete."""
    with dirs.mount("--stream-paused") as m:
        try:
            result = run_corfs("detach", m.mnt, "a.raw", tmp_path / "vm.raw", "--qmp",
                               tmp_path / "qmp.sock", "--wait", "--timeout", "nan", timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail("detach --wait --timeout nan waited for ever")
        assert_one_line_error(result, "--timeout")
        assert not (tmp_path / "vm.raw").exists()
        m.stop()


@pytest.mark.parametrize(
    ("base", "env", "needle"),
    [
        ("http://[::1/images/", {}, "not a valid URL"),  # urlsplit: ValueError, a traceback
        ("https://127.0.0.1:99999/images/", {}, "not a valid URL"),  # .port: ValueError
        ("s3://AKIAEXAMPLE:s3cr3t-key@bucket/images/", {}, "carries credentials"),
        # httpx could not encode the header at the first request: UnicodeEncodeError
        ("http://127.0.0.1:1/images/", {"CORFS_AUTH": "Authorization: Bearer s3cr3t-clé"},
         "CORFS_AUTH"),
    ],
    ids=["ipv6-bracket", "port-range", "s3-userinfo", "auth-not-ascii"],
)
def test_bad_base_urls_are_one_line_without_their_secrets(dirs, base, env, needle):
    """Refused in one line, with no traceback, and the line never shows the secret the user
    put in the URL or the header (the s3:// one was echoed whole)."""
    dirs.cache.chmod(0o700)  # else a warning that it was made private could come first
    before = snapshot(dirs.base, dirs.cache)
    auth = ("--auth-header-env", "CORFS_AUTH") if env else ()
    result = run_corfs("mount", base, dirs.cache, dirs.mnt, "--daemon", "--io-timeout", "5",
                       *auth, timeout=30, env=env)
    assert_one_line_error(result, needle)
    assert "s3cr3t" not in result.stderr
    assert not is_mounted(dirs.mnt)
    assert snapshot(dirs.base, dirs.cache) == before


def test_a_mount_fuse_refuses_is_one_line_not_a_traceback(tmp_path):
    """A user who is not root, mounting on a directory of root's (0755): libfuse refuses
    (here or there: /dev/fuse may be root's alone too), and pyfuse3.init raised RuntimeError,
    a traceback. Now one line of corfs after FUSE's own, exit 2, nothing mounted."""
    shared = Path(tempfile.mkdtemp(prefix="corfs-nobody-", dir="/tmp"))
    try:
        shared.chmod(0o755)
        base, cache, mnt = shared / "base", shared / "cache", shared / "mnt"
        for path in (base, cache, mnt):
            path.mkdir(mode=0o755)
        cache.chmod(0o700)  # else a warning that it was made private comes first
        make_image(base / "a.raw", MIB, seed=93)
        (base / "a.raw").chmod(0o644)
        os.chown(cache, NOBODY, NOBODY)
        # The interpreter lives below /root (0700): read and search only, as tests/fuse/
        # test_control.py's commands of user nobody.
        result = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search",
             *corfs_command("mount", base, cache, mnt, "--no-stream")],
            capture_output=True, text=True, timeout=30, env=corfs_env(), check=False,
        )
        try:
            assert result.returncode == 2, result.stderr
            assert "Traceback" not in result.stderr, result.stderr
            assert result.stderr.strip().splitlines()[-1].startswith(
                f"corfs: cannot mount on {mnt}"), result.stderr
            assert not is_mounted(mnt)
        finally:
            lazy_unmount(mnt)
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_a_directory_that_is_no_cache_and_not_empty_is_refused(dirs, tmp_path):
    """CACHE named a directory of other files (a home, /var/cache): the first mount made every
    file in it 0600 and every directory 0700, recursively, and wrote its own among them.
    Refused in one line, nothing changed; what a cut-short first mount leaves, and a file
    system's lost+found, are still a cache to start."""
    cache = tmp_path / "home"
    (cache / "projects").mkdir(parents=True)
    (cache / "projects" / "notes.txt").write_text("mine")
    (cache / "projects" / "notes.txt").chmod(0o644)
    (cache / "projects").chmod(0o755)
    cache.chmod(0o755)
    line = _mount_fails(dirs.base, cache, dirs.mnt, "not a corfs cache", "'projects'",
                        watch=(dirs.base, cache))
    assert "Traceback" not in line

    started = tmp_path / "started"
    (started / "lost+found").mkdir(parents=True, mode=0o700)
    (started / "data").mkdir(mode=0o700)
    (started / "corfs.lock").touch(mode=0o600)
    started.chmod(0o700)
    # --log-file in CACHE: opened (created) before the cache is
    with CorfsMount(dirs.base, started, dirs.mnt, "--no-stream", "--daemon", "--log-file",
                    started / "corfs.log", log_dir=tmp_path) as m:
        assert (m.mnt / "a.raw").read_bytes() == (dirs.base / "a.raw").read_bytes()
        m.stop()


def test_mounting_on_a_mount_whose_daemon_is_stopped_gives_up(dirs, tmp_path):
    """The first stat of MNT waited for the stopped daemon for ever: `corfs mount` hung."""
    with dirs.mount("--no-stream") as m:
        pid = m.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            result = run_corfs("mount", dirs.base, tmp_path / "cache2", dirs.mnt, "--no-stream",
                               timeout=40)
        except subprocess.TimeoutExpired:
            pytest.fail("corfs mount on a stopped mount waited for ever")
        finally:
            os.kill(pid, signal.SIGCONT)
        assert_one_line_error(result, "does not answer", "fusermount3 -u -z")
        assert len(_mounts_at(dirs.mnt)) == 1
        assert not (tmp_path / "cache2").exists()
        assert (m.mnt / "a.raw").stat().st_size == MIB  # the first mount is unharmed
        m.stop()


@pytest.mark.parametrize("kind", ["binary", "fifo"])
def test_a_trace_that_is_no_text_file_is_one_line(dirs, tmp_path, kind):
    """--trace of a binary file failed with UnicodeDecodeError ('internal error', quoting
    the file's bytes); of a FIFO it waited for a writer for ever, CACHE locked, deaf to
    SIGTERM (/dev/zero filled memory the same way: not run here)."""
    trace = tmp_path / "trace"
    if kind == "binary":
        trace.write_bytes(bytes(range(128, 256)) * 8)
    else:
        os.mkfifo(trace)
    dirs.cache.chmod(0o700)  # else a warning that it was made private comes first
    try:
        result = run_corfs("mount", dirs.base, dirs.cache, dirs.mnt, "--no-stream",
                           "--trace", trace, timeout=20)  # killed (SIGKILL) if it hangs
    except subprocess.TimeoutExpired:
        pytest.fail("corfs mount --trace waited for ever")
    assert_one_line_error(result, str(trace),
                          "not a corfs trace" if kind == "binary" else "not a regular file")
    assert not is_mounted(dirs.mnt)


@pytest.mark.parametrize(
    ("endpoint", "needle"),
    [
        ("http://AKIAEXAMPLE:s3cr3t@[::1/", "not a valid URL"),  # botocore: ValueError
        ("s3cr3t endpoint", "http:// or https://"),  # "Invalid endpoint: <it>", a traceback
        ("http://AKIAEXAMPLE:s3cr3t@127.0.0.1:1/", "carries credentials"),
    ],
    ids=["ipv6-bracket", "no-url", "userinfo"],
)
def test_bad_endpoint_urls_are_one_line_without_their_secrets(dirs, endpoint, needle):
    dirs.cache.chmod(0o700)  # else a warning that it was made private could come first
    before = snapshot(dirs.base, dirs.cache)
    env = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}
    result = run_corfs("mount", "s3://bucket/images/", dirs.cache, dirs.mnt, "--daemon",
                       "--io-timeout", "3", "--endpoint-url", endpoint, timeout=30, env=env)
    assert_one_line_error(result, "--endpoint-url", needle)
    assert "s3cr3t" not in result.stderr
    assert not is_mounted(dirs.mnt)
    assert snapshot(dirs.base, dirs.cache) == before
    # publish takes the same option: it said "answer does not parse (ValueError)", exit 5
    image = dirs.base / "disk.raw"
    image.write_bytes(b"x" * 4096)
    result = run_corfs("publish", image, "s3://bucket/images", "--endpoint-url", endpoint,
                       timeout=30, env=env)
    assert_one_line_error(result, "--endpoint-url", needle)
    assert result.returncode == 2 and "s3cr3t" not in result.stderr


def test_publish_to_an_s3_endpoint_that_never_answers_ends_within_its_io_timeout(dirs):
    """botocore waits 60 s for each connection and each read of an answer, five attempts a
    request: a stalled endpoint held `corfs publish` about 5 minutes for its first request.
    --io-timeout sets both: here 1 s, five attempts and their backoff, then one line. The
    endpoint: a socket that listens and never accepts (the kernel completes the handshake)."""
    image = dirs.base / "disk.raw"
    image.write_bytes(b"x" * 4096)
    env = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}
    with socket.socket() as stalled:
        stalled.bind(("127.0.0.1", 0))
        stalled.listen(64)
        endpoint = f"http://127.0.0.1:{stalled.getsockname()[1]}"
        started = time.monotonic()
        result = run_corfs("publish", image, "s3://bucket/images", "--endpoint-url", endpoint,
                           "--io-timeout", "1", timeout=120, env=env)
        took = time.monotonic() - started
    assert_one_line_error(result, "bucket")
    assert result.returncode == 5
    assert took < 60, took  # not one default timeout, let alone five
    result = run_corfs("publish", image, "s3://bucket/images", "--io-timeout", "0", env=env)
    assert_one_line_error(result, "--io-timeout must be positive")
    assert result.returncode == 2
    # no timeout at all: the endpoint's own failure is said (inf overflowed a socket timeout:
    # "HTTPClientError")
    result = run_corfs("publish", image, "s3://bucket/images", "--endpoint-url",
                       "http://127.0.0.1:1", "--io-timeout", "inf", env=env)
    assert_one_line_error(result, "cannot connect to the S3 endpoint")


@pytest.mark.parametrize("command", ["mount", "publish"])
def test_a_bucket_name_s3_cannot_have_is_bad_input(dirs, command):
    """Refused before any request, as a bucket name never quoted (parse_s3_url: what stands
    there may be credentials typed into the URL); botocore's ParamValidationError was exit 5,
    "the base failed", with the class name for all it said."""
    dirs.cache.chmod(0o700)
    env = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}
    image = dirs.base / "disk.raw"
    image.write_bytes(b"x" * 4096)
    where = (dirs.cache, dirs.mnt, "--daemon", "--io-timeout", "3") if command == "mount" else ()
    args = ("s3://Bad_Bucket!/images/", *where) if command == "mount" else (
        image, "s3://Bad_Bucket!/images")
    result = run_corfs(command, *args, "--endpoint-url", "http://127.0.0.1:1", timeout=30,
                       env=env)
    assert_one_line_error(result, "does not start with a bucket name")
    assert result.returncode == 2
    assert not is_mounted(dirs.mnt)


@pytest.mark.parametrize(
    ("options", "env", "needle"),
    [
        (("--region", "bad/region"), {"AWS_SECRET_ACCESS_KEY": "y"}, "InvalidRegionError"),
        # No --endpoint-url: the endpoint botocore makes of an empty region is
        # https://s3..amazonaws.com, refused as it builds the client (no request is sent).
        (("--region", ""), {"AWS_SECRET_ACCESS_KEY": "y"}, "ValueError"),
        ((), {}, "no S3 credentials"),  # an access key without its secret
    ],
    ids=["region-format", "region-empty", "half-credentials"],
)
def test_s3_settings_botocore_refuses_are_one_line(dirs, options, env, needle):
    """botocore refused to make its client (InvalidRegionError, ValueError,
    PartialCredentialsError) outside any error mapping: a traceback."""
    dirs.cache.chmod(0o700)  # else a warning that it was made private could come first
    env = {"AWS_ACCESS_KEY_ID": "x", **env, "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
           "AWS_CONFIG_FILE": "/nonexistent"}
    if "AWS_SECRET_ACCESS_KEY" not in env:
        env["AWS_SECRET_ACCESS_KEY"] = ""  # set but empty: botocore takes it as missing
    endpoint = () if options == ("--region", "") else ("--endpoint-url", "http://127.0.0.1:1")
    result = run_corfs("mount", "s3://bucket/images/", dirs.cache, dirs.mnt, "--daemon",
                       "--io-timeout", "3", *endpoint, *options, timeout=30, env=env)
    line = assert_one_line_error(result, needle)
    assert "internal error" not in line  # what --daemon makes of an exception it did not map
    assert not is_mounted(dirs.mnt)
