"""S3 bases at their edges: a listing that ends within --io-timeout though a manifest (read
while listing published images) trickles in, a manifest at the bucket's root, an endpoint
whose HEAD sends no ETag."""

from __future__ import annotations

import contextlib
import time

import pytest
import trio
import xxhash

from corfs.base import BaseOptions, open_base
from corfs.errors import BaseError
from corfs.manifest import Manifest
from tests.hostile import HostileServer, MiB, trickle
from tests.servers import FAKE_AWS_ENV

MANIFEST = Manifest(
    name="disk.raw", size=MiB, chunk_size=MiB, digests=(xxhash.xxh3_128_digest(b"\1" * MiB),)
).to_json()
LISTING = b"""<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name>
<Prefix>p/</Prefix><KeyCount>1</KeyCount><MaxKeys>1000</MaxKeys><Delimiter>/</Delimiter>
<IsTruncated>false</IsTruncated><Contents><Key>p/disk.raw.corfs.json</Key><Size>%d</Size>
<ETag>"m"</ETag></Contents></ListBucketResult>""" % len(MANIFEST)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(key, value)


def test_a_trickling_manifest_ends_the_s3_listing_within_io_timeout(aws_env) -> None:
    def route(method: str, path: str, headers: dict[str, str]):
        if "list-type=2" in path:
            return 200, [("Content-Length", str(len(LISTING)))], [LISTING]
        if path.startswith("/b/p/disk.raw.corfs.json"):
            # One byte every 0.2 s never trips botocore's per-read timeout (1 s here).
            return 200, [("Content-Length", str(len(MANIFEST))), ("ETag", '"m"')], trickle(
                MANIFEST, 0.2
            )
        return None

    server = HostileServer(route).start()
    options = BaseOptions(io_timeout=3.0, endpoint_url=server.url.rstrip("/"),
                          region="us-east-1")
    try:

        async def main() -> None:
            store = await open_base("s3://b/p/", options)
            try:
                start = time.monotonic()
                with trio.move_on_after(4 * options.io_timeout) as scope:
                    # The manifest's image left out, or the listing failed: either, in time.
                    with contextlib.suppress(BaseError):
                        await store.list_images()  # as a mount lists
                elapsed = time.monotonic() - start
            finally:
                await store.aclose()
            assert not scope.cancelled_caught, "the listing hung past --io-timeout"
            assert elapsed < options.io_timeout + 2

        trio.run(main)
    finally:
        server.stop()


def _publish_at(client, bucket: str, where: str) -> bytes:
    """A one-chunk published image `disk.raw` with its manifest and chunk object below
    `where` ('' = the bucket's root); its bytes."""
    import zstandard

    from corfs.manifest import chunk_key

    data = b"\2" * MiB
    digest = xxhash.xxh3_128_digest(data)
    manifest = Manifest(name="disk.raw", size=MiB, chunk_size=MiB, digests=(digest,))
    client.put_object(Bucket=bucket, Key=where + chunk_key(digest),
                      Body=zstandard.ZstdCompressor().compress(data))
    client.put_object(Bucket=bucket, Key=where + "disk.raw.corfs.json", Body=manifest.to_json())
    return data


@pytest.mark.parametrize("where", ["", "images/"], ids=["bucket-root", "below-a-prefix"])
def test_a_published_image_named_by_its_manifest_object_is_served(moto_server, where) -> None:
    """`s3://bucket/prefix/disk.raw.corfs.json`: that one object (README), a published image
    whose chunk objects live beside it, as with an http(s) URL naming one manifest."""
    bucket = "hunt-b-" + ("root" if not where else "prefix")
    client = moto_server.client()
    client.create_bucket(Bucket=bucket)
    data = _publish_at(client, bucket, where)
    options = BaseOptions(io_timeout=6.0, endpoint_url=moto_server.endpoint, region="us-east-1")

    async def main() -> None:
        store = await open_base(f"s3://{bucket}/{where}disk.raw.corfs.json", options)
        try:
            images = await store.list_images()
            assert [image.name for image in images] == ["disk.raw"]
            assert bytes(await images[0].read(0, MiB)) == data
        finally:
            await store.aclose()

    trio.run(main)


def test_a_single_object_whose_head_has_no_etag_opens_as_a_listed_one_does(aws_env) -> None:
    """An S3-compatible endpoint that sends no ETag: a listing takes such an object (its
    identity without one); naming it alone crashed open_base with KeyError('ETag')."""
    data = bytes(range(256)) * 16

    def route(method: str, path: str, headers: dict[str, str]):
        if not path.startswith("/b/p/disk.raw"):
            return None
        if method == "HEAD":
            return 200, [("Content-Length", str(len(data)))], []
        first, last = map(int, headers["range"].removeprefix("bytes=").split("-"))
        return 206, [("Content-Length", str(last - first + 1)),
                     ("Content-Range", f"bytes {first}-{last}/{len(data)}")], [
            data[first : last + 1]]

    server = HostileServer(route).start()
    options = BaseOptions(io_timeout=3.0, endpoint_url=server.url.rstrip("/"),
                          region="us-east-1")
    try:

        async def main() -> None:
            store = await open_base("s3://b/p/disk.raw", options)
            try:
                (image,) = await store.list_images()
                assert image.name == "disk.raw" and image.size == len(data)
                assert bytes(await image.read(100, 200)) == data[100:300]
            finally:
                await store.aclose()

        trio.run(main)
    finally:
        server.stop()
    assert all(h.get("if-match", "x") != "" for _, _, h in server.requests)
