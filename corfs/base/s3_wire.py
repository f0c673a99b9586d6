"""S3 ranged GetObjects on the lean reader (http_wire.PlainReader): botocore decides and signs,
the lean reader sends and receives the body straight into the result buffer (botocore in
threads gave ~150 MB/s over TLS; its listings, HEADs and error decoding stay in s3.py).

Invariants:
- botocore decides where a GetObject goes: the first read of an object runs the client's own
  GetObject and stops it at `before-send` (`_Captured`), keeping the URL (endpoint, addressing
  style) and the region and service of its SigV4 scope. Each read is then signed by botocore's
  S3SigV4Auth with the session's credentials (botocore refreshes them when they expire): on
  the trio thread (~90 us) while they are far from expiry, in a worker thread when botocore
  may refresh them (that may go to the network). Both threads (the capture and a signature)
  are abandoned at the read's deadline, as s3.py's calls are: a credential source that hangs
  (a credential_process, a container endpoint) must not hold a read past --io-timeout.
  Only requests the client signs with
  plain SigV4 (AWS4-HMAC-SHA256) are taken over; anything else (anonymous, SigV4a, S3 Express)
  stays with botocore.
- The signed headers go only to that URL: the lean reader follows no redirect.
- Every read carries If-Match with the listed ETag and is checked as in s3.py: exact
  Content-Range and length, ETag; a 200 for part of an object is a transient failure.
- Statuses whose meaning does not depend on the error body (404, 410, 412, 416, 429, 5xx) are
  mapped by http_wire.status_error, as s3's botocore mapper maps those statuses; any other
  answer (a 403 and its code, a 400, a redirect) returns None and s3.py redoes the read through
  botocore, whose decoded error goes through s3's one mapper.
- Nothing here logs or raises credentials: messages name the bucket and key only.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from .http_wire import PlainReader, Validator, tls_context

if TYPE_CHECKING:
    from .s3 import S3Image

log = logging.getLogger(__name__)

_SIGV4 = "AWS4-HMAC-SHA256 "
# Sign in a thread this long before credentials expire: botocore refreshes them from 15 min
# before (its advisory timeout), and a refresh must not block the trio thread.
_REFRESH_MARGIN_S = 30 * 60


@dataclass(frozen=True)
class SignedTarget:
    """Where botocore sends an object's GetObject, and the scope it signs it for."""

    url: str
    region: str
    service: str


class _Captured(Exception):
    """Stops a GetObject at before-send; carries the request (never in its message)."""

    def __init__(self, url: str, authorization: str) -> None:
        super().__init__("request captured")
        self.url = url
        self.authorization = authorization


class S3Wire:
    """Signed ranged GETs for one S3 store's objects through its own lean reader."""

    def __init__(
        self, client: Any, credentials: Any, ca_file: str | None, stall: float,
        limiter: trio.CapacityLimiter,
    ) -> None:
        self.client = client
        self.credentials = credentials
        self.limiter = limiter
        # Signing threads that a read's deadline abandons (a credential refresh that hangs)
        # run on holding a token: of this, never of trio's default limiter (the cache's
        # commits use that one).
        self._signing = trio.CapacityLimiter(max(1, limiter.total_tokens))
        self.reader = PlainReader(stall, None, tls_context(ca_file))
        self.targets: dict[str, SignedTarget | None] = {}
        self._capturing = threading.local()
        client.meta.events.register_first("before-send.s3.GetObject", self._stop_at_send)

    def _stop_at_send(self, request: Any, **_: Any) -> None:
        if getattr(self._capturing, "on", False):
            raise _Captured(request.url, _text(request.headers.get("Authorization", "")))

    def _capture_sync(self, bucket: str, key: str) -> SignedTarget | None:
        """The client's own GetObject for `key`, stopped before it is sent."""
        self._capturing.on = True
        try:
            self.client.get_object(Bucket=bucket, Key=key, Range="bytes=0-0")
        except _Captured as captured:
            scope = captured.authorization.partition("Credential=")[2].partition(",")[0]
            parts = scope.split("/")
            if not captured.authorization.startswith(_SIGV4) or len(parts) != 5:
                log.debug("s3://%s/%s: not plain SigV4, reads stay with botocore", bucket, key)
                return None
            return SignedTarget(captured.url, region=parts[2], service=parts[3])
        finally:
            self._capturing.on = False
        return None  # answered without being sent (a stubbed client): leave it to botocore

    def _sign_sync(self, target: SignedTarget, offset: int, length: int, etag: str) -> dict:
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest

        request = AWSRequest(
            method="GET",
            url=target.url,
            headers={"Range": f"bytes={offset}-{offset + length - 1}", "If-Match": etag},
        )
        frozen = self.credentials.get_frozen_credentials()
        S3SigV4Auth(frozen, target.service, target.region).add_auth(request)
        return {**{k: _text(v) for k, v in request.headers.items()}, "User-Agent": "corfs"}

    async def read(self, bucket: str, image: S3Image, offset: int, length: int) -> Any:
        """The bytes, or None: redo the read through botocore."""
        if self.credentials is None or not image.etag:
            return None
        if image.key not in self.targets:
            try:
                target = await trio.to_thread.run_sync(
                    self._capture_sync, bucket, image.key, limiter=self.limiter,
                    abandon_on_cancel=True,
                )
            except Exception:  # botocore's to report, on its own path
                return None
            self.targets[image.key] = target
        target = self.targets[image.key]
        if target is None:
            return None
        async with self.limiter:
            try:
                if self._may_refresh():
                    headers = await trio.to_thread.run_sync(
                        self._sign_sync, target, offset, length, image.etag,
                        limiter=self._signing, abandon_on_cancel=True,
                    )
                else:
                    headers = self._sign_sync(target, offset, length, image.etag)
            except Exception:  # no credentials now, a failed refresh: botocore reports it
                return None
            validator = Validator(size=image.size, etag=image.etag, last_modified=None)
            return await self.reader.get_range(
                target.url, headers, validator, offset, length, http_rules=False
            )

    def _may_refresh(self) -> bool:
        """Whether getting the credentials may refresh them (static ones never do)."""
        refresh_needed = getattr(self.credentials, "refresh_needed", None)
        return refresh_needed is not None and refresh_needed(refresh_in=_REFRESH_MARGIN_S)

    def close(self) -> None:
        self.reader.close_idle()


def _text(value: str | bytes) -> str:
    """A header value as botocore holds it (str, or bytes once prepared) as text."""
    return value.decode("latin-1") if isinstance(value, bytes) else value
