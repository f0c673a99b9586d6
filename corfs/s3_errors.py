"""botocore exceptions -> the error tree (errors.py): the one mapper for every S3 call, a base
read (base/s3.py) or a publish (publish/destination.py).

What an answer means does not depend on who asked:
- 403 (and 401, and the codes of bad or expired credentials) is an auth/permission failure of
  that bucket or key: BaseAccessDenied (EACCES, exit 5). Not a usage error: the command line
  may be right and the credentials or the bucket policy wrong. A publish destination is a
  base-to-be (what it holds is served as a base), so its refusals are the same class.
- 404 / NoSuchKey / NoSuchBucket: BaseNotFound; a caller for which absence is an answer (does
  this object exist?) decides that itself.
- 412 / 416: BaseChanged (a conditional read lost its object); 5xx, 429 and throttling:
  TransientBaseError, as are connection failures and timeouts (the caller's retry policy
  applies). No credentials at all is BaseAccessDenied too; an unknown profile is a UsageError.
- A redirect that names no bucket region (an http -> https redirect in front of an
  S3-compatible endpoint, a login page) is BaseUnavailable, never followed: botocore follows
  only AWS's region redirects, and `refuse_blind_redirects` keeps it from chasing the others.
Messages name the bucket and key (`what`), never credentials.
"""

from __future__ import annotations

from typing import Any

from .errors import (
    BaseAccessDenied,
    BaseChanged,
    BaseError,
    BaseNotFound,
    BaseProtocolError,
    BaseUnavailable,
    CorfsError,
    TransientBaseError,
    UsageError,
)

_NOT_FOUND = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
_DENIED = {
    "403",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AllAccessDisabled",
    "AccountProblem",
}
_CHANGED = {"412", "PreconditionFailed", "InvalidRange", "416"}
_TRANSIENT = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "503",
    "500",
    "502",
    "504",
    "429",
}


_REDIRECTS = (301, 302, 307, 308)


def refuse_blind_redirects(client: Any) -> None:
    """Make `client` (a botocore S3 client) take a redirect that names no region as its answer.
    botocore's region redirector asks HeadBucket for the region such a redirect does not name,
    and an endpoint that redirects that HeadBucket too sent it into endless recursion: ~80
    requests, then a RecursionError (a traceback for `corfs mount`, an internal error per
    read). Marking the request as redirected already makes botocore raise the 3xx as a
    ClientError instead; AWS's own region redirects (x-amz-bucket-region, an error naming the
    Region) are still followed by botocore, to AWS only."""
    client.meta.events.register_first("needs-retry.s3", _no_blind_redirect)


def _no_blind_redirect(request_dict: dict, response: Any = None, **_: Any) -> None:
    if response is None or response[0] is None or response[0].status_code not in _REDIRECTS:
        return
    parsed = response[1]
    if "x-amz-bucket-region" in parsed.get("ResponseMetadata", {}).get("HTTPHeaders", {}):
        return
    if parsed.get("Error", {}).get("Region"):
        return
    request_dict.setdefault("context", {}).setdefault("s3_redirect", {})["redirected"] = True


def s3_error(exc: Exception, what: str) -> CorfsError:
    """The error for botocore's `exc` on `what` (s3://bucket/key), with the HTTP status it came
    from (metrics count by it); any other exception that is not an OSError or a parse failure
    is re-raised (a bug, not an answer of S3)."""
    from botocore import exceptions as bx  # boto3 is optional: imported with its first use

    error = _mapped(exc, what)
    if isinstance(exc, bx.ClientError) and isinstance(error, BaseError):
        error.http_status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or None
    return error


def _mapped(exc: Exception, what: str) -> CorfsError:
    from botocore import exceptions as bx

    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in _NOT_FOUND or status == 404:
            return BaseNotFound(f"{what}: not found ({code or status})")
        if code in _DENIED or status in (401, 403):
            return BaseAccessDenied(f"{what}: access denied ({code or status})")
        if code in _CHANGED or status in (412, 416):
            return BaseChanged(f"{what}: changed on the server ({code or status})")
        if code in _TRANSIENT or status >= 500 or status == 429:
            return TransientBaseError(f"{what}: server busy or failing ({code or status})")
        if status in _REDIRECTS:
            return BaseUnavailable(
                f"{what}: the endpoint redirects (HTTP {status}), corfs does not follow: "
                "check --endpoint-url and --region"
            )
        return BaseUnavailable(f"{what}: S3 error {code or status}")
    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return BaseAccessDenied(f"{what}: no S3 credentials found (env, profile or instance role)")
    if isinstance(exc, bx.ProfileNotFound):
        return UsageError(f"{what}: {exc}")
    if isinstance(exc, bx.EndpointConnectionError):
        return TransientBaseError(f"{what}: cannot connect to the S3 endpoint")
    if isinstance(exc, (bx.ConnectTimeoutError, bx.ReadTimeoutError)):
        return TransientBaseError(f"{what}: timed out ({type(exc).__name__})")
    if isinstance(exc, (bx.IncompleteReadError, bx.ResponseStreamingError, bx.ConnectionError)):
        return TransientBaseError(f"{what}: connection failed ({type(exc).__name__})")
    if isinstance(exc, bx.SSLError):
        return BaseUnavailable(f"{what}: TLS failure talking to the S3 endpoint")
    if isinstance(exc, bx.ParamValidationError):  # a bucket name S3 cannot have: the user's
        return UsageError(f"{what}: {' '.join(str(exc).split())}")  # one line
    if isinstance(exc, bx.BotoCoreError):
        return TransientBaseError(f"{what}: {type(exc).__name__}")
    if isinstance(exc, (ValueError, OverflowError)):  # botocore parsing an absurd answer
        return BaseProtocolError(f"{what}: answer does not parse ({type(exc).__name__})")
    if isinstance(exc, OSError):
        return TransientBaseError(f"{what}: connection failed ({type(exc).__name__})")
    if isinstance(exc, RuntimeError) and "credentials are still expired" in str(exc):
        # botocore's own, bare: a credential source handing out expired credentials
        return BaseAccessDenied(
            f"{what}: the S3 credentials the credential source gives are expired"
        )
    raise exc
