"""The composition root of a mount: checks the paths, opens BASE and CACHE, matches base images
to their caches, builds images, stream, controller and FUSE operations, owns the one trio
nursery, handles SIGINT/SIGTERM/SIGHUP, and on the way out unmounts and commits every chunk state.

A base that does not answer at mount (BaseUnreachable: refused, DNS, timeout, 5xx) does not
stop a cache that holds images: they are served (local chunks as ever, missing ones EIO), and
the base is tried again in the background (1 s doubling to 60 s). When it answers, its images
are matched exactly as at mount (base_images.py): unchanged ones get their source back, changed
ones turn stale (ESTALE for missing chunks), never mixing versions. Anything else the base
says (403, 404, a bad certificate, a bad URL) refuses the mount, cache or not: it needs the
user. One bad image (its data file gone, its cache not creatable) is left out, not the mount.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import signal
import stat
from collections.abc import AsyncIterator, Callable, Sequence

import pyfuse3
import trio

from .base import BaseImage
from .base_images import BaseLink, down_error, match_images, open_and_list
from .cache_files import read_small_file, remove_small_file, write_small_file
from .cache_layout import MOUNTPOINT_FILE, TRACE_FILE, is_cache_dir
from .config import MountConfig
from .control import Controller
from .errors import BaseUnreachable, CacheError, CacheFull, CorfsError, UsageError
from .failure_log import FailureLog
from .fetcher import Fetcher, RetryPolicy
from .fuse_ops import CorfsOperations
from .handoff import settle_handoffs
from .image import Image
from .metrics import Metrics, MountSnapshot, serve_metrics
from .mount_paths import check_mountpoint, check_overlaps
from .mountinfo import find_mount
from .read_memory import ReadMemory
from .store import CacheHooks, CacheStore, ImageRecord
from .stream import StreamWorker
from .trace import TraceRecorder, convert_order, load_trace
from .write_behind import WriteBehind

log = logging.getLogger(__name__)

# SIGHUP too (as libfuse's handlers do): a foreground mount whose terminal went away (an ssh
# session dropped) was killed by it, leaving a dead mount and its last marks uncommitted.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STORE_ON_STOP_TIMEOUT = 60.0  # a clean stop stores the write-behind queue, at most this long


def run_mount(config: MountConfig, on_ready: Callable[[], None] | None = None) -> None:
    """Mount and serve until unmounted or signalled. Raises CorfsError for bad input."""
    mountpoint = check_mountpoint(config.mountpoint)
    check_overlaps(config.base_url, config.cache_dir, os.path.realpath(mountpoint))
    _take_the_open_files_limit()
    metrics = Metrics(base_speaks_http="://" in config.base_url)
    # Listening first: a port in use is refused before anything is mounted.
    stop_serving = serve_metrics(config.metrics, metrics.registry) if config.metrics else None
    try:
        trio.run(_serve, config, mountpoint, on_ready, metrics)
    finally:
        if stop_serving is not None:
            stop_serving()


def _take_the_open_files_limit() -> None:
    """Raise the soft limit of open files to the hard one. A mount holds a descriptor per
    image (its data file; a directory base's file too, once read), and systemd starts every
    service (corfs@.service too) with a soft limit of 1024: images past ~1000 were left out
    and FUSE then could not open /dev/fuse, failing the mount. The soft limit is low for
    programs that use select(); trio waits with epoll."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard and hard != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:  # a container may refuse: the soft one serves
            log.debug("cannot raise the limit of open files to %d: %s", hard, exc)


def _settle_handoffs(store: CacheStore, config: MountConfig) -> dict[str, str]:
    """Settle handoffs a killed daemon left under way (handoff.py), then drop the ones the
    user asked to forget; returns {image: DEST} of those still handed over."""
    handed_over = settle_handoffs(store)
    for name in config.forget_detached:
        if name not in handed_over:
            raise UsageError(f"--forget-detached {name}: {name} was not handed over to QEMU")
        store.end_handoff(name)
        log.warning("serving %s from the base again (its handoff to %s is forgotten)",
                    name, handed_over.pop(name))
    return handed_over


def _read_trace_file(path: str) -> str:
    """The text of --trace FILE, or UsageError. A regular file only: /dev/zero filled memory
    until the daemon died, a FIFO held the mount (and its CACHE locked) until a writer came."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO: at once
    except OSError as exc:
        raise UsageError(f"cannot read trace {path}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UsageError(f"trace {path} is not a regular file")
    # errors="replace": a binary file is then "not a corfs trace", not a UnicodeDecodeError.
    with open(fd, encoding="utf-8", errors="replace") as f:
        try:
            return f.read()
        except OSError as exc:
            raise UsageError(f"cannot read trace {path}: {exc.strerror}") from None


def _load_traces(
    config: MountConfig, store: CacheStore, images: list[Image]
) -> dict[str, list[int]]:
    text: str | None
    if config.stream.trace_file:
        text, source = _read_trace_file(config.stream.trace_file), config.stream.trace_file
        traces = load_trace(text, source)  # the user's file: refused as bad input
    else:
        text = read_small_file(store.root, TRACE_FILE)
        source = os.path.join(store.cache_dir, TRACE_FILE)
        if text is None or config.stream.record_trace:
            return {}
        try:
            traces = load_trace(text, source)
        except UsageError as exc:  # the cache's own hint, damaged (a crash as it was written)
            log.warning("%s: streaming in plain order", exc)
            return {}
    orders = {}
    for image in images:
        if image.name in traces:
            chunk_size, order = traces[image.name]
            geometry = image.geometry
            orders[image.name] = convert_order(
                order, chunk_size, geometry.chunk_size, geometry.chunk_count
            )
            log.info("%s: streaming %d traced chunks first", image.name, len(orders[image.name]))
    return orders


async def _store_fetched(
    stream: StreamWorker,
    images: Sequence[Image],
    write_behind: WriteBehind,
    store: CacheStore,
    store_wait: trio.CancelScope,
) -> None:
    """On a clean stop, what was fetched and waits in the write-behind queue is stored before
    the daemon exits (within STORE_ON_STOP_TIMEOUT; another stop signal ends the wait): those
    bytes cost a fetch, and a user who read an image and stopped finds it cached. The stream
    starts no more fills; a fill still fetching is not waited for (its chunks are fetched
    again), only what it queues meanwhile. Not once the cache cannot record chunks any more."""
    stream.pause()
    if store.sync_failure is not None or not any(image.storing for image in images):
        return
    log.info("storing the fetched chunks first (%.1f MiB queued; another signal skips this)",
             write_behind.queued_bytes / (1 << 20))
    with trio.move_on_after(STORE_ON_STOP_TIMEOUT) as deadline, store_wait:
        while storing := [image for image in images if image.storing]:
            await storing[0].wait_stored()
    if deadline.cancelled_caught:
        log.warning("stopping with fetched chunks not stored after %.0f s: they will be "
                    "fetched again", STORE_ON_STOP_TIMEOUT)


async def _commit_forever(
    store: CacheStore, interval: float, task_status=trio.TASK_STATUS_IGNORED
) -> None:
    task_status.started()
    # A long outage of the cache disk: not a line a second.
    failures = FailureLog(log, "committing chunk state", clock=trio.current_time)
    while True:
        await trio.sleep(interval)
        try:
            await store.commit()
        except CorfsError as exc:
            if store.sync_failure is not None:
                return  # said once in the log; committing again could record lost bytes
            failures.failed(exc)
        else:
            failures.succeeded()


async def _stop_on_signal(
    signals: AsyncIterator[int],
    session_over: trio.Event,
    store_wait: trio.CancelScope,
    images: Sequence[Image],
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """The first stop signal unmounts; one that comes while the fetched chunks are stored on
    the way out (_store_fetched) ends that wait."""
    task_status.started()
    terminated = False
    async for signum in signals:
        name = signal.Signals(signum).name
        if session_over.is_set():  # closing down: terminate() on a closed session would crash
            if any(image.storing for image in images) and not store_wait.cancel_called:
                log.warning("%s received: not waiting for the fetched chunks to be stored "
                            "(they will be fetched again)", name)
                store_wait.cancel()
            continue
        if terminated:
            continue  # the session is ending
        log.info("%s received: unmounting", name)
        # A live handoff re-pointing QEMU: its reopen drains QEMU's I/O through this mount,
        # which must still answer. No switch starts from now on (the handoffs before it are
        # undone); those under way end first, each QMP/virsh command of theirs bounded.
        for image in images:
            image.stopping = True
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_answer_signals_while_switching, signals, images)
            await _wait_for_switches(images)
            nursery.cancel_scope.cancel()
        if not session_over.is_set():
            pyfuse3.terminate()
            terminated = True


def _switching(images: Sequence[Image]) -> str:
    return ", ".join(image.name for image in images if image.switching_qemu)


async def _wait_for_switches(images: Sequence[Image]) -> None:
    waited, said_at = 0.0, -math.inf
    while switching := _switching(images):
        if waited - said_at >= 10:
            log.info("waiting for QEMU's switch of %s to its DEST first (%.0f s; SIGKILL "
                     "leaves it to the next mount)", switching, waited)
            said_at = waited
        await trio.sleep(0.05)
        waited += 0.05


async def _answer_signals_while_switching(
    signals: AsyncIterator[int], images: Sequence[Image]
) -> None:
    """Another signal while a switch is waited for (an impatient operator) is answered at
    once; it does not cut the switch short: QEMU's reopen drains its I/O through the mount."""
    async for signum in signals:
        log.warning("%s received again: still waiting for QEMU's switch of %s to its DEST "
                    "(SIGKILL leaves it to the next mount)",
                    signal.Signals(signum).name, _switching(images) or "an image")


def _read_ahead_file(mountpoint: str) -> str | None:
    """The mount's bdi read_ahead_kb, found through /proc/self/mountinfo: never by touching
    the mount itself, which would deadlock inside its own daemon."""
    entry = find_mount(mountpoint)
    return None if entry is None else f"/sys/class/bdi/{entry.device}/read_ahead_kb"


async def _raise_read_ahead(mountpoint: str, kib: int = 1024) -> None:
    """Buffered reads reach the daemon in requests as large as the mount's read-ahead (128 KiB
    by default); 1 MiB requests cost a quarter of the round trips. The kernel sets the
    read-ahead when it gets the reply to FUSE's INIT, after we could first write it, so keep
    it raised through the first second of the mount."""
    try:
        path = _read_ahead_file(mountpoint)
        if path is None:
            return
        for _ in range(100):
            with open(path, "r+") as bdi:
                if bdi.read().strip() != str(kib):
                    bdi.seek(0)
                    bdi.write(f"{kib}\n")
            await trio.sleep(0.01)
    except OSError as exc:
        log.debug("could not raise the read-ahead of %s: %s", mountpoint, exc)


def _fuse_options(config: MountConfig) -> set[str]:
    options = set(pyfuse3.default_options)
    options.add("fsname=corfs")
    options.add("subtype=corfs")
    options.discard("default_permissions")
    if config.allow_other:
        options.add("allow_other")
        options.add("default_permissions")
    if config.read_only:
        options.add("ro")
    return options


async def _serve(
    config: MountConfig,
    mountpoint: str,
    on_ready: Callable[[], None] | None,
    metrics: Metrics,
) -> None:
    down: CorfsError | None = None
    try:
        base, sources = await open_and_list(config)
    except Exception as exc:
        down = down_error(exc)
        if down is None:
            raise
        if not is_cache_dir(config.cache_dir):
            raise BaseUnreachable(str(down)) from None  # nothing cached to serve
        base, sources = None, []
    link = BaseLink(config, base)
    # The stop signals are ours from here to the end, not only while serving: one that
    # arrives while the session closes (after fusermount3 -u) must neither crash the daemon
    # nor kill it before the final commit. The receiver puts back the handlers it found when
    # it closes: ignoring, for a signal that comes after it, while the process exits.
    for signum in _STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    with trio.open_signal_receiver(*_STOP_SIGNALS) as signals:
        try:
            store = CacheStore.open(
                config.cache_dir,
                hooks=CacheHooks(written=metrics.cache_written, synced=metrics.cache_synced),
            )
            try:
                if down is not None and not store.records():
                    raise BaseUnreachable(str(down))
                await _serve_with(config, mountpoint, on_ready, link, sources, store, down,
                                  signals, metrics)
            finally:
                final_error = _final_commit(store)
                remove_small_file(store.root, MOUNTPOINT_FILE)
                store.close()
            if final_error is not None:  # a stop that lost chunk states must not look clean
                raise final_error
        finally:
            await link.aclose()


def _final_commit(store: CacheStore) -> CorfsError | None:
    """Commit what the mount marked since its last commit; the error if that failed: those
    chunks come back absent or clean at the next mount, client writes to them included."""
    try:
        store.commit_sync()
    except CorfsError as exc:
        full = isinstance(exc, CacheFull)
        return (CacheFull if full else CacheError)(
            f"the final commit failed ({exc}): chunks filled or written since the last "
            "commit are not recorded"
        )
    return None


def _build_images(
    config: MountConfig,
    store: CacheStore,
    fetcher: Fetcher,
    matched: list[tuple[ImageRecord, BaseImage | None]],
    nursery: trio.Nursery,
    recorder: TraceRecorder | None,
    write_behind: WriteBehind,
) -> list[Image]:
    images = []
    read_memory = ReadMemory.bounded(config.read_memory)
    for record, source in matched:
        try:
            first_reads = recorder.hook_for(record.name, record.chunk_size) if recorder else None
            image = Image(
                record, store, fetcher, source, nursery,
                read_only=config.read_only, first_reads=first_reads, write_behind=write_behind,
                random_range=config.random_range, read_memory=read_memory,
            )
        except (CorfsError, OSError) as exc:
            log.error("leaving out image %r: %s", record.name, exc)
            continue
        images.append(image)
    return images


def _init_fuse(operations: CorfsOperations, mountpoint: str, config: MountConfig) -> None:
    """pyfuse3.init, or UsageError: libfuse (or fusermount3, for a user who is not root)
    refusing the mount (no access to /dev/fuse or MNT, --allow-other without
    user_allow_other in /etc/fuse.conf) was a RuntimeError and its traceback. libfuse has
    printed its reason on stderr already."""
    try:
        pyfuse3.init(operations, mountpoint, _fuse_options(config))
    except RuntimeError as exc:
        raise UsageError(
            f"cannot mount on {mountpoint}: {exc} (FUSE's own message says why: on stderr, "
            "or with --daemon in --log-file)"
        ) from None


async def _serve_with(
    config: MountConfig,
    mountpoint: str,
    on_ready: Callable[[], None] | None,
    link: BaseLink,
    sources: Sequence[BaseImage],
    store: CacheStore,
    down: CorfsError | None,
    signals: AsyncIterator[int],
    metrics: Metrics,
) -> None:
    handed_over = _settle_handoffs(store, config)
    matched: list[tuple[ImageRecord, BaseImage | None]] = (
        match_images(store, sources, config, link.description, handed_over)
        if down is None
        else [(record, None) for record in store.records()]
    )
    fetcher = Fetcher(
        RetryPolicy(io_timeout=config.base.io_timeout),
        on_request=metrics.base_request,
        slots=config.base.max_connections,
    )
    owner = config.owner or (os.getuid(), os.getgid())
    recorder = TraceRecorder() if config.stream.record_trace else None
    session_over = trio.Event()
    async with trio.open_nursery() as nursery:
        write_behind = WriteBehind(config.write_behind)
        images = _build_images(config, store, fetcher, matched, nursery, recorder, write_behind)
        for image in images:
            if down is not None:
                image.missing_source = BaseUnreachable("the base does not answer")
        stream = StreamWorker(images, config.stream, _load_traces(config, store, images))
        controller = Controller(
            images,
            stream,
            store=store,
            base=link.description,
            mountpoint=mountpoint,
            fetcher=fetcher,
            write_behind=write_behind,
            current_base=lambda: link.store,
            handed_over_before=[h for h in store.handoffs() if h.done],
            background=nursery,
        )
        metrics.read_status_from(
            lambda: MountSnapshot(controller.status(), store.sync_failure is not None)
        )
        operations = CorfsOperations(
            images, controller, owner=owner, mode=config.mode, statfs_path=store.root,
            metrics=metrics,
        )
        def forget_unsynced() -> None:  # the chunks a failed sync lost, at once (store.py)
            for image in images:
                image.forget_unsynced()
            # Not after the unmount: the kernel's pages went with it, and the final commit
            # runs once this nursery is closed (start_soon would raise out of that commit).
            if not operations.session_closed:
                nursery.start_soon(operations.drop_stale_pages)

        store.on_sync_failure = forget_unsynced
        # Where the mount table will show it (a symlinked MNT is followed by the kernel):
        # resolved now, as MNT is not mounted yet; afterwards it would stat the mount itself.
        mounted_at = os.path.realpath(mountpoint)
        _init_fuse(operations, mountpoint, config)
        unmounted = False
        store_wait = trio.CancelScope()  # _store_fetched's wait, which a signal may end
        nursery.start_soon(_raise_read_ahead, mounted_at)
        try:
            try:
                write_small_file(store.root, MOUNTPOINT_FILE, mountpoint, store.cache_dir)
            except CorfsError as exc:  # a full cache disk still serves (slower, never wrong)
                log.warning("%s: `corfs status CACHE` and `corfs verify` will not find this "
                            "mount", exc)
            await nursery.start(_commit_forever, store, config.commit_interval)
            await nursery.start(stream.run)
            await nursery.start(_stop_on_signal, signals, session_over, store_wait, images)
            if down is not None:
                log.warning(
                    "base %s does not answer (%s): serving the %d cached images, chunks not "
                    "local fail with EIO until it does (trying it again in the background)",
                    link.description, down, len(images),
                )
                await nursery.start(link.reopen_when_back, images)
            log.info("mounted %s on %s (%d images)", link.description, mountpoint, len(images))
            if on_ready is not None:
                on_ready()
            await pyfuse3.main()
            session_over.set()
            operations.session_closed = True  # a handoff ending now must not notify the kernel
            unmounted = True  # first: a second close() would crash on the gone session
            pyfuse3.close(unmount=True)  # no request comes from here on: MNT is free at once
            log.info("unmounted %s", mountpoint)
            await _store_fetched(stream, images, write_behind, store, store_wait)
        finally:
            session_over.set()
            operations.session_closed = True
            nursery.cancel_scope.cancel()
            if not unmounted:
                pyfuse3.close(unmount=True)
                log.info("unmounted %s", mountpoint)
            if recorder is not None:
                try:
                    write_small_file(
                        store.root, TRACE_FILE, recorder.to_json(), store.cache_dir
                    )
                except CorfsError as exc:  # no chunk state lost: the stop is still clean
                    log.error("the recorded trace is lost: %s", exc)


