"""Published images (written by corfs/publish/, format in corfs/manifest.py) as base images.

`with_published_images(store)` wraps any BaseStore. In its listing each `<name>.corfs.json`
becomes image `<name>`: its size and `layout` come from the manifest, its `identity` is
"manifest:" + xxh3-128 of the manifest bytes, and a read fetches the chunk objects it covers
(concurrently), decompresses them and returns the bytes. Zero chunks are never fetched.

Invariants:
- A read returns exactly the requested length or raises: a chunk object that does not
  decompress to exactly its chunk's length raises BaseCorrupt, and decompression never
  produces more than that length (a zstd bomb is refused, not expanded).
- Digests are not checked here: the fetcher checks every chunk against `layout` (so it can
  refetch once, then fail). A swapped or altered object that still decompresses yields bytes
  whose digest is wrong, never bytes passed off as right.
- Bodies are capped before they are buffered: a manifest at MAX_MANIFEST_BYTES received (not
  as listed), a chunk object at `max_packed_size` of its chunk (zstd's worst case), so a
  hostile base cannot make the daemon buffer more than that.
- Chunk objects are content-addressed, so an image stays readable under its identity even if
  its manifest is replaced later (as long as its chunks are kept).
- Plain raw images pass through unchanged; a published image shadows a raw one of the same
  name. A manifest that does not parse, or whose digests would take the listing past
  `manifest_memory`, leaves its image out with one warning; others serve.
  Every image listed, raw or published, passes `valid_entry` (name and size), whatever store
  is wrapped.
- Manifests are parsed and hashed off the trio thread (manifest_loading.py).
- `index.json` (publish's listing for HTTP bases) is metadata, never an image.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio
import zstandard

from ..buffers import aligned_zeros
from ..errors import BaseCorrupt
from ..geometry import ChunkGeometry
from ..manifest import INDEX_KEY, Manifest, chunk_key, image_name_of
from . import (
    DEFAULT_MANIFEST_MEMORY,
    BaseImage,
    BaseStore,
    ChunkLayout,
    one_error_per_listing,
    valid_entry,
)
from .manifest_loading import ManifestBudget, ParsedManifest, load_in_order

log = logging.getLogger(__name__)

_FETCHES_PER_READ = 8
_DECOMPRESS_LIMITER = trio.CapacityLimiter(4)


def max_packed_size(chunk_length: int) -> int:
    """The largest zstd frame one chunk of `chunk_length` bytes can take: ZSTD_compressBound
    plus room for frame headers and checksum (any compressor's, not only ours)."""
    small_input_margin = ((128 << 10) - chunk_length) >> 11 if chunk_length < (128 << 10) else 0
    return chunk_length + (chunk_length >> 8) + small_input_margin + 1024


def decompress_chunk(packed: bytes, expected: int, what: str) -> bytes:
    """The chunk in zstd frame `packed`, which must be exactly `expected` bytes long."""
    try:
        declared = zstandard.frame_content_size(packed)
    except zstandard.ZstdError as exc:
        raise BaseCorrupt(f"chunk object {what} is not a zstd frame ({exc})") from None
    # decompress() trusts a declared content size over max_output_size, so check it first.
    if declared not in (-1, expected):
        raise BaseCorrupt(f"chunk object {what} declares {declared} bytes, expected {expected}")
    try:
        data = zstandard.ZstdDecompressor().decompress(packed, max_output_size=expected)
    except zstandard.ZstdError as exc:
        raise BaseCorrupt(f"chunk object {what} does not decompress ({exc})") from None
    if len(data) != expected:
        raise BaseCorrupt(f"chunk object {what} holds {len(data)} bytes, expected {expected}")
    return data


@dataclass
class PublishedImage:
    name: str
    size: int
    identity: str
    layout: ChunkLayout
    manifest: Manifest = field(repr=False)
    store: BaseStore = field(repr=False)

    async def _fetch(self, index: int, out: memoryview, at: int, limiter: trio.CapacityLimiter,
                     ) -> None:
        digest = self.layout.digests[index]
        assert digest is not None
        key = chunk_key(digest)
        expected = self.manifest.chunk_length(index)
        async with limiter:
            packed = await self.store.read_object(key, max_packed_size(expected))
        data = await trio.to_thread.run_sync(
            decompress_chunk, packed, expected, key, limiter=_DECOMPRESS_LIMITER
        )
        out[at : at + expected] = data

    async def _fetch_all(self, wanted: list[int], out: memoryview, start: int,
                         limiter: trio.CapacityLimiter) -> None:
        """Fetch chunks concurrently; the first failure cancels the rest and is raised as
        itself (not an ExceptionGroup), as a single-chunk read would raise it."""
        failures: list[Exception] = []
        cs = self.layout.chunk_size

        async def one(index: int, cancel_scope: trio.CancelScope) -> None:
            try:
                await self._fetch(index, out, index * cs - start, limiter)
            except Exception as exc:
                failures.append(exc)
                cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            for index in wanted:
                nursery.start_soon(one, index, nursery.cancel_scope)
        if failures:
            raise failures[0]

    async def read(self, offset: int, length: int) -> memoryview:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"read of {length} at {offset} is outside {self.name} ({self.size})")
        if length == 0:
            return aligned_zeros(0)
        geometry = ChunkGeometry(self.size, self.layout.chunk_size)
        chunks = geometry.chunks_of(offset, length)
        start = geometry.chunk_start(chunks.start)
        # Whole chunks land in `out` (zeros where chunks are zero); trim to the range after.
        out = aligned_zeros(geometry.length_of_chunks(chunks))
        wanted = [i for i in chunks if self.layout.digests[i] is not None]
        limiter = trio.CapacityLimiter(_FETCHES_PER_READ)
        if len(wanted) == 1:
            await self._fetch(wanted[0], out, geometry.chunk_start(wanted[0]) - start, limiter)
        elif wanted:
            await self._fetch_all(wanted, out, start, limiter)
        if offset == start and length == len(out):
            return out
        return out[offset - start : offset - start + length]


