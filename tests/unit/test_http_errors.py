"""The one httpx mapper (base/http_wire.httpx_errors): what the wire did becomes the error the
fetcher and the listing act on."""

from __future__ import annotations

import httpx
import pytest

from corfs.base.http_wire import httpx_errors
from corfs.errors import BaseError, BaseProtocolError, BaseUnreachable, TransientBaseError

WHAT = "http://host/a.raw"


def _mapped(exc: Exception, *, opening: bool) -> BaseError:
    with pytest.raises(BaseError) as info, httpx_errors(WHAT, opening=opening):
        raise exc
    assert WHAT in str(info.value)
    return info.value


@pytest.mark.parametrize(
    ("exc", "opening", "error"),
    [
        # Reading: anything on the wire is worth a retry within --io-timeout.
        (httpx.ConnectError("refused"), False, TransientBaseError),
        (httpx.ReadTimeout("slow"), False, TransientBaseError),
        (httpx.RemoteProtocolError("bad head"), False, TransientBaseError),
        (httpx.StreamClosed(), False, TransientBaseError),
        # Opening: an unreachable server says why, a refused head is this answer's fault.
        (httpx.ConnectError("Connection refused"), True, BaseUnreachable),
        (httpx.ConnectTimeout("slow"), True, BaseUnreachable),
        (httpx.ReadTimeout("slow"), True, TransientBaseError),
        (httpx.RemoteProtocolError("Server disconnected"), True, TransientBaseError),
        (httpx.RemoteProtocolError("malformed Content-Length"), True, BaseProtocolError),
        (httpx.ReadError("reset"), True, TransientBaseError),
    ],
)
def test_wire_failures_map_by_phase(exc: Exception, opening: bool, error: type) -> None:
    assert type(_mapped(exc, opening=opening)) is error


def test_what_is_not_the_wire_passes_through() -> None:
    with pytest.raises(httpx.TooManyRedirects), httpx_errors(WHAT):
        raise httpx.TooManyRedirects("loop")
    with pytest.raises(KeyError), httpx_errors(WHAT, opening=True):
        raise KeyError("a bug is not a base error")
