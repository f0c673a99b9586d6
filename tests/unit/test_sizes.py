"""Human sizes and rates: parsing and formatting."""

from __future__ import annotations

import pytest

from corfs.sizes import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("512", 512),
        ("64k", 64 << 10),
        ("64K", 64 << 10),
        ("64KiB", 64 << 10),
        ("50M", 50 << 20),
        ("50MB", 50 << 20),
        ("50m/s", 50 << 20),
        ("50MiB/s", 50 << 20),
        ("1.5G", 3 << 29),
        ("2g", 2 << 30),
        ("1T", 1 << 40),
        (" 8M ", 8 << 20),
        ("100b", 100),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize(
    "text",
    [
        "", "M", "abc", "5X", "5 MBytes", "-1", "-5M", "1.2.3",
        "0.5", "1e-3",  # int() made them 0: `corfs stream bandwidth MNT 0.5` lifted the limit
    ],
)
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize("text", ["inf", "nan", "infG", "-inf"])
def test_parse_size_rejects_non_finite(text: str) -> None:
    """Every bad size is a ValueError (the CLI turns those into a usage message)."""
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_format_size() -> None:
    assert format_size(0) == "0 B"
    assert format_size(1023) == "1023 B"
    assert format_size(1024) == "1.0 KiB"
    assert format_size(1024 * 1024 - 1) == "1.0 MiB"  # not "1024.0 KiB"
    assert format_size(1024 * 1024 - 60) == "1023.9 KiB"
    assert format_size(1023.6) == "1.0 KiB"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(50 << 20) == "50.0 MiB"
    assert format_size(3 << 30) == "3.0 GiB"
    assert format_size(5 << 40) == "5.0 TiB"
    assert format_size(5000 << 40) == "5000.0 TiB"


def test_round_trip() -> None:
    for value in (0, 1, 4096, 50 << 20, 3 << 30):
        assert abs(parse_size(format_size(value).replace(" ", "")) - value) <= value * 0.05
