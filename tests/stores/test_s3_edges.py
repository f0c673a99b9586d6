"""S3 bases at their edges: a listing that ends within --io-timeout though a manifest (read
while listing published images) trickles in, a manifest at the bucket's root, an endpoint
whose HEAD sends no ETag."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import trio
import xxhash

from corfs.base import BaseOptions, open_base
from corfs.errors import TransientBaseError
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
    manifest_asked: list[str] = []

    def route(method: str, path: str, headers: dict[str, str]):
        if "list-type=2" in path:
            return 200, [("Content-Length", str(len(LISTING)))], [LISTING]
        if path.startswith("/b/p/disk.raw.corfs.json"):
            manifest_asked.append(method)
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
                    # A base that does not answer in time fails the whole listing (the mount
                    # then serves what is cached and tries again): in time, and saying so.
                    with pytest.raises(TransientBaseError, match="within"):
                        await store.list_images()  # as a mount lists
                elapsed = time.monotonic() - start
            finally:
                await store.aclose()
            assert not scope.cancelled_caught, "the listing hung past --io-timeout"
            assert manifest_asked == ["GET"]
            assert elapsed < options.io_timeout + 2
            # The abandoned worker thread stops reading too (it held a connection slot while
            # the body trickled: repeated listings could use them all up).
            await trio.sleep(1.5)
            sent = server.body_bytes_sent
            await trio.sleep(1.0)
            assert server.body_bytes_sent == sent, "the body is still being read"

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


def test_a_single_object_whose_head_has_no_etag_opens_as_a_listed_one_does(
    aws_env, caplog: pytest.LogCaptureFixture
) -> None:
    """An S3-compatible endpoint that sends no ETag: a listing takes such an object (its
    identity without one), with a warning that changes cannot be detected; naming it alone
    crashed open_base with KeyError('ETag')."""
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
            warned = [r.getMessage() for r in caplog.records if "no ETag" in r.getMessage()]
            assert warned == ["s3://b/p/disk.raw has no ETag: changes cannot be detected"]

        trio.run(main)
    finally:
        server.stop()
    assert all(h.get("if-match", "x") != "" for _, _, h in server.requests)


def test_manifests_queued_for_a_connection_do_not_time_out_while_they_wait(aws_env) -> None:
    """A listing reads every published image's manifest at once, --connections at a time; the
    --io-timeout of each starts when it is sent. Before, it started as it queued: with one
    connection, the last of four manifests taking 0.8 s each timed out (3 s) and failed the
    whole listing, so the mount took the base for down."""
    names = [f"disk{i}.raw" for i in range(4)]
    manifests = {
        name: Manifest(name=name, size=MiB, chunk_size=MiB,
                       digests=(xxhash.xxh3_128_digest(b"\1" * MiB),)).to_json()
        for name in names
    }
    contents = "".join(
        f"<Contents><Key>p/{name}.corfs.json</Key><Size>{len(body)}</Size><ETag>\"m\"</ETag>"
        "</Contents>" for name, body in manifests.items()
    )
    listing = (
        '<?xml version="1.0" encoding="UTF-8"?><ListBucketResult '
        'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name><Prefix>p/</Prefix>'
        f"<KeyCount>{len(names)}</KeyCount><MaxKeys>1000</MaxKeys><Delimiter>/</Delimiter>"
        f"<IsTruncated>false</IsTruncated>{contents}</ListBucketResult>"
    ).encode()

    def slowly(body: bytes) -> Iterator[bytes]:
        time.sleep(0.8)  # within the stall timeout (1 s: --io-timeout / 3)
        yield body

    def route(method: str, path: str, headers: dict[str, str]):
        if "list-type=2" in path:
            return 200, [("Content-Length", str(len(listing)))], [listing]
        for name, body in manifests.items():
            if path.startswith(f"/b/p/{name}.corfs.json"):
                return 200, [("Content-Length", str(len(body))), ("ETag", '"m"')], slowly(body)
        return None

    server = HostileServer(route).start()
    options = BaseOptions(io_timeout=3.0, endpoint_url=server.url.rstrip("/"),
                          region="us-east-1", max_connections=1)
    try:

        async def main() -> None:
            store = await open_base("s3://b/p/", options)
            try:
                assert [i.name for i in await store.list_images()] == names
            finally:
                await store.aclose()

        trio.run(main)
    finally:
        server.stop()
