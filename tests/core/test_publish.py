"""`corfs publish` to a directory and to S3 (moto), read back through corfs.base.open_base.
Issue 10, item 6: a damaged object already at DEST is written again, and every object and its
directory are fsynced before the manifest that names them."""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import trio
import zstandard

from corfs.base import BaseOptions, open_base
from corfs.digest import chunk_digest, digest_hex
from corfs.errors import CorfsError, UsageError
from corfs.manifest import chunk_key, parse_index
from corfs.publish import (
    DirDestination,
    PublishSummary,
    add_publish_arguments,
    format_summary,
    publish_to,
    run_publish,
)
from tests.servers import TEST_BUCKET

CS = 64 << 10


def make_images(src: Path) -> dict[str, bytes]:
    """Random chunks, a block repeated within and across images, zero runs, ragged ends."""
    rng = random.Random(5)

    def rand(n: int) -> bytes:
        return rng.randbytes(n)

    shared = rand(CS)
    text = (b"corfs publishes compressible text. " * 2000)[:CS]
    images = {
        "a.raw": rand(3 * CS) + bytes(2 * CS) + shared + shared + text + rand(1000),
        "b.raw": shared + rand(CS) + bytes(CS) + text[:777],
        "empty.raw": b"",
        "zeros.raw": bytes(3 * CS + 12),
    }
    src.mkdir(exist_ok=True)
    for name, data in images.items():
        (src / name).write_bytes(data)
    return images


def publish(src: Path, images: dict[str, bytes], dest: str, **kw) -> list[PublishSummary]:
    opts = dict(chunk_size=CS, level=3, jobs=2, progress=False, endpoint_url=None, region=None,
                profile=None)
    opts.update(kw)
    return run_publish([str(src / n) for n in images], dest, **opts)


def stored_objects(dest: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(dest)): p.read_bytes()
        for p in (dest / "chunks").rglob("*")
        if p.is_file()
    }


def check_objects_valid(dest: Path) -> None:
    """Every visible chunk object is whole: it decompresses to bytes whose digest names it."""
    for key, packed in stored_objects(dest).items():
        data = zstandard.ZstdDecompressor().decompress(packed)
        assert key == chunk_key(chunk_digest(data))


async def read_all(url: str, options: BaseOptions | None = None) -> dict[str, bytes]:
    store = await open_base(url, options or BaseOptions())
    try:
        out = {}
        for image in await store.list_images():
            assert image.layout is not None and image.identity.startswith("manifest:")
            cs = image.layout.chunk_size
            parts = []
            # Reads of one, three and (at the end) a short chunk.
            offset = 0
            step = cs
            while offset < image.size:
                length = min(step, image.size - offset)
                parts.append(bytes(await image.read(offset, length)))
                offset += length
                step = 3 * cs if step == cs else cs
            out[image.name] = b"".join(parts)
            assert bytes(await image.read(0, image.size)) == out[image.name]
        return out
    finally:
        await store.aclose()


def test_publish_dir_reads_back_dedups_and_skips_zeros(tmp_path: Path) -> None:
    images = make_images(tmp_path / "src")
    dest = tmp_path / "pub"
    summaries = publish(tmp_path / "src", images, str(dest))
    by = {s.name: s for s in summaries}

    a, b = by["a.raw"], by["b.raw"]
    assert (a.chunks_total, a.chunks_zero, a.chunks_unique, a.chunks_uploaded) == (9, 2, 6, 6)
    # b: shared (stored by a), one new random chunk, a zero chunk, a short text chunk (new).
    assert (b.chunks_total, b.chunks_zero, b.chunks_unique, b.chunks_present) == (4, 1, 3, 1)
    assert b.chunks_uploaded == 2
    assert by["empty.raw"].chunks_total == 0
    assert by["zeros.raw"].chunks_zero == 4 and by["zeros.raw"].chunks_uploaded == 0
    assert a.bytes_in == len(images["a.raw"]) and a.bytes_out < a.bytes_uploaded_raw
    assert a.compression_ratio > 1
    assert "a.raw: 9 chunks" in format_summary(a)

    objects = stored_objects(dest)
    assert len(objects) == 8  # each distinct non-zero chunk once, across both images
    for zero_len in (CS, 12, 777):
        assert chunk_key(chunk_digest(bytes(zero_len))) not in objects
    check_objects_valid(dest)
    assert parse_index((dest / "index.json").read_bytes()) == {
        f"{n}.corfs.json": (dest / f"{n}.corfs.json").stat().st_size for n in images
    }
    assert os.listdir(dest / ".corfs-tmp") == ["index.lock"]  # no temp object left

    assert trio.run(read_all, str(dest)) == images


