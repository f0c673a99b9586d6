"""Chunk digests (xxh3-128) and the zero test, shared by the store, the fetcher and publish."""

from __future__ import annotations

import xxhash

DIGEST_SIZE = 16
_ZEROS = bytes(1 << 20)


def chunk_digest(data: bytes | bytearray | memoryview) -> bytes:
    return xxhash.xxh3_128_digest(data)


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """True when every byte is zero; compares against a shared zero buffer (memcmp speed)."""
    view = memoryview(data)
    step = len(_ZEROS)
    return all(view[i : i + step] == _ZEROS[: len(view[i : i + step])] for i in range(0, len(view), step))


def to_hex(digest: bytes) -> str:
    return digest.hex()


def from_hex(text: str) -> bytes:
    digest = bytes.fromhex(text)
    if len(digest) != DIGEST_SIZE:
        raise ValueError(f"digest {text!r} is not {DIGEST_SIZE} bytes")
    return digest