class PublishedStore:
    """A BaseStore whose listing shows published images in place of their manifests; the
    manifests are loaded by manifest_loading.py (off the trio thread, under `manifest_memory`
    bytes of digests)."""

    def __init__(self, store: BaseStore, manifest_memory: int = DEFAULT_MANIFEST_MEMORY) -> None:
        self.inner = store
        self.description = store.description
        self.manifest_memory = manifest_memory
        self._parse_limiter = trio.CapacityLimiter(1)
        # One listing at a time (a forget and a reconnect may ask at once): two would each
        # parse everything and each take a whole budget, twice --manifest-memory.
        self._listing = trio.Lock()
        # manifest name -> (identity of the manifest object, image built from it, bytes held)
        self._cache: dict[str, tuple[str, PublishedImage, int]] = {}
        # manifest name -> (identity, bytes it would hold) of those left out for memory: not
        # read again while unchanged and still too large for what the budget has left
        self._too_large: dict[str, tuple[str, int]] = {}

    async def _published(self, manifests: list[tuple[BaseImage, str]]) -> dict[str, BaseImage]:
        """Image name -> image of each manifest that parses and fits: the ones served since
        the last listing and unchanged first, then the others by name (manifest_loading.py)."""
        budget = ManifestBudget(self.description, self.manifest_memory)
        cache, self._cache = self._cache, {}
        too_large, self._too_large = self._too_large, {}
        published: dict[str, BaseImage] = {}
        to_load = []
        for entry, name in sorted(manifests, key=lambda m: m[1]):
            cached = cache.get(entry.name)
            if cached is None or cached[0] != entry.identity:
                to_load.append((entry, name))
            elif budget.admit(name, cached[2]):
                self._cache[entry.name] = cached
                published[name] = cached[1]

        def still_too_large(entry: BaseImage, name: str) -> bool:
            """Left out last time and unchanged: the budget only fills from here, so one that
            does not fit now would not at its turn either; said as left out, not read."""
            known = too_large.get(entry.name)
            if known is None or known[0] != entry.identity or budget.fits(known[1]):
                return False
            budget.admit(name, known[1])  # says it is left out
            self._too_large[entry.name] = known
            return True

        to_load = [(entry, name) for entry, name in to_load if not still_too_large(entry, name)]

        def use(entry: BaseImage, name: str, parsed: ParsedManifest) -> None:
            manifest = parsed.manifest
            if not valid_entry(self.description, name, manifest.size):
                return
            if not budget.admit(name, parsed.held):
                self._too_large[entry.name] = (entry.identity, parsed.held)
                return
            image = PublishedImage(
                name=name,
                size=manifest.size,
                identity=parsed.identity,
                layout=ChunkLayout(manifest.chunk_size, manifest.digests),
                manifest=manifest,
                store=self.inner,
            )
            self._cache[entry.name] = (entry.identity, image, parsed.held)
            published[name] = image

        with one_error_per_listing():
            await load_in_order(self.inner, to_load, self._parse_limiter, use)
        return published

    async def list_images(self) -> Sequence[BaseImage]:
        entries = await self.inner.list_images()
        raw: dict[str, BaseImage] = {}
        manifests: list[tuple[BaseImage, str]] = []
        for entry in entries:
            name = image_name_of(entry.name)
            if name is not None:
                if valid_entry(self.description, name):
                    manifests.append((entry, name))
            elif entry.name != INDEX_KEY and valid_entry(self.description, entry.name, entry.size):
                raw[entry.name] = entry
        async with self._listing:
            published = await self._published(manifests)
        for name in published:
            if name in raw:
                log.info("%s: published image %r shadows the raw file of that name",
                         self.description, name)
        images: dict[str, BaseImage] = {**raw}
        images.update(published)
        return [images[name] for name in sorted(images)]

    async def read_object(self, key: str, max_bytes: int) -> bytes:
        return await self.inner.read_object(key, max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def with_published_images(
    store: BaseStore, manifest_memory: int = DEFAULT_MANIFEST_MEMORY
) -> BaseStore:
    return PublishedStore(store, manifest_memory)