def test_republish_uploads_nothing_and_changes_nothing(tmp_path: Path) -> None:
    images = make_images(tmp_path / "src")
    dest = tmp_path / "pub"
    publish(tmp_path / "src", images, str(dest))
    files = [p for p in dest.rglob("*") if p.is_file()]
    before = {p: p.stat().st_mtime_ns for p in files}
    time.sleep(0.01)

    again = publish(tmp_path / "src", images, str(dest), jobs=1)
    for s in again:
        assert s.chunks_uploaded == 0 and s.bytes_out == 0
        assert s.chunks_present == s.chunks_unique
        assert not s.manifest_written
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*") if p.is_file()} == before


def test_changed_image_replaces_manifest_and_keeps_old_chunks(tmp_path: Path) -> None:
    images = make_images(tmp_path / "src")
    dest = tmp_path / "pub"
    publish(tmp_path / "src", images, str(dest))
    images["b.raw"] = images["b.raw"][:CS] + os.urandom(CS)
    (tmp_path / "src" / "b.raw").write_bytes(images["b.raw"])
    (s,) = publish(tmp_path / "src", {"b.raw": b""}, str(dest))
    assert s.manifest_written and s.chunks_uploaded == 1 and s.chunks_present == 1
    assert trio.run(read_all, str(dest)) == images


class FailingDestination(DirDestination):
    """A real directory destination that breaks after `puts` objects: an interrupted run."""

    def __init__(self, root: str, puts: int) -> None:
        super().__init__(root)
        self.puts_left = puts

    def put(self, key: str, data: bytes, **kw: bool) -> None:
        if self.puts_left == 0:
            raise CorfsError("injected: network gone")
        self.puts_left -= 1
        super().put(key, data, **kw)


def test_interrupted_publish_shows_no_partial_object_nor_manifest_and_resumes(
    tmp_path: Path,
) -> None:
    images = make_images(tmp_path / "src")
    paths = [str(tmp_path / "src" / n) for n in images]
    dest = tmp_path / "pub"
    DirDestination.open(str(dest))

    with pytest.raises(CorfsError, match="injected"):
        publish_to(paths, FailingDestination(str(dest), puts=3), chunk_size=CS, jobs=2)
    assert len(stored_objects(dest)) == 3
    check_objects_valid(dest)
    assert not list(dest.glob("*.corfs.json")) and not (dest / "index.json").exists()
    assert not os.listdir(dest / ".corfs-tmp")
    assert trio.run(read_all, str(dest)) == {}

    summaries = publish_to(paths, DirDestination(str(dest)), chunk_size=CS, jobs=2)
    assert sum(s.chunks_uploaded for s in summaries) == 8 - 3
    assert trio.run(read_all, str(dest)) == images


