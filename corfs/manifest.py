"""The published-image format: manifest, chunk object keys and the base index.

Layout of a published base (written by corfs/publish/, read by corfs/base/published.py):

    <name>.corfs.json                 manifest of image <name> (written last)
    chunks/<hex[:2]>/<hex>.zst        one zstd frame per distinct non-zero chunk; <hex> is the
                                      xxh3-128 of the *uncompressed* chunk
    index.json                        {"images": [{"name": ..., "size": ...}, ...]} so a plain
                                      HTTP server can list the base without autoindex

Manifest (version 1):

    {"format": "corfs-manifest", "version": 1, "name": "disk.raw", "size": 10485760,
     "chunk_size": 1048576, "compression": "zstd", "chunks": ["<32 hex>" | "zero", ...]}

The parser is strict: anything that does not describe exactly one consistent image raises
BaseCorrupt with one line that names the image. Unknown extra keys are ignored so that
version 1 can grow optional fields; a format change bumps the version, which is refused.
Pure data: no I/O here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .base import MAX_NAME_BYTES, image_name_problem
from .digest import DIGEST_HEX_LENGTH, DIGEST_SIZE, digest_hex
from .errors import BaseCorrupt
from .geometry import ChunkGeometry

MANIFEST_FORMAT = "corfs-manifest"
MANIFEST_VERSION = 1
MANIFEST_SUFFIX = ".corfs.json"
INDEX_KEY = "index.json"
CHUNKS_PREFIX = "chunks/"
ZERO_CHUNK = "zero"
COMPRESSION = "zstd"
MIN_CHUNK_SIZE = 4 << 10
MAX_CHUNK_SIZE = 64 << 20  # also bounds what one chunk object may decompress to
MAX_MANIFEST_BYTES = 64 << 20  # ~1.7 M stored chunks; anything larger is not a manifest
# The fewest bytes one chunk takes in a manifest (to_json's last line, '  "zero"' and its line
# break): an image of more chunks than MAX_MANIFEST_BYTES holds at this rate cannot be published.
MIN_CHUNK_LINE_BYTES = 9

# What json.loads raises for bytes that are no JSON document. RecursionError too: nesting a
# few thousand deep ('[[[[...') is not a ValueError, and it escaped every per-entry handler.
JSON_ERRORS = (ValueError, RecursionError)  # UnicodeDecodeError is a ValueError
_HEX_DIGEST = re.compile(rf"[0-9a-f]{{{DIGEST_HEX_LENGTH}}}")


def chunk_key(digest: bytes) -> str:
    """Key of the chunk object holding the chunk with this digest."""
    h = digest_hex(digest)
    return f"{CHUNKS_PREFIX}{h[:2]}/{h}.zst"


def manifest_key(name: str) -> str:
    return name + MANIFEST_SUFFIX


def image_name_of(key: str) -> str | None:
    """'disk.raw.corfs.json' -> 'disk.raw'; None for a key that is no manifest."""
    if "/" in key or not key.endswith(MANIFEST_SUFFIX) or key == MANIFEST_SUFFIX:
        return None
    return key[: -len(MANIFEST_SUFFIX)]


def manifest_size_problem(size: int) -> str | None:
    """Why a manifest of `size` bytes is refused (by mounts; publish never writes one), or None."""
    if size > MAX_MANIFEST_BYTES:
        return f"{size} bytes, more than the {MAX_MANIFEST_BYTES} a manifest may take"
    return None


def chunk_line_bytes(digest: bytes | None) -> int:
    """The fewest bytes a chunk of this digest (None: zero) takes in a manifest (to_json)."""
    return MIN_CHUNK_LINE_BYTES + (0 if digest is None else DIGEST_HEX_LENGTH - len(ZERO_CHUNK))


def max_manifest_chunks() -> int:
    """More chunks than this never fit in a manifest, even all of them zero."""
    return MAX_MANIFEST_BYTES // MIN_CHUNK_LINE_BYTES


def check_image_name(name: str) -> str | None:
    """Why `name` cannot be a published image name, or None if it can: any image name
    (base.image_name_problem) whose manifest's name is one too, not hidden, not a name publish
    itself uses."""
    if (problem := image_name_problem(name)) is not None:
        return problem
    if len(manifest_key(name).encode()) > MAX_NAME_BYTES:
        return f"its manifest's name would be longer than {MAX_NAME_BYTES} bytes"
    if name.startswith("."):
        return "it starts with '.'"
    if name == INDEX_KEY or name.endswith(MANIFEST_SUFFIX):
        return f"{INDEX_KEY!r} and '*{MANIFEST_SUFFIX}' are reserved"
    return None


@dataclass(frozen=True)
class Manifest:
    name: str
    size: int
    chunk_size: int
    digests: tuple[bytes | None, ...]  # per chunk; None = all zero (not stored)
    compression: str = COMPRESSION

    @property
    def chunk_count(self) -> int:
        return len(self.digests)

    @property
    def geometry(self) -> ChunkGeometry:
        return ChunkGeometry(self.size, self.chunk_size)

    def chunk_length(self, index: int) -> int:
        """Bytes of chunk `index` (the last one may be short)."""
        return self.geometry.chunk_length(index)

    def to_json(self) -> bytes:
        doc = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "name": self.name,
            "size": self.size,
            "chunk_size": self.chunk_size,
            "compression": self.compression,
            "chunks": [ZERO_CHUNK if d is None else digest_hex(d) for d in self.digests],
        }
        # One chunk per line: diffable, and still ~40 bytes per chunk.
        return (json.dumps(doc, indent=1, ensure_ascii=False) + "\n").encode()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_manifest(data: bytes, image: str) -> Manifest:
    """Parse manifest bytes of image `image` (for messages; when the manifest's own name
    differs, that is corruption too: a renamed or swapped manifest)."""

    def corrupt(why: str) -> BaseCorrupt:
        return BaseCorrupt(f"manifest of published image {image!r} is invalid: {why}")

    if (problem := manifest_size_problem(len(data))) is not None:
        raise corrupt(f"it is {problem}")
    try:
        doc = json.loads(data)
    except JSON_ERRORS as exc:
        raise corrupt(f"not JSON ({exc}); truncated?") from None
    if not isinstance(doc, dict):
        raise corrupt("not a JSON object")
    if doc.get("format") != MANIFEST_FORMAT:
        raise corrupt(f"format is {doc.get('format')!r}, not {MANIFEST_FORMAT!r}")
    version = doc.get("version")
    if version != MANIFEST_VERSION or not _is_int(version):
        raise corrupt(f"version {version!r} is not supported (this corfs reads {MANIFEST_VERSION})")
    for key in ("name", "size", "chunk_size", "compression", "chunks"):
        if key not in doc:
            raise corrupt(f"{key!r} is missing")
    name, size, chunk_size, chunks = doc["name"], doc["size"], doc["chunk_size"], doc["chunks"]
    if not isinstance(name, str) or name != image:
        raise corrupt(f"it names image {name!r}")
    if not _is_int(size) or size < 0:
        raise corrupt(f"size {size!r} is not a byte count")
    if (
        not _is_int(chunk_size)
        or chunk_size <= 0
        or chunk_size & (chunk_size - 1)
        or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE
    ):
        raise corrupt(
            f"chunk_size {chunk_size!r} is not a power of two between {MIN_CHUNK_SIZE} "
            f"and {MAX_CHUNK_SIZE}"
        )
    if doc["compression"] != COMPRESSION:
        raise corrupt(f"compression {doc['compression']!r} is not supported (only zstd)")
    if not isinstance(chunks, list):
        raise corrupt("'chunks' is not a list")
    expected = -(-size // chunk_size)
    if len(chunks) != expected:
        raise corrupt(
            f"{len(chunks)} chunks do not make {size} bytes at chunk size {chunk_size} "
            f"(expected {expected})"
        )
    digests: list[bytes | None] = []
    for index, entry in enumerate(chunks):
        if entry == ZERO_CHUNK:
            digests.append(None)
        elif isinstance(entry, str) and _HEX_DIGEST.fullmatch(entry):
            digests.append(bytes.fromhex(entry))
        else:
            raise corrupt(
                f"chunk {index} is {str(entry)[:40]!r}, not {DIGEST_HEX_LENGTH} lowercase hex "
                f"digits or {ZERO_CHUNK!r}"
            )
    assert all(d is None or len(d) == DIGEST_SIZE for d in digests)
    return Manifest(name=name, size=size, chunk_size=chunk_size, digests=tuple(digests))


# ---- index.json ----------------------------------------------------------------------------


def parse_index(data: bytes | str) -> dict[str, int | None]:
    """{entry name: size, or None where the entry gives none} from index.json (bytes, or text
    whose undecodable bytes are surrogate escapes: the HTTP base's listing text);
    BaseCorrupt if it is not an index. The one reader of index.json: the HTTP base lists these
    names (it asks each entry's size and checks each name, leaving a bad one out with a
    warning), publish rewrites the index from them. So one bad entry costs only itself: a size
    that is no byte count is dropped (the entry kept by name), and an entry that is no object
    with a string name, naming nothing, is skipped."""
    try:
        doc = json.loads(data)
    except JSON_ERRORS as exc:
        raise BaseCorrupt(f"{INDEX_KEY} is not JSON ({exc})") from None
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list):
        raise BaseCorrupt(f"{INDEX_KEY} has no 'images' list")
    entries: dict[str, int | None] = {}
    for item in images:
        name = item.get("name") if isinstance(item, dict) else None
        if isinstance(name, str):
            size = item.get("size")
            entries[name] = size if _is_int(size) and size >= 0 else None
    return entries


def render_index(entries: dict[str, int | None]) -> bytes:
    doc = {
        "images": [
            {"name": n} if entries[n] is None else {"name": n, "size": entries[n]}
            for n in sorted(entries)
        ]
    }
    # ASCII: a name read from an index may hold a lone surrogate ("\ud800" is valid JSON),
    # which no UTF-8 text can; escaped, it is kept as it was.
    return (json.dumps(doc, indent=1) + "\n").encode()
