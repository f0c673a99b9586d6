"""One botocore mapper: the same S3 answer is the same error whether a base read or a publish
met it (403 is an access failure of that bucket, never a usage error)."""

from __future__ import annotations

import pytest
import trio
from botocore.stub import Stubber

from corfs.base import BaseOptions
from corfs.base.s3 import S3Base
from corfs.errors import (
    BaseAccessDenied,
    BaseChanged,
    BaseError,
    BaseNotFound,
    TransientBaseError,
)
from corfs.publish import S3Destination


@pytest.fixture(autouse=True)
def _offline_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake credentials and no config files: the stubbed clients never reach a network."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/corfs-test-aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/corfs-test-aws-credentials")


def _base_read_error(code: str, status: int) -> BaseError:
    base = S3Base("bucket", "dir/", BaseOptions(region="us-east-1"))
    with Stubber(base.client) as stub:
        stub.add_client_error("get_object", service_error_code=code, http_status_code=status)
        with pytest.raises(BaseError) as info:
            trio.run(base.read_object, "obj", 100)
    return info.value


def _publish_error(code: str, status: int) -> Exception:
    base = S3Base("bucket", "dir/", BaseOptions(region="us-east-1"))  # a client to stub
    dest = S3Destination(base.client, "bucket", "dir/", "s3://bucket/dir/")
    with Stubber(base.client) as stub:
        stub.add_client_error("put_object", service_error_code=code, http_status_code=status)
        with pytest.raises(Exception) as info:
            dest.put("obj", b"data")
    return info.value


@pytest.mark.parametrize(
    ("code", "status", "error"),
    [
        ("AccessDenied", 403, BaseAccessDenied),
        ("403", 403, BaseAccessDenied),
        ("InvalidAccessKeyId", 403, BaseAccessDenied),
        ("NoSuchBucket", 404, BaseNotFound),
        ("PreconditionFailed", 412, BaseChanged),
        ("SlowDown", 503, TransientBaseError),
    ],
)
def test_a_base_read_and_a_publish_map_an_s3_error_alike(
    code: str, status: int, error: type[BaseError]
) -> None:
    read, publish = _base_read_error(code, status), _publish_error(code, status)
    assert type(read) is error and type(publish) is error
    assert "s3://bucket/dir/obj" in str(read) and "s3://bucket/dir/obj" in str(publish)
