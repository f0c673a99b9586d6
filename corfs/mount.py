"""The composition root of a mount: checks the paths, opens BASE and CACHE, matches base images
to their caches, builds images, stream, controller and FUSE operations, owns the one trio
nursery, handles SIGINT/SIGTERM, and on the way out unmounts and commits every chunk state."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
from collections.abc import Callable

import pyfuse3
import trio

from .base import BaseImage, BaseStore, open_base
from .config import MountConfig
from .control import MOUNTPOINT_FILE, Controller
from .errors import CorfsError, UsageError
from .fetcher import Fetcher, RetryPolicy
from .fuse_ops import CorfsOperations
from .image import Image
from .mountinfo import find_mount
from .store import CacheStore, ImageRecord
from .stream import StreamWorker
from .trace import TRACE_FILE, TraceRecorder, convert_order, load_trace

log = logging.getLogger(__name__)


def check_mountpoint(path: str) -> str:
    """The absolute mountpoint, or UsageError: missing, not a directory, already mounted."""
    mountpoint = os.path.abspath(path)
    try:
        os.stat(mountpoint)
    except FileNotFoundError:
        raise UsageError(f"mountpoint {path} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise UsageError(
                f"{path} is a dead FUSE mount (its daemon was killed); clear it with: "
                f"fusermount3 -u -z {path}"
            ) from None
        raise UsageError(f"mountpoint {path}: {exc.strerror}") from None
    if not os.path.isdir(mountpoint):
        raise UsageError(f"mountpoint {path} is not a directory")
    if os.path.ismount(mountpoint):
        raise UsageError(f"{path} is already a mountpoint")
    if not os.path.exists("/dev/fuse"):
        raise UsageError("/dev/fuse is missing: load the fuse module (modprobe fuse)")
    return mountpoint


def run_mount(config: MountConfig, on_ready: Callable[[], None] | None = None) -> None:
    """Mount and serve until unmounted or signalled. Raises CorfsError for bad input."""
    mountpoint = check_mountpoint(config.mountpoint)
    trio.run(_serve, config, mountpoint, on_ready)


def _match_images(
    store: CacheStore, sources: list[BaseImage], config: MountConfig, base_name: str
) -> list[tuple[ImageRecord, BaseImage | None]]:
    """Pair each base image with its cache record, creating new ones; refuse (or with
    --reset-stale, discard) a cache whose base image changed; keep cached images the base no
    longer has (a fully local image works without its base)."""
    matched: list[tuple[ImageRecord, BaseImage | None]] = []
    seen = set()
    for source in sources:
        seen.add(source.name)
        chunk_size = source.layout.chunk_size if source.layout else config.chunk_size
        record = store.record_of(source.name)
        if record is not None and (
            record.identity != source.identity or record.size != source.size
        ):
            if not config.reset_stale:
                log.error(
                    "refusing image %s: it changed in the base since it was cached "
                    "(mount with --reset-stale to discard its cache)",
                    source.name,
                )
                continue
            log.warning("image %s changed in the base: discarding its cache", source.name)
            store.drop_image(source.name)
            record = None
        if record is None:
            record = store.create_image(
                source.name, source.size, chunk_size, source.identity, base_name
            )
        elif record.chunk_size != chunk_size and source.layout is None:
            log.info("%s: keeping the cache's chunk size of %d", source.name, record.chunk_size)
        matched.append((record, source))
    for record in store.records():
        if record.name not in seen:
            log.warning(
                "image %s is not in the base any more; serving it from the cache", record.name
            )
            matched.append((record, None))
    return matched


def _load_traces(
    config: MountConfig, store: CacheStore, images: list[Image]
) -> dict[str, list[int]]:
    if config.stream.trace_file:
        try:
            with open(config.stream.trace_file) as f:
                text, source = f.read(), config.stream.trace_file
        except OSError as exc:
            raise UsageError(
                f"cannot read trace {config.stream.trace_file}: {exc.strerror}"
            ) from None
    else:
        text, source = store.read_small_file(TRACE_FILE), os.path.join(store.cache_dir, TRACE_FILE)
        if text is None or config.stream.record_trace:
            return {}
    traces = load_trace(text, source)
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


async def _commit_forever(
    store: CacheStore, interval: float, task_status=trio.TASK_STATUS_IGNORED
) -> None:  # noqa: ANN001
    task_status.started()
    while True:
        await trio.sleep(interval)
        try:
            await store.commit()
        except CorfsError as exc:
            if store.sync_failure is not None:
                return  # said once in the log; committing again could record lost bytes
            log.error("committing chunk state failed (will retry): %s", exc)


async def _stop_on_signal(task_status=trio.TASK_STATUS_IGNORED) -> None:  # noqa: ANN001
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            log.info("%s received: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


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


async def _serve(config: MountConfig, mountpoint: str, on_ready: Callable[[], None] | None) -> None:
    base: BaseStore = await open_base(config.base_url, config.base)
    try:
        sources = await base.list_images()
        store = CacheStore.open(config.cache_dir)
        try:
            await _serve_with(config, mountpoint, on_ready, base, sources, store)
        finally:
            with contextlib.suppress(CorfsError):
                store.commit_sync()
            store.remove_small_file(MOUNTPOINT_FILE)
            store.close()
    finally:
        await base.aclose()


async def _serve_with(
    config: MountConfig,
    mountpoint: str,
    on_ready: Callable[[], None] | None,
    base: BaseStore,
    sources: list[BaseImage],
    store: CacheStore,
) -> None:
    matched = _match_images(store, sources, config, base.description)
    fetcher = Fetcher(RetryPolicy(io_timeout=config.base.io_timeout))
    owner = config.owner or (os.getuid(), os.getgid())
    recorder = TraceRecorder() if config.stream.record_trace else None
    async with trio.open_nursery() as nursery:
        images = []
        for record, source in matched:
            mtime = os.stat(store.data_path(record.name)).st_mtime_ns
            image = Image(
                record, store, fetcher, source, nursery, read_only=config.read_only, mtime_ns=mtime
            )
            if recorder is not None:
                image.first_reads = recorder.hook_for(image.name, image.geometry.chunk_size)
            images.append(image)
        stream = StreamWorker(images, config.stream, _load_traces(config, store, images))
        controller = Controller(
            images,
            stream,
            cache=store.cache_dir,
            base=base.description,
            mountpoint=mountpoint,
            fetcher_statistics=fetcher.statistics,
            base_store=base,
        )
        operations = CorfsOperations(
            images, controller, owner=owner, mode=config.mode, statfs_path=store.cache_dir
        )
        pyfuse3.init(operations, mountpoint, _fuse_options(config))
        nursery.start_soon(_raise_read_ahead, mountpoint)
        try:
            store.write_small_file(MOUNTPOINT_FILE, mountpoint)
            await nursery.start(_commit_forever, store, config.commit_interval)
            await nursery.start(stream.run)
            await nursery.start(_stop_on_signal)
            log.info("mounted %s on %s (%d images)", base.description, mountpoint, len(images))
            if on_ready is not None:
                on_ready()
            await pyfuse3.main()
        finally:
            nursery.cancel_scope.cancel()
            pyfuse3.close(unmount=True)
            if recorder is not None:
                store.write_small_file(TRACE_FILE, recorder.to_json())
            log.info("unmounted %s", mountpoint)