def test_killed_publish_leaves_only_whole_objects(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    image = src / "big.raw"
    image.write_bytes(random.Random(1).randbytes(32 << 20))
    dest = tmp_path / "pub"
    script = textwrap.dedent(f"""
        from corfs.publish import run_publish
        run_publish([{str(image)!r}], {str(dest)!r}, chunk_size={CS}, level=19, jobs=1,
                    progress=False, endpoint_url=None, region=None, profile=None)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parents[2])
    try:
        deadline = time.monotonic() + 60
        while len(stored_objects(dest) if (dest / "chunks").exists() else {}) < 5:
            assert proc.poll() is None, "publish ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (dest / "big.raw.corfs.json").exists()
    check_objects_valid(dest)  # temp files may remain in .corfs-tmp, never as objects
    assert trio.run(read_all, str(dest)) == {}


def test_usage_errors(tmp_path: Path) -> None:
    images = make_images(tmp_path / "src")
    dest = str(tmp_path / "pub")
    with pytest.raises(UsageError, match="missing.raw"):
        run_publish([str(tmp_path / "missing.raw")], dest, chunk_size=CS, level=3, jobs=1,
                    progress=False, endpoint_url=None, region=None, profile=None)
    with pytest.raises(UsageError, match="not a directory"):
        publish(tmp_path / "src", images, str(tmp_path / "src" / "a.raw"))
    with pytest.raises(UsageError, match="power of two"):
        publish(tmp_path / "src", images, dest, chunk_size=1000)
    with pytest.raises(UsageError, match="level"):
        publish(tmp_path / "src", images, dest, level=99)
    with pytest.raises(UsageError, match="use a directory or s3"):
        publish(tmp_path / "src", images, "http://127.0.0.1:1/x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.raw").write_bytes(b"x")
    with pytest.raises(UsageError, match="two images"):
        run_publish([str(tmp_path / "src" / "a.raw"), str(tmp_path / "other" / "a.raw")], dest,
                    chunk_size=CS, level=3, jobs=1, progress=False, endpoint_url=None,
                    region=None, profile=None)
    assert not os.path.exists(os.path.join(dest, "a.raw.corfs.json"))


def test_arguments_and_progress(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_publish_arguments(parser)
    args = parser.parse_args(["x.raw", "y.raw", "s3://b/p", "--chunk-size", "4M", "-j", "3"])
    assert args.images == ["x.raw", "y.raw"] and args.destination == "s3://b/p"
    assert args.chunk_size == 4 << 20 and args.jobs == 3 and args.level == 3
    assert args.progress is None

    images = make_images(tmp_path / "src")
    summaries = publish(tmp_path / "src", images, str(tmp_path / "pub"), progress=True)
    assert len(summaries) == 4
    assert capfd.readouterr().out == ""  # the bar goes to stderr, nothing to stdout


def test_publish_to_s3(tmp_path: Path, moto_server) -> None:  # noqa: F811
    images = make_images(tmp_path / "src")
    url = f"s3://{TEST_BUCKET}/published/v1"
    summaries = publish(tmp_path / "src", images, url, endpoint_url=moto_server.endpoint,
                        region="us-east-1")
    assert sum(s.chunks_uploaded for s in summaries) == 8
    client = moto_server.client()
    keys = {
        o["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=TEST_BUCKET, Prefix="published/v1/"
        )
        for o in page.get("Contents", [])
    }
    assert sum(k.startswith("published/v1/chunks/") for k in keys) == 8
    assert {f"published/v1/{n}.corfs.json" for n in images} <= keys
    index = client.get_object(Bucket=TEST_BUCKET, Key="published/v1/index.json")["Body"].read()
    assert set(parse_index(index)) == {f"{n}.corfs.json" for n in images}
    digest = chunk_digest(images["a.raw"][:CS])
    body = client.get_object(Bucket=TEST_BUCKET, Key=f"published/v1/{chunk_key(digest)}")
    assert zstandard.ZstdDecompressor().decompress(body["Body"].read()) == images["a.raw"][:CS]
    assert digest_hex(digest) in client.get_object(
        Bucket=TEST_BUCKET, Key="published/v1/a.raw.corfs.json")["Body"].read().decode()

    again = publish(tmp_path / "src", images, url, endpoint_url=moto_server.endpoint,
                    region="us-east-1")
    assert all(s.chunks_uploaded == 0 and not s.manifest_written for s in again)

    with pytest.raises(UsageError, match="does not exist"):
        publish(tmp_path / "src", images, "s3://no-such-bucket/x",
                endpoint_url=moto_server.endpoint, region="us-east-1")

    # Read back through the S3 base, when that store is there.
    pytest.importorskip("corfs.base.s3")
    options = BaseOptions(endpoint_url=moto_server.endpoint, region="us-east-1")
    assert trio.run(read_all, url, options) == images


def test_published_dir_served_over_http(tmp_path: Path, nginx_server) -> None:  # noqa: F811
    """A published directory behind a plain web server is a base: index.json lists it."""
    pytest.importorskip("corfs.base.http")
    images = make_images(tmp_path / "src")
    dest = nginx_server.root / f"published-{os.getpid()}-{time.monotonic_ns()}"
    publish(tmp_path / "src", images, str(dest))
    assert trio.run(read_all, f"{nginx_server.url}{dest.name}/") == images


# ---- issue 10, item 6: existing objects are checked, and synced before the manifest --------


def damage_one_object(dest: Path, how: str) -> Path:
    """Damage the largest chunk object as a power cut could: cut short, or same size garbage."""
    path = max((dest / "chunks").rglob("*.zst"), key=lambda p: p.stat().st_size)
    packed = path.read_bytes()
    if how == "truncated":
        path.write_bytes(packed[: len(packed) // 2])
    else:  # keep the zstd frame header (its content size) and the size; flip the payload
        middle = len(packed) // 2
        path.write_bytes(packed[:middle] + bytes(b ^ 0x5A for b in packed[middle:]))
        assert path.stat().st_size == len(packed)
    return path


@pytest.mark.parametrize("how", ["truncated", "corrupt_same_size"])
def test_damaged_existing_object_is_written_again(tmp_path: Path, how: str) -> None:
    images = make_images(tmp_path / "src")
    dest = tmp_path / "pub"
    publish(tmp_path / "src", images, str(dest))
    # The run that stored the objects lost power before its manifests were written.
    for manifest in dest.glob("*.corfs.json"):
        manifest.unlink()
    damaged = damage_one_object(dest, how)

    summaries = publish(tmp_path / "src", images, str(dest))
    assert sum(s.chunks_uploaded for s in summaries) == 1
    check_objects_valid(dest)
    assert damaged.exists()
    assert trio.run(read_all, str(dest)) == images


def test_objects_and_their_directories_are_fsynced_before_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spy at the OS boundary: every fsync/fdatasync, as (path, inode) of its descriptor."""
    images = make_images(tmp_path / "src")
    del images["b.raw"], images["zeros.raw"], images["empty.raw"]
    dest = tmp_path / "pub"
    calls: list[tuple[str, int]] = []
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)

        def spy(fd: int, real=real) -> None:
            calls.append((os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_ino))
            real(fd)

        monkeypatch.setattr(os, name, spy)
    publish_to([str(tmp_path / "src" / "a.raw")], DirDestination.open(str(dest)),
               chunk_size=CS, jobs=2)
    monkeypatch.undo()

    def first(predicate, after: int = -1) -> int:
        found = [i for i in range(after + 1, len(calls)) if predicate(calls[i])]
        assert found, f"no such fsync after call {after}: {calls}"
        return found[0]

    manifest = dest / "a.raw.corfs.json"
    manifest_synced = first(lambda c: c[1] == manifest.stat().st_ino)  # fsynced as a temp file
    objects = list((dest / "chunks").rglob("*.zst"))
    assert len(objects) == 6
    for obj in objects:
        synced = first(lambda c, obj=obj: c[1] == obj.stat().st_ino)
        named = first(lambda c, obj=obj: c[0] == str(obj.parent), after=synced)
        assert synced < named < manifest_synced, (obj, calls)
    for directory in (dest / "chunks", dest):  # new names in them: the chunks' directories
        assert first(lambda c, d=directory: c[0] == str(d)) < manifest_synced, calls
    # and the manifest's own name is made durable after it was written
    assert any(c[0] == str(dest) for c in calls[manifest_synced + 1 :]), calls


def test_published_objects_stay_readable_under_a_private_umask(tmp_path: Path) -> None:
    """The CLI runs with umask 077 (for the cache); what publish writes is made to be served
    by a web server, so it keeps world-readable modes."""
    images = make_images(tmp_path / "src")
    dest = tmp_path / "pub"
    old = os.umask(0o077)
    try:
        publish(tmp_path / "src", images, str(dest))
    finally:
        os.umask(old)
    modes = {
        str(p.relative_to(dest)): p.stat().st_mode & 0o777 for p in [dest, *dest.rglob("*")]
    }
    assert modes.pop(".corfs-tmp") == 0o700  # half-written objects are not served
    assert modes.pop(".corfs-tmp/index.lock") == 0o600  # inside it: served by nobody
    expected = {path: 0o755 if (dest / path).is_dir() else 0o644 for path in modes}
    assert modes == expected


def test_publishing_keeps_the_entries_of_an_index_listing_names_only(tmp_path: Path) -> None:
    """An index.json listing names alone (what the HTTP base reads: it asks each entry's size
    itself) was "invalid" to publish, which rewrote it with its manifests only: the raw images
    it listed vanished from every HTTP mount of that directory."""
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "raw.img").write_bytes(b"r" * 4096)
    (dest / "index.json").write_text('{"images": [{"name": "raw.img"}]}')
    images = make_images(tmp_path / "src")
    publish(tmp_path / "src", {"a.raw": images["a.raw"]}, str(dest))
    listed = [entry["name"] for entry in json.loads((dest / "index.json").read_text())["images"]]
    assert listed == ["a.raw.corfs.json", "raw.img"]


