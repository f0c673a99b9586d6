"""In-memory base with fault injection: the test double that ships beside the protocol.
Used by tests/core to drive image, fetcher, store and stream without a kernel or a network."""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from ..buffers import aligned_copy
from ..digest import Buffer
from ..errors import BaseChanged, BaseError, BaseNotFound, BaseProtocolError, TransientBaseError
from . import ChunkLayout


@dataclass
class Faults:
    """What the next reads do. Counters count down; `delay` applies to every read."""

    delay: float = 0.0
    fail_next: int = 0  # raise TransientBaseError this many times
    fail_with: type[BaseError] = TransientBaseError
    stall: bool = False  # never answer (until the caller gives up)
    corrupt_next: int = 0  # flip a byte in this many answers
    short_next: int = 0  # return one byte less this many times
    corrupt_at: set[int] = field(default_factory=set)  # flip these bytes in every answer


@dataclass
class MemoryImage:
    name: str
    data: bytearray
    identity: str = "v1"
    layout: ChunkLayout | None = None
    faults: Faults = field(default_factory=Faults)
    reads: list[tuple[int, int]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    _opened_identity: str | None = None

    @property
    def size(self) -> int:
        return len(self.data)

    def replace(self, data: bytes, identity: str) -> None:
        """Change the image behind corfs' back, as an admin rewriting the base would."""
        self.data = bytearray(data)
        self.identity = identity

    async def read(self, offset: int, length: int) -> Buffer:
        opened = self._opened_identity
        self.reads.append((offset, length))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            f = self.faults
            if f.delay:
                await trio.sleep(f.delay)
            else:
                await trio.lowlevel.checkpoint()
            if f.stall:
                await trio.sleep_forever()
            if opened is not None and opened != self.identity:
                raise BaseChanged(f"{self.name} changed")
            if f.fail_next:
                f.fail_next -= 1
                raise f.fail_with(f"injected failure reading {self.name}")
            data = bytes(self.data[offset : offset + length])
            if f.corrupt_next:
                f.corrupt_next -= 1
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            if hit := [at - offset for at in f.corrupt_at if offset <= at < offset + len(data)]:
                damaged = bytearray(data)
                for at in hit:
                    damaged[at] ^= 0x55
                data = bytes(damaged)
            if f.short_next:
                f.short_next -= 1
                data = data[:-1]
            return aligned_copy(data)  # as the real bases answer (store.write_fill)
        finally:
            self.in_flight -= 1

    @property
    def bytes_read(self) -> int:
        return sum(length for _, length in self.reads)


class MemoryBase:
    description = "memory://"

    def __init__(self, images: dict[str, bytes] | None = None) -> None:
        self.objects: dict[str, bytes] = {}
        self.object_reads: list[str] = []
        self.images: dict[str, MemoryImage] = {
            name: MemoryImage(name, bytearray(data)) for name, data in (images or {}).items()
        }

    def add(self, image: MemoryImage) -> MemoryImage:
        self.images[image.name] = image
        return image

    async def list_images(self) -> list[MemoryImage]:
        for image in self.images.values():
            image._opened_identity = image.identity
        return list(self.images.values())

    async def read_object(self, key: str, max_bytes: int) -> bytes:
        await trio.lowlevel.checkpoint()
        self.object_reads.append(key)
        try:
            data = self.objects[key]
        except KeyError:
            raise BaseNotFound(f"memory://{key} does not exist") from None
        if len(data) > max_bytes:
            raise BaseProtocolError(f"memory://{key} is larger than {max_bytes} bytes")
        return data

    async def aclose(self) -> None:
        pass
