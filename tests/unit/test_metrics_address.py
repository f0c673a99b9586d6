"""Issue 14: --metrics takes PORT (loopback) or HOST:PORT; anything else is a UsageError."""

from __future__ import annotations

import pytest

from corfs.errors import UsageError
from corfs.metrics import parse_listen_address


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("9100", ("127.0.0.1", 9100)),
        ("0.0.0.0:9100", ("0.0.0.0", 9100)),
        ("[::1]:9101", ("::1", 9101)),
        ("localhost:1", ("localhost", 1)),
    ],
)
def test_listen_addresses(text: str, address: tuple[str, int]) -> None:
    assert parse_listen_address(text) == address


@pytest.mark.parametrize("text", ["", "x", "0", "65536", "host:", ":9100", "h:-1", "h:9x"])
def test_bad_listen_addresses(text: str) -> None:
    with pytest.raises(UsageError, match="--metrics"):
        parse_listen_address(text)