def test_publishing_keeps_every_entry_an_http_mount_serves_beside_a_bad_one(
    tmp_path: Path,
) -> None:
    """One entry of index.json publish could not take (a size that is no byte count: null, a
    string; a name no mount serves; no name at all) made the whole index "invalid", rewritten
    with this run's manifests only: every other image vanished from the HTTP mounts of DEST,
    which read names alone. A bad size costs the entry its size, no name the entry; a bad name
    stays for the mounts to leave out, as before."""
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "index.json").write_text(json.dumps({"images": [
        {"name": "raw.img", "size": None},
        {"name": "old.raw.corfs.json", "size": "123"},
        {"name": "sized.img", "size": 4096},
        {"name": "sub/x.raw"},
        {"size": 7},
    ]}))
    images = make_images(tmp_path / "src")
    publish(tmp_path / "src", {"a.raw": images["a.raw"]}, str(dest))
    listed = {entry["name"]: entry.get("size")
              for entry in json.loads((dest / "index.json").read_text())["images"]}
    manifest_size = (dest / "a.raw.corfs.json").stat().st_size
    assert listed == {"a.raw.corfs.json": manifest_size, "old.raw.corfs.json": None,
                      "raw.img": None, "sized.img": 4096, "sub/x.raw": None}


def test_an_index_entry_whose_name_is_no_text_is_kept_not_a_traceback(tmp_path: Path) -> None:
    """JSON can escape a lone surrogate ("\\ud800"), which no UTF-8 text holds: rewriting
    the index raised UnicodeEncodeError, a traceback, and this run's images went unlisted.
    The entry is kept as it was (mounts leave it out, naming it), others and this run's too."""
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "index.json").write_text(
        '{"images": [{"name": "\\ud800x.raw"}, {"name": "d\\u00e9j\\u00e0.raw", "size": 5}]}'
    )
    images = make_images(tmp_path / "src")
    publish(tmp_path / "src", {"a.raw": images["a.raw"]}, str(dest))
    index = (dest / "index.json").read_bytes()
    listed = {entry["name"]: entry.get("size") for entry in json.loads(index)["images"]}
    assert listed == {"\ud800x.raw": None, "déjà.raw": 5,
                      "a.raw.corfs.json": (dest / "a.raw.corfs.json").stat().st_size}
    publish(tmp_path / "src", {"a.raw": images["a.raw"]}, str(dest))
    assert (dest / "index.json").read_bytes() == index  # unchanged: not written again
