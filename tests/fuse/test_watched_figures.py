"""What an operator watches, checked against what really happened: `corfs status` (table and
JSON) and the Prometheus metrics of a mount, after pause/resume, an offline image, and reads
that leave an image all but complete. Real mounts, real scrapes."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from tests.mounting import CorfsDirs, CorfsMount, make_image, run_corfs
from tests.prometheus import samples, scrape, value
from tests.servers import Nginx, free_port

from .util import KIB, MIB, image_status, live_status, wait_for


def test_a_paused_image_that_is_offline_still_reads_as_paused_in_metrics(tmp_dirs: CorfsDirs):
    """`corfs stream pause` is in effect for an image whose base lost it (state offline): the
    stream of it stays paused when the base has it again. README: `corfs_stream_paused{image}`
    is "1 while its streaming is paused"; it is derived from the state instead, so it reads 0
    and an operator's dashboard says the pause did not take (or an alert on paused streams
    stays quiet) exactly while the base is away."""
    make_image(tmp_dirs.base / "a.raw", 4 * MIB, seed=91)
    make_image(tmp_dirs.base / "b.raw", 4 * MIB, seed=92)
    with tmp_dirs.mount("--no-stream", "--chunk-size", "64k") as m:
        (m.mnt / "a.raw").open("rb").read(64 * KIB)
        wait_for(lambda: image_status(live_status(m.mnt), "a.raw")["local_bytes"] > 0,
                 what="a chunk of a.raw to be stored")
        m.stop()
    (tmp_dirs.base / "a.raw").unlink()  # the base lost it: a.raw is served offline

    port = free_port()
    with tmp_dirs.mount("--stream-paused", "--chunk-size", "64k", "--metrics", str(port)) as m:
        result = run_corfs("stream", "pause", m.mnt)  # said twice: paused for sure
        assert result.returncode == 0, result.stderr
        st = live_status(m.mnt)
        assert image_status(st, "a.raw")["state"] == "offline"
        assert image_status(st, "b.raw")["state"] == "paused"
        found = samples(scrape(port))
        assert value(found, "corfs_stream_paused", image="b.raw") == 1
        assert value(found, "corfs_stream_paused", image="a.raw") == 1, (
            "a.raw's stream is paused, yet corfs_stream_paused says it is not"
        )
        m.stop()


def test_rate_and_eta_after_resume_are_not_diluted_by_the_pause(tmp_dirs: CorfsDirs):
    """Right after `corfs stream resume` the rate is how fast the image has been filling since,
    not that spread over the paused seconds still in the 10 s window: a stream resumed after a
    pause showed about a fifth of its real rate and an ETA five times too long (161 s for an
    image 30 s from complete), falling back only as the pause left the window. The same holds
    for a stream back from an outage. Ground truth: the image's own local bytes over wall-clock
    time since the resume, at a bandwidth limit far below what the machine can do."""
    make_image(tmp_dirs.base / "a.raw", 64 * MIB, seed=93)
    with tmp_dirs.mount("--stream-paused", "--bandwidth", "1M", "--chunk-size", "64k") as m:
        # A window of paused seconds (the meter samples once a second, over 10 s).
        time.sleep(11)
        assert image_status(live_status(m.mnt), "a.raw")["local_bytes"] == 0
        assert run_corfs("stream", "resume", m.mnt).returncode == 0
        resumed = time.monotonic()
        # Two seconds' worth at the limit, at least three seconds after the resume.
        st = wait_for(
            lambda: (i := image_status(live_status(m.mnt), "a.raw"))["local_bytes"] >= 2 * MIB
            and time.monotonic() - resumed >= 3 and i,
            what="the resumed stream to fill 2 MiB",
        )
        measured = st["local_bytes"] / (time.monotonic() - resumed)  # a lower bound
        assert st["state"] == "streaming"
        assert st["rate_bps"] >= measured / 2, (
            f"rate {st['rate_bps']:.0f} B/s, yet {st['local_bytes']} bytes came in "
            f"{time.monotonic() - resumed:.1f} s since the resume ({measured:.0f} B/s)"
        )
        truth = (st["size"] - st["local_bytes"]) / measured  # an upper bound
        assert st["eta_s"] is not None and st["eta_s"] <= 2 * truth, (st["eta_s"], truth)
        m.stop()


def test_the_table_never_shows_100_percent_for_an_image_that_is_not_complete(
    tmp_dirs: CorfsDirs,
):
    """FILL is rounded to one decimal: an image one 4 KiB chunk short of 16 MiB (99.98%)
    shows "100.0%" beside a state that is not `complete`, so an operator reads it as done
    (`corfs detach` then refuses it as "100.0% local", formatted with the same rounding). The
    ETA column is rounded up for the same reason (status_view.eta_text); FILL must not round
    up to 100.0% either."""
    size = 16 * MIB
    make_image(tmp_dirs.base / "a.raw", size, seed=94)
    with tmp_dirs.mount("--no-stream", "--chunk-size", "4k") as m:
        with open(m.mnt / "a.raw", "r+b") as f:  # whole chunks written: local, nothing fetched
            f.write(b"\x5a" * (size - 4 * KIB))
        st = wait_for(
            lambda: (i := image_status(live_status(m.mnt), "a.raw"))["local_bytes"]
            == size - 4 * KIB and i,
            what="the written chunks to be local",
        )
        assert st["state"] != "complete" and st["fill_ratio"] < 1.0
        result = run_corfs("status", m.mnt)
        assert result.returncode == 0, result.stderr
        (row,) = [line for line in result.stdout.splitlines() if line.startswith("a.raw ")]
        assert "100.0%" not in row, f"an incomplete image shown as 100.0%: {row!r}"
        m.stop()


def test_fill_errors_counter_does_not_reset_when_the_image_is_handed_over(
    nginx_server: Nginx, tmp_path: Path
):
    """`corfs_image_fill_errors_total` is a counter: within one daemon it may only grow. Once
    the image is handed over to QEMU (`corfs detach --qmp`) its status is made afresh
    (stats.detached_status) with fill_errors 0, so the counter drops to 0 without a restart:
    Prometheus takes that for a reset of the process, and the image's failed fills vanish
    from its history exactly when the image leaves the mount."""
    from tests.handoff.qemu import Qemu
    from tests.proxy import FaultProxy

    sub = f"watch-{uuid.uuid4().hex[:8]}"
    (nginx_server.root / sub).mkdir()
    make_image(nginx_server.root / sub / "disk.raw", 4 * MIB, seed=95)
    proxy = FaultProxy(upstream_port=nginx_server.port).start()
    dirs = CorfsDirs.under(tmp_path / "dirs")
    port = free_port()
    try:
        proxy.inject("status:403")  # the first chunk request refused: one failed fill
        with CorfsMount(f"{proxy.url}{sub}/", dirs.cache, dirs.mnt, "--metrics", str(port),
                        "--chunk-size", "256k", log_dir=dirs.logs) as m:
            wait_for(lambda: image_status(live_status(m.mnt), "disk.raw")["state"]
                     == "complete", 60, "disk.raw to be streamed whole")
            before = value(samples(scrape(port)), "corfs_image_fill_errors_total",
                           image="disk.raw")
            assert before >= 1
            dest = tmp_path / "vm.raw"
            with Qemu(tmp_path, "-drive",
                      f"file={m.mnt / 'disk.raw'},if=none,id=drv0,format=raw") as qemu:
                result = run_corfs("detach", m.mnt, "disk.raw", dest, "--qmp", qemu.socket,
                                   timeout=120)
                assert result.returncode == 0, result.stderr + m.log_tail()
                assert image_status(live_status(m.mnt), "disk.raw")["state"] == "detached"
                time.sleep(1.5)  # past metrics.SNAPSHOT_REUSE: a fresh snapshot
                after = value(samples(scrape(port)), "corfs_image_fill_errors_total",
                              image="disk.raw")
                assert after >= before, f"a counter went from {before} down to {after}"
            m.stop()
    finally:
        proxy.stop()
