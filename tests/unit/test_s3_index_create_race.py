"""Two publishes into a fresh S3 prefix without ListBucket (the least-privilege set-up README
recommends), the race made deterministic with a dict standing in for S3 (moto answers 404,
not 403, for a missing key; tests/core/test_publish_index.py races real processes on moto).
Both read index.json: 403 (missing). The other creates it first; this one's create-only PUT
gets 412. The index can be read now: it must merge and retry, not fail with "exists but may
not be read"."""

from __future__ import annotations

import io

from botocore.exceptions import ClientError

from corfs.manifest import parse_index, render_index
from corfs.publish.destination import S3Destination


def _error(status: int, code: str) -> ClientError:
    return ClientError(
        {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "op"
    )


class RacingS3:
    """Objects in a dict; a missing key is 403 (no ListBucket). The other publish's index
    lands just before this one's first PUT of it."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.etag = 0
        self.raced = False

    def get_object(self, Bucket, Key):
        if Key not in self.objects:
            raise _error(403, "AccessDenied")
        return {"Body": io.BytesIO(self.objects[Key]), "ETag": f'"{self.etag}"'}

    def put_object(self, Bucket, Key, Body, IfMatch=None, IfNoneMatch=None):
        if not self.raced:
            self.raced = True
            self.objects[Key] = render_index({"other.raw.corfs.json": 10})
            self.etag += 1
        if IfNoneMatch == "*" and Key in self.objects:
            raise _error(412, "PreconditionFailed")
        if IfMatch is not None and (Key not in self.objects or IfMatch != f'"{self.etag}"'):
            raise _error(412, "PreconditionFailed")
        self.objects[Key] = Body
        self.etag += 1
        return {}


def test_a_lost_create_race_without_listbucket_merges() -> None:
    client = RacingS3()
    dest = S3Destination(client, "bucket", "p/", "s3://bucket/p/")

    def add(old: bytes | None) -> bytes:
        entries = parse_index(old) if old is not None else {}
        entries["mine.raw.corfs.json"] = 20
        return render_index(entries)

    dest.update("index.json", add)
    assert set(parse_index(client.objects["p/index.json"])) == {
        "other.raw.corfs.json",
        "mine.raw.corfs.json",
    }
