"""Issue 11: `corfs detach MNT IMAGE DEST --qmp SOCKET` hands a fully streamed image over to
the running QEMU: no copy (DEST is the data file's inode), every node of QEMU on MNT/IMAGE now
on DEST with its options, writes before and after the switch all in DEST, the mount can go
while QEMU runs, the image is never served again (this mount or the next) until
--forget-detached, and bad input changes nothing. Real corfs mounts, real QEMU (-machine none,
I/O through `qemu-io` in the human monitor)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from corfs.control_client import send_command
from corfs.errors import CorfsError
from tests.fuse.util import assert_one_line_error, image_status, live_status, snapshot
from tests.mounting import CorfsDirs, CorfsMount, make_image, run_corfs
from tests.servers import unix_listener

from .qemu import Qemu

MIB = 1 << 20
SIZE = 8 * MIB
WRITES_BEFORE = [(0xA1, 0), (0xA2, 3 * MIB + 4096)]  # (pattern, offset) of 64 KiB writes
WRITES_AFTER = [(0xB1, 64 * 1024), (0xB2, 5 * MIB)]


def expected(base: Path, writes: list[tuple[int, int]]) -> bytes:
    data = bytearray(base.read_bytes())
    for pattern, offset in writes:
        data[offset : offset + 65536] = bytes([pattern]) * 65536
    return bytes(data)


def write_all(qemu: Qemu, device: str, writes: list[tuple[int, int]]) -> None:
    for pattern, offset in writes:
        qemu.qemu_io(device, f"write -P {pattern:#x} {offset} 64k")
        qemu.qemu_io(device, f"read -P {pattern:#x} {offset} 64k")


def detach(
    dirs: CorfsDirs, dest: Path, qemu: Qemu, *extra: str
) -> subprocess.CompletedProcess[str]:
    return run_corfs("detach", dirs.mnt, "disk.raw", dest, "--qmp", qemu.socket, *extra,
                     timeout=120)


@pytest.fixture
def base_image(tmp_dirs: CorfsDirs) -> Path:
    return make_image(tmp_dirs.base / "disk.raw", SIZE, seed=111, zero_blocks=(6,))


@pytest.mark.parametrize("cache", ["none", "writeback"])
def test_a_drive_is_handed_over_with_writes_before_and_after(
    tmp_dirs: CorfsDirs, base_image: Path, tmp_path: Path, cache: str
) -> None:
    dest = tmp_path / "vm.raw"
    # A slow stream: --wait has to wait for it while QEMU already writes through the mount.
    with tmp_dirs.mount("--bandwidth", "4M", "--chunk-size", "256K") as m, Qemu(
        tmp_path, "-drive", f"file={m.mnt / 'disk.raw'},if=none,id=drv0,format=raw,cache={cache}"
    ) as qemu:
        write_all(qemu, "drv0", WRITES_BEFORE)
        assert image_status(live_status(m.mnt), "disk.raw")["fill_ratio"] < 1.0
        before = {n: f for n, f in qemu.file_nodes().items()}
        result = detach(tmp_dirs, dest, qemu, "--wait")
        assert result.returncode == 0, result.stderr + m.log_tail()
        nodes = qemu.file_nodes()
        assert list(nodes.values()) == [str(dest)], (before, nodes)
        assert not [f for f in qemu.open_files() if f.startswith(str(m.mnt))]
        write_all(qemu, "drv0", WRITES_AFTER)
        status = image_status(live_status(m.mnt), "disk.raw")
        assert status["state"] == "detached" and status["detached_to"] == str(dest)
        assert "disk.raw" not in os.listdir(m.mnt)
        assert not (tmp_dirs.cache / "data" / "disk.raw").exists()  # DEST is the only name
        m.stop()  # the mount goes while QEMU runs on
        qemu.qemu_io("drv0", "flush")
        write_all(qemu, "drv0", [(0xC1, 7 * MIB)])
        qemu.qemu_io("drv0", "flush")
        assert dest.read_bytes() == expected(base_image, WRITES_BEFORE + WRITES_AFTER +
                                             [(0xC1, 7 * MIB)])
    assert os.stat(dest).st_mode & 0o777 == 0o600


def test_blockdev_nodes_keep_their_options_and_a_qcow2_overlay_follows(
    tmp_dirs: CorfsDirs, base_image: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "vm.raw"
    overlay = tmp_path / "overlay.qcow2"
    with tmp_dirs.mount() as m:
        image = m.mnt / "disk.raw"
        made = subprocess.run(["qemu-img", "create", "-f", "qcow2", "-F", "raw", "-b", image,
                               overlay], capture_output=True, text=True)
        assert made.returncode == 0, made.stderr
        with Qemu(
            tmp_path,
            "-blockdev", f"driver=file,filename={image},node-name=f0,cache.direct=on,"
            "cache.no-flush=off,aio=native,discard=unmap,detect-zeroes=on",
            "-blockdev", "driver=raw,file=f0,node-name=d0,discard=unmap",
            "-blockdev", f"driver=qcow2,file.driver=file,file.filename={overlay},node-name=ov",
        ) as qemu:
            info = {n["node-name"]: n for n in qemu.qmp("query-named-block-nodes", flat=True)}
            old = info["f0"]
            write_all(qemu, "d0", WRITES_BEFORE)
            write_all(qemu, "ov", [(0xD1, 2 * MIB)])
            result = run_corfs("detach", m.mnt, "disk.raw", dest, "--qmp", qemu.socket,
                               "--wait", timeout=120)
            assert result.returncode == 0, result.stderr + m.log_tail()
            files = qemu.file_nodes()
            assert str(image) not in files.values(), files
            assert str(dest) in files.values(), files
            new = next(n for n in qemu.qmp("query-named-block-nodes", flat=True)
                       if n["drv"] == "file" and n["file"] == str(dest))
            for key in ("cache", "detect_zeroes", "ro"):
                assert new[key] == old[key], (key, old[key], new[key])
            write_all(qemu, "d0", WRITES_AFTER)
            assert "fail" not in qemu.qemu_io("ov", "read -P 0xd1 2M 64k")
            info = subprocess.run(["qemu-img", "info", "-U", "--output=json", overlay],
                                  capture_output=True, text=True)
            assert json.loads(info.stdout)["backing-filename"] == str(dest)  # a restart: DEST
            # discard=unmap, which QMP does not report, came from QEMU's command line: a
            # discard through the new nodes punches a hole in DEST (ignored by default).
            qemu.qemu_io("d0", "discard 7M 1M")
            fd = os.open(dest, os.O_RDONLY)
            try:
                assert os.lseek(fd, 7 * MIB, os.SEEK_HOLE) == 7 * MIB
            finally:
                os.close(fd)
            m.stop()
            qemu.qemu_io("d0", "flush")
            want = bytearray(expected(base_image, WRITES_BEFORE + WRITES_AFTER))
            want[7 * MIB : 8 * MIB] = bytes(MIB)
            assert dest.read_bytes() == bytes(want)


def test_the_image_is_not_served_again_until_forget_detached(
    tmp_dirs: CorfsDirs, base_image: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "vm.raw"
    with tmp_dirs.mount() as m, Qemu(
        tmp_path, "-drive", f"file={m.mnt / 'disk.raw'},if=none,id=drv0,format=raw"
    ) as qemu:
        write_all(qemu, "drv0", WRITES_BEFORE)
        assert detach(tmp_dirs, dest, qemu, "--wait").returncode == 0
        # A second handoff whose command passed the CLI's checks before the first ended (two
        # `corfs detach` racing): the daemon refuses it; it was accepted, failed in the
        # background, and its CLI saw the image detached and said it went to ITS DEST.
        with pytest.raises(CorfsError):
            send_command(str(m.mnt), {"op": "handoff", "image": "disk.raw",
                                      "dest": str(tmp_path / "other.raw"), "qmp": qemu.socket})
        assert not (tmp_path / "other.raw").exists()
        m.stop()
    with tmp_dirs.mount() as m:
        assert "disk.raw" not in os.listdir(m.mnt)  # a VM restarted on it fails to open it
        status = image_status(live_status(m.mnt), "disk.raw")
        assert status["state"] == "detached" and status["detached_to"] == str(dest)
        # Nothing more will come for it: --watch ends (it waited for it forever).
        assert run_corfs("status", m.mnt, "--watch", timeout=20).returncode == 0
        m.stop()
    assert f"handed over to QEMU as {dest}" in m.log_text()
    assert run_corfs("status", tmp_dirs.cache, "--watch", timeout=20).returncode == 0
    offline = run_corfs("status", tmp_dirs.cache, "--json")
    assert '"detached_to"' in offline.stdout and str(dest) in offline.stdout
    table = run_corfs("status", tmp_dirs.cache)
    assert "detached" in table.stdout and f"handed over to QEMU: {dest}" in table.stdout
    with tmp_dirs.mount("--forget-detached", "disk.raw") as m:
        assert (m.mnt / "disk.raw").read_bytes() == base_image.read_bytes()  # fresh, from BASE
        m.stop()
    assert dest.read_bytes() == expected(base_image, WRITES_BEFORE)  # DEST untouched


def test_bad_input_is_one_line_and_changes_nothing(
    tmp_dirs: CorfsDirs, base_image: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "vm.raw"
    not_qmp = tmp_path / "not-qmp.sock"
    with tmp_dirs.mount("--stream-paused") as m, Qemu(
        tmp_path, "-drive", f"file={m.mnt / 'disk.raw'},if=none,id=drv0,format=raw"
    ) as qemu:
        write_all(qemu, "drv0", WRITES_BEFORE)
        result = detach(tmp_dirs, dest, qemu)  # incomplete, no --wait
        assert_one_line_error(result, "local", "--wait")
        run_corfs("stream", "resume", m.mnt, check=True)
        run_corfs("status", m.mnt, "--watch", check=True, timeout=60)
        cases = {
            "no QEMU there": ["--qmp", str(tmp_path / "nothing.sock")],
            "not QMP": ["--qmp", str(not_qmp)],
        }
        # Not QEMU: a socket that answers something else (one that says nothing is given up
        # at QMP_TIMEOUT: tests/unit/test_qmp_socket.py, which waits less)
        with unix_listener(not_qmp, b"hello, I am not QEMU\r\n"):
            for what, args in cases.items():
                result = run_corfs("detach", m.mnt, "disk.raw", dest, *args, timeout=60)
                assert result.returncode != 0, what
                assert len(result.stderr.strip().splitlines()) == 1, (what, result.stderr)
        dest.write_bytes(b"x")
        assert_one_line_error(detach(tmp_dirs, dest, qemu), "exists")
        dest.unlink()
        other_fs = Path("/dev/shm") / f"corfs-test-{os.getpid()}.raw"
        if os.stat("/dev/shm").st_dev != os.stat(tmp_path).st_dev:
            assert_one_line_error(detach(tmp_dirs, other_fs, qemu), "file system")
        assert not other_fs.exists()
        before = snapshot(tmp_dirs.cache)
        assert_one_line_error(
            run_corfs("detach", m.mnt, "disk.raw", dest, timeout=60), "--qmp"
        )  # mounted, no live option: refused, naming the live way
        assert snapshot(tmp_dirs.cache) == before
        assert not dest.exists()
        assert list(qemu.file_nodes().values()) == [str(m.mnt / "disk.raw")]
        write_all(qemu, "drv0", WRITES_AFTER)  # still served by the mount
        assert image_status(live_status(m.mnt), "disk.raw")["state"] == "complete"
        m.stop()


def test_no_qemu_node_on_the_image_changes_nothing(
    tmp_dirs: CorfsDirs, base_image: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "vm.raw"
    other = make_image(tmp_path / "other.raw", MIB, seed=3)
    with tmp_dirs.mount() as m, Qemu(
        tmp_path, "-drive", f"file={other},if=none,id=drv0,format=raw"
    ) as qemu:
        result = detach(tmp_dirs, dest, qemu, "--wait")
        assert_one_line_error(result, str(m.mnt / "disk.raw"))
        assert not dest.exists()
        assert (tmp_dirs.cache / "data" / "disk.raw").exists()
        assert image_status(live_status(m.mnt), "disk.raw")["state"] == "complete"
        assert (m.mnt / "disk.raw").read_bytes() == base_image.read_bytes()
        m.stop()


def test_qemu_refusing_the_new_file_rolls_everything_back() -> None:
    """QEMU runs as another user (as libvirt's does) and cannot open DEST (0600, the mounting
    user's): its blockdev-add fails, and all is as before: one line naming QEMU's reason, no
    DEST, QEMU on the mount and writing through it, the image served and complete."""
    root = Path(tempfile.mkdtemp(prefix="corfs-handoff-", dir="/tmp"))  # others may traverse
    try:
        root.chmod(0o755)
        dirs = CorfsDirs.under(root)
        base_image = make_image(dirs.base / "disk.raw", SIZE, seed=112)
        dest = root / "vm.raw"
        with dirs.mount("--allow-other", "--mode", "666") as m, Qemu(
            root, "-drive", f"file={m.mnt / 'disk.raw'},if=none,id=drv0,format=raw",
            as_nobody=True,
        ) as qemu:
            write_all(qemu, "drv0", WRITES_BEFORE)
            result = detach(dirs, dest, qemu, "--wait")
            assert_one_line_error(result, "Permission denied")
            assert not dest.exists()
            assert list(qemu.file_nodes().values()) == [str(m.mnt / "disk.raw")]
            write_all(qemu, "drv0", WRITES_AFTER)
            status = image_status(live_status(m.mnt), "disk.raw")
            assert status["state"] == "complete"
            assert "Permission denied" in status["handoff_error"]
            # The switch had begun: QEMU may have written to the inode, so no chunk may be
            # taken for the base's any more (verify, refetch, dedup).
            assert status["dirty_bytes"] == SIZE
            qemu.qemu_io("drv0", "flush")
            want = expected(base_image, WRITES_BEFORE + WRITES_AFTER)
            assert (m.mnt / "disk.raw").read_bytes() == want
            m.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_dest_inside_cache_through_a_symlink_is_refused(
    tmp_dirs: CorfsDirs, base_image: Path, tmp_path: Path
) -> None:
    """DEST named through a symlink to CACHE is still inside CACHE: linked there, it is a name
    the store owns (data/NEW.raw is the data file a base image NEW.raw gets at the next mount,
    created with O_TRUNC: QEMU's disk emptied under it)."""
    alias = tmp_path / "alias"
    alias.symlink_to(tmp_dirs.cache)
    dest = alias / "data" / "new.raw"
    with tmp_dirs.mount() as m, Qemu(
        tmp_path, "-drive", f"file={m.mnt / 'disk.raw'},if=none,id=drv0,format=raw"
    ) as qemu:
        write_all(qemu, "drv0", WRITES_BEFORE)
        assert_one_line_error(detach(tmp_dirs, dest, qemu, "--wait"), "inside")
        assert not dest.exists()
        assert list(qemu.file_nodes().values()) == [str(m.mnt / "disk.raw")]
        m.stop()


def test_dest_inside_the_mount_named_relative_is_refused_as_inside_it(
    tmp_dirs: CorfsDirs, base_image: Path, tmp_path: Path
) -> None:
    """MNT given as a relative path and DEST inside it: refused for being inside the mount
    (walkthrough: it was refused as "on another file system than the cache", which sent the
    admin looking at file systems rather than at where DEST is)."""
    with tmp_dirs.mount() as m, Qemu(
        tmp_path, "-drive", f"file={m.mnt / 'disk.raw'},if=none,id=drv0,format=raw"
    ) as qemu:
        result = run_corfs("detach", m.mnt.name, "disk.raw", m.mnt / "vm.raw", "--qmp",
                           qemu.socket, "--wait", timeout=120, cwd=m.mnt.parent)
        assert "another file system" not in assert_one_line_error(result, "must not be inside")
        assert list(qemu.file_nodes().values()) == [str(m.mnt / "disk.raw")]
        m.stop()


def test_dest_inside_the_base_directory_is_refused(
    tmp_dirs: CorfsDirs, base_image: Path, tmp_path: Path
) -> None:
    """BASE is read-only to corfs: a DEST in a local BASE directory (here named through a
    symlink) would be a new file there, and a new base image at the next mount. The CLI refuses
    it in one line, and so does the daemon when asked directly; nothing changes."""
    alias = tmp_path / "alias"
    alias.symlink_to(tmp_dirs.base)
    dest = alias / "vm.raw"
    with tmp_dirs.mount() as m, Qemu(
        tmp_path, "-drive", f"file={m.mnt / 'disk.raw'},if=none,id=drv0,format=raw"
    ) as qemu:
        run_corfs("status", m.mnt, "--watch", check=True, timeout=60)
        before = snapshot(tmp_dirs.base)
        assert_one_line_error(detach(tmp_dirs, dest, qemu), "base directory")
        with pytest.raises(CorfsError, match="base directory"):
            send_command(str(m.mnt), {"op": "handoff", "image": "disk.raw", "dest": str(dest),
                                      "qmp": qemu.socket})
        assert snapshot(tmp_dirs.base) == before
        assert list(qemu.file_nodes().values()) == [str(m.mnt / "disk.raw")]
        assert image_status(live_status(m.mnt), "disk.raw")["state"] == "complete"
        m.stop()


def test_a_relative_qmp_socket_is_the_one_in_the_callers_directory(
    tmp_dirs: CorfsDirs, base_image: Path, tmp_path: Path
) -> None:
    """`--qmp qmp.sock` names the socket where the user runs `corfs detach`, not where the
    daemon was started (its working directory is another)."""
    dest = tmp_path / "vm.raw"
    with tmp_dirs.mount() as m, Qemu(
        tmp_path, "-drive", f"file={m.mnt / 'disk.raw'},if=none,id=drv0,format=raw"
    ) as qemu:
        assert os.path.dirname(qemu.socket) == str(tmp_path)
        result = run_corfs("detach", m.mnt, "disk.raw", dest, "--qmp",
                           os.path.basename(qemu.socket), "--wait", cwd=tmp_path, timeout=120)
        assert result.returncode == 0, result.stderr + m.log_tail()
        assert list(qemu.file_nodes().values()) == [str(dest)]
        m.stop()


def test_an_open_handle_reads_no_stale_bytes_after_the_handoff(
    tmp_dirs: CorfsDirs, base_image: Path, tmp_path: Path
) -> None:
    """A reader that still has MNT/IMAGE open gets ESTALE once the image is handed over,
    never the bytes the kernel cached before (QEMU writes DEST directly from then on)."""
    dest = tmp_path / "vm.raw"
    with tmp_dirs.mount() as m, Qemu(
        tmp_path, "-drive", f"file={m.mnt / 'disk.raw'},if=none,id=drv0,format=raw"
    ) as qemu:
        fd = os.open(m.mnt / "disk.raw", os.O_RDONLY)
        try:
            assert os.pread(fd, 65536, 0) == base_image.read_bytes()[:65536]  # now cached
            assert detach(tmp_dirs, dest, qemu, "--wait").returncode == 0
            qemu.qemu_io("drv0", "write -P 0xee 0 64k")
            with pytest.raises(OSError) as stale:
                os.pread(fd, 65536, 0)
            assert stale.value.errno == errno.ESTALE
        finally:
            os.close(fd)
        m.stop()


def test_a_mount_named_through_a_symlink_hands_over_what_qemu_opened_through_it(
    tmp_dirs: CorfsDirs, base_image: Path, tmp_path: Path
) -> None:
    """`/var/lib/libvirt/images` is often a symlink to a larger disk: the VM opens
    LINK/disk.raw, and the handoff must find QEMU's node by that name (it matches names as
    strings; resolving them could touch the mount)."""
    link = tmp_path / "images"
    link.symlink_to(tmp_dirs.mnt)
    dest = tmp_path / "vm.raw"
    with CorfsMount(tmp_dirs.base, tmp_dirs.cache, link) as m, Qemu(
        tmp_path, "-drive", f"file={link / 'disk.raw'},if=none,id=drv0,format=raw"
    ) as qemu:
        write_all(qemu, "drv0", WRITES_BEFORE)
        result = run_corfs("detach", link, "disk.raw", dest, "--qmp", qemu.socket, "--wait",
                           timeout=120)
        assert result.returncode == 0, result.stderr + m.log_tail()
        assert list(qemu.file_nodes().values()) == [str(dest)]
        write_all(qemu, "drv0", WRITES_AFTER)
        qemu.qemu_io("drv0", "flush")
        m.stop()
        assert dest.read_bytes() == expected(base_image, WRITES_BEFORE + WRITES_AFTER)


def test_wait_with_the_stream_paused_says_so_at_once(
    tmp_dirs: CorfsDirs, base_image: Path, tmp_path: Path
) -> None:
    """`detach --wait` of an image whose stream is paused would wait for nothing (--timeout,
    10 minutes by default) and then blame only the fill: it says at once that the stream is
    paused and how to resume it, nothing changed; once resumed, the handoff goes through."""
    dest = tmp_path / "vm.raw"
    with tmp_dirs.mount("--stream-paused") as m, Qemu(
        tmp_path, "-drive", f"file={m.mnt / 'disk.raw'},if=none,id=drv0,format=raw"
    ) as qemu:
        write_all(qemu, "drv0", WRITES_BEFORE)
        result = run_corfs("detach", m.mnt, "disk.raw", dest, "--qmp", qemu.socket, "--wait",
                           timeout=30)
        assert_one_line_error(result, "paused", "corfs stream resume")
        assert not dest.exists()
        assert image_status(live_status(m.mnt), "disk.raw")["state"] == "paused"
        run_corfs("stream", "resume", m.mnt, "disk.raw", check=True)
        result = detach(tmp_dirs, dest, qemu, "--wait")
        assert result.returncode == 0, result.stderr + m.log_tail()
        write_all(qemu, "drv0", WRITES_AFTER)
        qemu.qemu_io("drv0", "flush")
        assert dest.read_bytes() == expected(base_image, WRITES_BEFORE + WRITES_AFTER)


def test_wait_on_a_mount_that_streams_nothing_says_so_at_once(
    tmp_dirs: CorfsDirs, base_image: Path, tmp_path: Path
) -> None:
    """Review finding: as with a paused stream, `detach --wait` on a --no-stream mount waited
    out --timeout for a fill nothing drives; it says at once how to make the image whole."""
    dest = tmp_path / "vm.raw"
    with tmp_dirs.mount("--no-stream") as m, Qemu(
        tmp_path, "-drive", f"file={m.mnt / 'disk.raw'},if=none,id=drv0,format=raw"
    ) as qemu:
        result = run_corfs("detach", m.mnt, "disk.raw", dest, "--qmp", qemu.socket, "--wait",
                           timeout=30)
        assert_one_line_error(result, "--no-stream", "read it whole")
        assert not dest.exists()
        assert image_status(live_status(m.mnt), "disk.raw")["state"] == "idle"


def test_a_bad_dest_is_refused_before_waiting_for_the_stream(
    tmp_dirs: CorfsDirs, base_image: Path, tmp_path: Path
) -> None:
    """Review: DEST was checked only once the image was complete, so `--wait` could wait
    hours for the stream and then refuse a DEST that existed from the start. Here the stream
    is paused (the wait would end at once, saying so): the DEST comes first."""
    dest = tmp_path / "taken.raw"
    dest.write_bytes(b"someone's")
    with tmp_dirs.mount("--stream-paused") as m, Qemu(
        tmp_path, "-drive", f"file={m.mnt / 'disk.raw'},if=none,id=drv0,format=raw"
    ) as qemu:
        assert_one_line_error(detach(tmp_dirs, dest, qemu, "--wait"), "already exists")
        assert dest.read_bytes() == b"someone's"
        assert list(qemu.file_nodes().values()) == [str(m.mnt / "disk.raw")]
        m.stop()
