"""The published-image manifest: round trip and every way a manifest can be malformed."""

from __future__ import annotations

import json

import pytest

from corfs.digest import chunk_digest, digest_hex, is_zero
from corfs.errors import BaseCorrupt
from corfs.manifest import (
    Manifest,
    check_image_name,
    chunk_key,
    image_name_of,
    manifest_key,
    parse_index,
    parse_manifest,
    render_index,
)

CS = 1 << 20
D1 = chunk_digest(b"one")
D2 = chunk_digest(b"two")


def good_doc(**changes: object) -> dict:
    doc = {
        "format": "corfs-manifest",
        "version": 1,
        "name": "disk.raw",
        "size": 2 * CS + 5,
        "chunk_size": CS,
        "compression": "zstd",
        "chunks": [digest_hex(D1), "zero", digest_hex(D2)],
    }
    doc.update(changes)
    return doc


def encode(doc: object) -> bytes:
    return json.dumps(doc).encode()


def test_round_trip() -> None:
    m = Manifest(name="disk.raw", size=2 * CS + 5, chunk_size=CS, digests=(D1, None, D2))
    data = m.to_json()
    assert parse_manifest(data, "disk.raw") == m
    assert json.loads(data) == good_doc()
    assert m.chunk_length(0) == CS and m.chunk_length(2) == 5


def test_empty_image() -> None:
    m = parse_manifest(encode(good_doc(size=0, chunks=[])), "disk.raw")
    assert m.size == 0 and m.digests == ()


def test_extra_keys_are_ignored() -> None:
    assert parse_manifest(encode(good_doc(created="today")), "disk.raw").digests == (D1, None, D2)


BAD = {
    "not json": b"{not json",
    "truncated": encode(good_doc())[:-20],
    "empty": b"",
    "not utf-8": b"\xff\xfe",
    "a list": encode([1, 2]),
    "wrong format": encode(good_doc(format="qcow2")),
    "unknown version": encode(good_doc(version=2)),
    "version as string": encode(good_doc(version="1")),
    "version true": encode(good_doc(version=True)),
    "other name": encode(good_doc(name="other.raw")),
    "negative size": encode(good_doc(size=-1)),
    "size as float": encode(good_doc(size=2.5 * CS)),
    "size too large for chunks": encode(good_doc(size=3 * CS + 1)),
    "size too small for chunks": encode(good_doc(size=2 * CS)),
    "chunk size not power of two": encode(good_doc(chunk_size=1000000)),
    "chunk size zero": encode(good_doc(chunk_size=0)),
    "chunk size huge": encode(good_doc(chunk_size=1 << 40, size=5, chunks=["zero"])),
    "compression": encode(good_doc(compression="gzip")),
    "chunks not a list": encode(good_doc(chunks="zero")),
    "short digest": encode(good_doc(chunks=[digest_hex(D1)[:-2], "zero", digest_hex(D2)])),
    "long digest": encode(good_doc(chunks=[digest_hex(D1) + "00", "zero", digest_hex(D2)])),
    "not hex": encode(good_doc(chunks=["g" * 32, "zero", digest_hex(D2)])),
    "upper hex": encode(good_doc(chunks=[digest_hex(D1).upper(), "zero", digest_hex(D2)])),
    "null chunk": encode(good_doc(chunks=[None, "zero", digest_hex(D2)])),
    "missing chunks": encode({k: v for k, v in good_doc().items() if k != "chunks"}),
    "missing size": encode({k: v for k, v in good_doc().items() if k != "size"}),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_manifest_is_corrupt_and_names_the_image(case: str) -> None:
    with pytest.raises(BaseCorrupt) as info:
        parse_manifest(BAD[case], "disk.raw")
    message = str(info.value)
    assert "'disk.raw'" in message and "\n" not in message


def test_keys_and_names() -> None:
    hexd = digest_hex(D1)
    assert chunk_key(D1) == f"chunks/{hexd[:2]}/{hexd}.zst"
    assert manifest_key("a.raw") == "a.raw.corfs.json"
    assert image_name_of("a.raw.corfs.json") == "a.raw"
    assert image_name_of("a.raw") is None
    assert image_name_of(".corfs.json") is None
    assert image_name_of("sub/a.corfs.json") is None
    assert check_image_name("disk.raw") is None
    for bad in ("", ".hidden", "index.json", "x.corfs.json", "a\nb"):
        assert check_image_name(bad), bad


def test_index_round_trip_and_errors() -> None:
    entries = {"b.corfs.json": 10, "a.raw": 4096}
    data = render_index(entries)
    assert json.loads(data)["images"][0] == {"name": "a.raw", "size": 4096}
    assert parse_index(data) == entries
    names_only = b'{"images": [{"name": "x"}]}'  # what the HTTP base needs: one too
    assert parse_index(names_only) == {"x": None}
    assert json.loads(render_index({"x": None})) == json.loads(names_only)
    for bad in (b"[]", b"{}", b'{"images": {}}', b"nope"):
        with pytest.raises(BaseCorrupt):
            parse_index(bad)
    # A bad entry costs only itself: its size, or the entry where it names nothing (a name a
    # mount cannot serve is the mount's to leave out, with a warning naming it).
    assert parse_index(b'{"images": [{"name": "x", "size": -1}, {"name": "a/b", "size": 1},'
                       b' 7, {"name": 5}, {"size": 3}, {"name": "y", "size": 2}]}'
                       ) == {"x": None, "a/b": 1, "y": 2}


def test_digest_helpers() -> None:
    assert len(D1) == 16 and len(digest_hex(D1)) == 32
    assert is_zero(bytes(4096)) and is_zero(bytearray(3)) and is_zero(memoryview(bytes(5)))
    assert is_zero(b"")
    assert not is_zero(bytes(4095) + b"\x01")


@pytest.mark.parametrize("zero_every", [0, 2, 1], ids=["stored", "half-zero", "all-zero"])
def test_held_bytes_is_what_a_parsed_manifest_keeps(zero_every: int) -> None:
    """The memory bound (--manifest-memory) charges held_bytes per image: it must be what
    parse_manifest's result really keeps, as tracemalloc sees it (within 10 %)."""
    import gc
    import os
    import tracemalloc

    from corfs.base.manifest_loading import held_bytes

    n = 100_000
    pool = os.urandom(16 * n)
    digests = tuple(
        None if zero_every and i % zero_every == 0 else pool[16 * i : 16 * (i + 1)]
        for i in range(n)
    )
    data = Manifest("a.raw", n * 4096, 4096, digests).to_json()
    del digests, pool
    gc.collect()
    tracemalloc.start()
    try:
        manifest = parse_manifest(data, "a.raw")
        kept, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert abs(held_bytes(manifest) - kept) < 0.1 * kept, (held_bytes(manifest), kept)
