"""S3 reads through the lean reader (s3_wire.py) against a moto that checks SigV4 signatures
(IAM users made in moto; requests with a wrong signature are refused), directly and over
HTTPS through nginx with its own CA (--ca-file). The lean reader must actually answer the
reads (its statistics count them), with the right bytes; a changed object is BaseChanged, a
denied one BaseAccessDenied."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import boto3
import pytest
import trio
from botocore.exceptions import ClientError

from corfs.base import BaseOptions
from corfs.base.s3 import open_s3_base
from corfs.errors import BaseAccessDenied, BaseChanged
from tests.servers import FAKE_AWS_ENV, Moto, Nginx, TlsFiles, make_tls

BUCKET = "corfs-signed"
MiB = 1 << 20
DATA = os.urandom(2 * MiB + 4321)


@dataclass
class Key:
    key_id: str
    secret: str


@dataclass
class SignedS3:
    moto: Moto
    tls: TlsFiles
    front: Nginx  # https, proxying the bucket to moto
    reader: Key  # may do anything in S3
    lister: Key  # may list, not read

    def client(self) -> object:
        return boto3.client(
            "s3", endpoint_url=self.moto.endpoint, region_name="us-east-1",
            aws_access_key_id=self.reader.key_id, aws_secret_access_key=self.reader.secret,
        )


def _policy(*actions: str) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": list(actions), "Resource": "*"}]})


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SignedS3]:
    base = tmp_path_factory.mktemp("s3-signed")
    moto = Moto(base / "moto", {"INITIAL_NO_AUTH_ACTION_COUNT": "60"}).start()
    front = None
    try:
        iam = boto3.client(
            "iam", endpoint_url=moto.endpoint, region_name="us-east-1",
            aws_access_key_id="setup", aws_secret_access_key="setup",
        )
        keys = []
        # The lister may list, not read. AWS checks s3:ListBucket for ListObjectsV2; moto
        # 5.2.6 checks "s3:ListObjectsV2" instead (the AccessDenied that failed CI on a fresh
        # install): both, so the listing passes on either and the read alone is refused.
        lister = ("s3:ListBucket", "s3:ListObjectsV2")
        for user, actions in (("reader", ("s3:*",)), ("lister", lister)):
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName="p", PolicyDocument=_policy(*actions))
            made = iam.create_access_key(UserName=user)["AccessKey"]
            keys.append(Key(made["AccessKeyId"], made["SecretAccessKey"]))
        tls = make_tls(base / "pki")
        proxy = f"""
    location ^~ /{BUCKET} {{
      proxy_pass http://127.0.0.1:{moto.port};
      proxy_set_header Host $http_host;
      proxy_buffering off;
    }}"""
        front = Nginx(root=base / "root", workdir=base / "nginx", tls=tls, locations=proxy)
        front.start()
        server = SignedS3(moto, tls, front, keys[0], keys[1])
        server.client().create_bucket(Bucket=BUCKET)  # type: ignore[attr-defined]
        wrong = boto3.client(
            "s3", endpoint_url=moto.endpoint, region_name="us-east-1",
            aws_access_key_id=keys[0].key_id, aws_secret_access_key="not-the-secret",
        )
        for _ in range(60):  # use up moto's unchecked requests: signatures count from here on
            try:
                wrong.list_objects_v2(Bucket=BUCKET)
            except ClientError:
                break
        else:
            pytest.fail("moto never checked a signature")
        yield server
    finally:
        if front:
            front.stop()
        moto.stop()


@pytest.fixture
def as_user(monkeypatch: pytest.MonkeyPatch):
    def use(key: Key) -> None:
        for name, value in FAKE_AWS_ENV.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("AWS_SESSION_TOKEN")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key.key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key.secret)

    return use


def _put(signed: SignedS3, key: str, body: bytes, **extra: str) -> None:
    signed.client().put_object(Bucket=BUCKET, Key=key, Body=body, **extra)  # type: ignore[attr-defined]


def _options(signed: SignedS3, tls: bool = False) -> BaseOptions:
    endpoint = signed.front.url.rstrip("/") if tls else signed.moto.endpoint
    return BaseOptions(io_timeout=5.0, endpoint_url=endpoint, region="us-east-1",
                       ca_file=str(signed.tls.ca_cert) if tls else None)


def _with_image(prefix: str, options: BaseOptions, check: Callable[..., Awaitable[None]]) -> None:
    """Open s3://BUCKET/prefix, run `check(store, image)` on its one image, close."""
    async def main() -> None:
        store = await open_s3_base(f"s3://{BUCKET}/{prefix}", options)
        try:
            (image,) = await store.list_images()
            await check(store, image)
        finally:
            await store.aclose()

    trio.run(main)


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_signed_reads_go_through_the_lean_reader(signed: SignedS3, as_user, tls: bool) -> None:
    prefix = f"ok-{tls}/"
    _put(signed, prefix + "disk.raw", DATA)
    as_user(signed.reader)
    options = _options(signed, tls)

    async def check(store, image) -> None:
        for offset, length in ((0, MiB), (MiB - 5, MiB + 10), (2 * MiB, 4321), (77, 1)):
            assert bytes(await image.read(offset, length)) == DATA[offset : offset + length]
        assert store.wire.reader.stats.answered == 4
        assert store.wire.reader.stats.handed_back == 0
        assert store.wire.targets[image.key].url.startswith(options.endpoint_url)

    _with_image(prefix, options, check)


