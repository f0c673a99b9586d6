"""Loading the manifests a listing names (for published.py): read ahead, parsed off the trio
thread one at a time, admitted in a fixed order under a memory budget.

Why: parsing a 64 MiB manifest (1.6 M chunks) takes 1-2 s of CPU. On the trio thread it held
every FUSE request of the mount that long, at each re-listing (a forget, a base that answers
again). And each image served keeps its manifest's digests: many large manifests in one base
could take any amount of memory.

Invariants:
- The trio thread never parses nor hashes a manifest: a worker thread does, one at a time per
  store (`parse_limiter`). What is left on the trio thread is waiting. json.loads itself runs
  in C holding the GIL (~3 ns a byte, ~0.2 s for the largest manifest), so a request can wait
  that long once; the per-chunk checks after it (most of the time) let it through.
- Memory: the digests of the images admitted in one listing stay within the budget
  (`held_bytes`: measured costs below); besides, at most READ_AHEAD raw manifests are held
  and one parse is under way (its peak: ~150 bytes a chunk).
- Order: the caller admits what it kept from the last listing first, then these in the order
  given (by name): the same base gives the same images every time, and a manifest that
  appears later never pushes out an image already served. An image left out gets one line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trio
import xxhash

from ..manifest import MAX_MANIFEST_BYTES, Manifest, parse_manifest
from . import BaseImage, BaseStore, leave_out, skip_bad_entry

log = logging.getLogger(__name__)

READ_AHEAD = 4  # manifests read while an earlier one is parsed: 4 x 64 MiB at most

# What a parsed manifest keeps, measured with tracemalloc (CPython 3.11, parse_manifest of
# 200 000 chunks): 57 bytes per stored chunk (a 16-byte bytes object, 49, and its tuple slot)
# and 8 per zero chunk (the slot, holding None).
SLOT_BYTES = 8
DIGEST_BYTES = 49


def held_bytes(manifest: Manifest) -> int:
    """Memory the digests of `manifest` keep while its image is served."""
    stored = len(manifest.digests) - manifest.digests.count(None)
    return SLOT_BYTES * len(manifest.digests) + DIGEST_BYTES * stored


@dataclass(frozen=True)
class ParsedManifest:
    manifest: Manifest
    identity: str  # "manifest:" + xxh3-128 of its bytes
    held: int  # held_bytes(manifest)


def parse_and_hash(data: bytes, name: str) -> ParsedManifest:
    """The worker thread's part: BaseCorrupt (one line naming `name`) if it does not parse."""
    manifest = parse_manifest(data, name)
    return ParsedManifest(manifest, "manifest:" + xxhash.xxh3_128_hexdigest(data),
                          held_bytes(manifest))


class ManifestBudget:
    """Bytes of digests one listing may keep; each image admitted takes its share."""

    def __init__(self, description: str, limit: int) -> None:
        self.description = description
        self.limit = limit
        self.used = 0

    def fits(self, held: int) -> bool:
        return self.used + held <= self.limit

    def admit(self, name: str, held: int) -> bool:
        """Take `held` bytes for image `name`, or leave it out with one line."""
        if not self.fits(held):
            leave_out(
                self.description,
                name,
                f"its manifest's digests would take {held} bytes of memory, and "
                f"{self.limit - self.used} of the {self.limit} allowed are left "
                "(--manifest-memory)",
            )
            return False
        self.used += held
        return True


@dataclass
class _Read:
    entry: BaseImage
    name: str
    done: trio.Event = field(default_factory=trio.Event)
    data: bytes | None = None  # None: left out (said so) or not read yet


async def load_in_order(
    store: BaseStore,
    entries: Sequence[tuple[BaseImage, str]],
    parse_limiter: trio.CapacityLimiter,
    use: Callable[[BaseImage, str, ParsedManifest], None],
) -> None:
    """Read the manifest of each (entry, image name), up to READ_AHEAD ahead, parse them one
    by one in a worker thread and hand each that parses to `use`, in the order given. A bad
    entry is left out with one line (`skip_bad_entry`); a base that does not answer fails the
    whole listing."""
    reads = [_Read(entry, name) for entry, name in entries]
    slots = trio.Semaphore(READ_AHEAD)

    async def read(item: _Read) -> None:
        try:
            if item.entry.size > MAX_MANIFEST_BYTES:
                leave_out(store.description, item.name,
                          f"its manifest of {item.entry.size} bytes is too large")
                return
            with skip_bad_entry(store.description, item.name):
                item.data = await store.read_object(item.entry.name, MAX_MANIFEST_BYTES)
        finally:
            item.done.set()

    async def start_reads(nursery: trio.Nursery) -> None:
        for item in reads:
            await slots.acquire()
            nursery.start_soon(read, item)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(start_reads, nursery)
        for item in reads:
            await item.done.wait()
            data, item.data = item.data, None
            try:
                if data is None:
                    continue
                parsed = None
                with skip_bad_entry(store.description, item.name):
                    parsed = await trio.to_thread.run_sync(
                        parse_and_hash, data, item.name, limiter=parse_limiter
                    )
                del data
                if parsed is not None:
                    use(item.entry, item.name, parsed)
            finally:
                slots.release()
