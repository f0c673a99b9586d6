"""Which base image each cached image is: pairing a base's listing with the cache's records at
mount (`match_images`), and again when a base that was down at mount answers (`BaseLink`,
`attach_sources`), by one rule: a name listed once, the same identity and size. Never mixing
versions: a changed image is refused (or with --reset-stale discarded) at mount, and turns
stale (ESTALE for missing chunks) when it changed while the base was down."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio

from .base import BaseImage, BaseStore, describe_url, open_base
from .config import MountConfig
from .errors import (
    BaseChanged,
    BaseNotFound,
    BaseUnreachable,
    CorfsError,
    TransientBaseError,
    internal_error,
    leaf_error,
)
from .geometry import ChunkGeometry
from .image import Image
from .sizes import format_size
from .store import CacheStore, ImageRecord

log = logging.getLogger(__name__)

REOPEN_FIRST = 1.0  # seconds before trying a base that was down at mount again; doubles
REOPEN_MAX = 60.0
# Chunks an image may have: a mount keeps two bytes a chunk in memory (its state, and what a
# crash could leave of it), 512 MiB at most: a 16 TiB image at 64 KiB chunks. A 64 TiB image
# (a base's largest) at 4 KiB chunks asked for 32 GiB: a MemoryError ended the mount, or the
# OOM killer did, for every image.
MAX_CHUNKS = 1 << 28


def match_images(
    store: CacheStore,
    sources: Sequence[BaseImage],
    config: MountConfig,
    base_name: str,
    handed_over: dict[str, str],
) -> list[tuple[ImageRecord, BaseImage | None]]:
    """Pair each base image with its cache record, creating new ones; refuse (or with
    --reset-stale, discard) a cache whose base image changed; keep cached images the base no
    longer has (a fully local image works without its base). An image handed over to QEMU
    (`handed_over`: name -> DEST) is never served: its writes live in DEST, and a VM restarted
    on MNT/IMAGE must not boot a fresh copy of the base."""
    matched: list[tuple[ImageRecord, BaseImage | None]] = []
    seen = set()
    for source in _listed_once(sources):
        seen.add(source.name)
        if source.name in handed_over:
            log.warning(
                "not serving image %s: it was handed over to QEMU as %s (mount with "
                "--forget-detached %s to serve it from the base again)",
                source.name, handed_over[source.name], source.name,
            )
            continue
        chunk_size = source.layout.chunk_size if source.layout else config.chunk_size
        record = store.record_of(source.name)
        if record is not None and not _same_image(record, source):
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
        if record is None and (too_many := _too_many_chunks(source.size, chunk_size)):
            log.error("leaving out image %r: %s", source.name, too_many)
            continue
        if record is None:
            try:
                record = store.create_image(
                    source.name, source.size, chunk_size, source.identity, base_name
                )
            except CorfsError as exc:
                log.error("leaving out image %r: cannot create its cache: %s", source.name, exc)
                continue
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


def _too_many_chunks(size: int, chunk_size: int) -> str | None:
    """Why an image of `size` bytes cannot be cached at `chunk_size`, or None if it can."""
    count = ChunkGeometry(size, chunk_size).chunk_count
    if count <= MAX_CHUNKS:
        return None
    enough = chunk_size
    while enough * MAX_CHUNKS < size:
        enough *= 2
    return (
        f"{count} chunks of {format_size(chunk_size)} are more than {MAX_CHUNKS} (a mount "
        f"keeps two bytes a chunk in memory): mount with --chunk-size {enough >> 10}K or more"
    )


def _listed_once(sources: Sequence[BaseImage]) -> list[BaseImage]:
    """The base images whose name the listing holds once: the one rule of `match_images` and
    `attach_sources`. No store lists a name twice today (each keys its listing by name), but
    should one, which object is the image cannot be told, and pairing a cache with one at
    mount and the other on reconnection would mix two objects' bytes: both are left out."""
    counts: dict[str, int] = {}
    for source in sources:
        counts[source.name] = counts.get(source.name, 0) + 1
    twice = sorted(name for name, count in counts.items() if count > 1)
    if twice:
        log.warning("the base lists these images more than once, leaving them out: %s",
                    ", ".join(map(repr, twice)))
    return [source for source in sources if counts[source.name] == 1]


def _same_image(record: ImageRecord, source: BaseImage) -> bool:
    """Whether the base image is the version the cache holds chunks of."""
    return record.identity == source.identity and record.size == source.size


def attach_sources(images: list[Image], sources: Sequence[BaseImage]) -> None:
    """The base answers again after it was down at mount: match its images to the ones served,
    as `match_images` did at mount (a live image cannot be discarded, so --reset-stale does
    not apply: a changed image stays stale until remounted)."""
    by_name = {source.name: source for source in _listed_once(sources)}
    for image in images:
        source = by_name.get(image.name)
        if source is None:
            image.missing_source = BaseNotFound("the base image is gone")
            log.warning(
                "image %s is not in the base any more; serving it from the cache", image.name
            )
        elif not _same_image(image.record, source):
            image.missing_source = BaseChanged("it changed in the base since it was cached")
            image.error = "base image changed since it was cached: remount (--reset-stale)"
            log.error(
                "refusing the missing chunks of image %s: it changed in the base since it was "
                "cached (remount with --reset-stale to discard its cache)",
                image.name,
            )
        else:
            image.attach_source(source)
    new = sorted(set(by_name) - {image.name for image in images})
    if new:
        log.info("the base has %d images this mount does not serve (remount to see them): %s",
                 len(new), ", ".join(map(repr, new)))


class BaseLink:
    """The base of a mount, which may only come up after the mount (closed at unmount)."""

    def __init__(self, config: MountConfig, store: BaseStore | None) -> None:
        self.config = config
        self.store = store
        self.description = store.description if store else describe_url(config.base_url)

    async def reopen_when_back(
        self, images: list[Image], task_status=trio.TASK_STATUS_IGNORED
    ) -> None:
        """Try the base with backoff until it answers, then give the images their sources."""
        task_status.started()
        delay, last_refusal = REOPEN_FIRST, ""
        while True:
            await trio.sleep(delay)
            delay = min(REOPEN_MAX, delay * 2)
            try:
                self.store, sources = await open_and_list(self.config)
            except Exception as exc:
                if (still_down := down_error(exc)) is not None:
                    log.debug("base %s still does not answer: %s", self.description, still_down)
                    continue
                # It answers, but no (or a bug): say so once per reason, keep trying.
                reason = str(leaf_error(exc) or internal_error(exc))
                if reason != last_refusal:
                    last_refusal = reason
                    log.warning("base %s refuses: %s (retrying)", self.description, reason)
                continue
            log.info("base %s answers again: missing chunks are fetched from it", self.description)
            attach_sources(images, sources)
            return

    async def aclose(self) -> None:
        if self.store is not None:
            await self.store.aclose()


def down_error(exc: BaseException) -> CorfsError | None:
    """The error if `exc` says the base does not answer (possibly grouped by a nursery: every
    listing request failing so), else None."""
    if isinstance(exc, BaseExceptionGroup):
        found = [down_error(inner) for inner in exc.exceptions]
        return found[0] if found and all(found) else None
    return exc if isinstance(exc, (BaseUnreachable, TransientBaseError)) else None


async def open_and_list(config: MountConfig) -> tuple[BaseStore, Sequence[BaseImage]]:
    base = await open_base(config.base_url, config.base)
    try:
        return base, await base.list_images()
    except BaseException:
        await base.aclose()
        raise