def test_the_ca_bundle_of_the_aws_configuration_serves_the_reads_too(
    signed: SignedS3, as_user, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CA given the AWS way (AWS_CA_BUNDLE, or a profile's ca_bundle) and not --ca-file:
    botocore trusted it for the listing, the lean reader did not, so every read failed its
    certificate check."""
    _put(signed, "bundle/disk.raw", DATA)
    as_user(signed.reader)
    monkeypatch.setenv("AWS_CA_BUNDLE", str(signed.tls.ca_cert))
    options = dataclasses.replace(_options(signed, tls=True), ca_file=None)

    async def check(store, image) -> None:
        assert bytes(await image.read(MiB - 5, 10)) == DATA[MiB - 5 : MiB + 5]
        assert store.wire.reader.stats.answered == 1

    _with_image("bundle/", options, check)


def test_changed_object_is_base_changed(signed: SignedS3, as_user) -> None:
    _put(signed, "changing/disk.raw", DATA)
    as_user(signed.reader)

    async def check(store, image) -> None:
        assert bytes(await image.read(0, 100)) == DATA[:100]
        _put(signed, "changing/disk.raw", DATA[::-1])
        with pytest.raises(BaseChanged):
            await image.read(0, 100)
        assert store.wire.reader.stats.answered == 1
        assert store.wire.reader.stats.handed_back == 0  # 412: mapped by the lean reader

    _with_image("changing/", _options(signed), check)


def test_denied_read_is_access_denied(signed: SignedS3, as_user) -> None:
    _put(signed, "denied/disk.raw", DATA)
    as_user(signed.lister)

    async def check(store, image) -> None:
        with pytest.raises(BaseAccessDenied) as info:
            await image.read(0, 100)
        assert "AccessDenied" in str(info.value)  # botocore's decoded error code
        for secret in (signed.lister.secret, signed.lister.key_id):
            assert secret not in str(info.value)
        assert store.wire.reader.stats.handed_back == 1  # 403 handed back to botocore

    _with_image("denied/", _options(signed), check)


def test_object_with_a_content_encoding_is_read_as_stored(signed: SignedS3, as_user) -> None:
    """S3 never transforms an object: a Content-Encoding in its metadata is no reason to hand
    the read back to botocore (which would read it raw anyway, slower)."""
    _put(signed, "encoded/disk.raw", DATA, ContentEncoding="gzip")
    as_user(signed.reader)

    async def check(store, image) -> None:
        assert bytes(await image.read(10, MiB)) == DATA[10 : MiB + 10]
        assert store.wire.reader.stats.answered == 1

    _with_image("encoded/", _options(signed), check)


def test_expiring_credentials_are_refreshed_by_botocore(signed: SignedS3, as_user) -> None:
    """Credentials 5 min from expiry (an instance role's, say): botocore refreshes them before
    signing (in a worker thread); the refreshed ones sign the lean read."""
    from botocore.credentials import RefreshableCredentials

    _put(signed, "refresh/disk.raw", DATA)
    as_user(signed.reader)
    refreshed = []

    def metadata(key: Key, minutes: int) -> dict[str, str]:
        expiry = datetime.now(UTC) + timedelta(minutes=minutes)
        return {"access_key": key.key_id, "secret_key": key.secret, "token": "",
                "expiry_time": expiry.isoformat()}

    def refresh() -> dict[str, str]:
        refreshed.append(threading.current_thread() is threading.main_thread())
        return metadata(signed.reader, 120)

    async def check(store, image) -> None:
        stale = Key(signed.lister.key_id, "expired")  # would be refused if it signed
        store.wire.credentials = RefreshableCredentials.create_from_metadata(
            metadata(stale, 5), refresh, "test")
        assert store.wire._may_refresh()
        assert bytes(await image.read(5, 1000)) == DATA[5:1005]
        assert refreshed == [False]  # once, not on the trio thread
        assert not store.wire._may_refresh()
        assert store.wire.reader.stats.answered == 1

    _with_image("refresh/", _options(signed), check)


def test_an_endpoint_spelled_in_capitals_is_read_by_the_lean_reader(
    signed: SignedS3, as_user
) -> None:
    """botocore signs the Host in lower case (without a default port); the lean reader sent
    the URL's spelling, so moto refused every signature and each read was redone through
    botocore, after a wasted request."""
    _put(signed, "capitals/disk.raw", DATA)
    as_user(signed.reader)
    options = dataclasses.replace(
        _options(signed), endpoint_url=f"http://LocalHost:{signed.moto.port}"
    )

    async def check(store, image) -> None:
        assert bytes(await image.read(77, 1000)) == DATA[77:1077]
        assert (store.wire.reader.stats.answered, store.wire.reader.stats.handed_back) == (1, 0)

    _with_image("capitals/", options, check)
