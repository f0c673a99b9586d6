"""Statistics: the rate meter, ETA, fill ratio and the status schema."""

from __future__ import annotations

import json

import pytest

from corfs.stats import (
    STATUS_SCHEMA_VERSION,
    ImageStatus,
    MountStatus,
    RateMeter,
    eta_seconds,
    fill_ratio,
)
from corfs.status_view import eta_text


def test_rate_meter_needs_two_samples() -> None:
    meter = RateMeter()
    assert meter.rate() == 0.0
    meter.sample(0.0, 0)
    assert meter.rate() == 0.0
    meter.sample(0.0, 100)  # no time passed
    assert meter.rate() == 0.0


def test_rate_meter_steady_rate() -> None:
    meter = RateMeter(window=10.0)
    for t in range(30):
        meter.sample(float(t), t * 1000)
    assert meter.rate() == pytest.approx(1000.0)


def test_rate_meter_forgets_old_samples() -> None:
    meter = RateMeter(window=10.0)
    for t in range(20):
        meter.sample(float(t), t * 1000)  # 1000 B/s for 20 s
    for t in range(20, 40):
        meter.sample(float(t), 19_000 + (t - 19) * 5000)  # then 5000 B/s
    assert meter.rate() == pytest.approx(5000.0, rel=0.15)
    for t in range(40, 60):
        meter.sample(float(t), 19_000 + 21 * 5000)  # stalled
    assert meter.rate() == pytest.approx(0.0, abs=1e-9)


def test_rate_meter_reset_forgets_what_came_before() -> None:
    meter = RateMeter(window=10.0)
    for t in range(5):
        meter.sample(float(t), t * 1000)
    meter.reset()
    assert meter.rate() == 0.0
    meter.sample(6.0, 100_000)
    meter.sample(7.0, 101_000)
    assert meter.rate() == pytest.approx(1000.0)  # not (101_000 - 0) / 7 s


def test_rate_meter_never_negative() -> None:
    meter = RateMeter()
    meter.sample(0.0, 1000)
    meter.sample(1.0, 0)  # a cache reset
    assert meter.rate() == 0.0


def test_eta_and_fill_ratio() -> None:
    assert eta_seconds(0, 0.0) == 0.0
    assert eta_seconds(-5, 10.0) == 0.0
    assert eta_seconds(1000, 0.0) is None
    assert eta_seconds(1000, 100.0) == pytest.approx(10.0)
    assert fill_ratio(0, 0) == 1.0
    assert fill_ratio(50, 200) == 0.25
    assert fill_ratio(300, 200) == 1.0


def test_eta_text_rounds_up_while_anything_is_left() -> None:
    assert eta_text(0.0) == "0:00:00"
    assert eta_text(0.4) == "0:00:01"
    assert eta_text(59.01) == "0:01:00"
    assert eta_text(3600 + 61) == "1:01:01"
    assert eta_text(None) == "-"


def test_mount_status_serialises_with_schema_version() -> None:
    image = ImageStatus("a", 100, 10, 50, 0, 0.5, "streaming", 1.5, 33.3, None)
    status = MountStatus(True, "/mnt", "/cache", "memory://", 0, [image], {"requests": 1})
    doc = json.loads(json.dumps(status.to_dict()))
    assert doc["schema_version"] == STATUS_SCHEMA_VERSION
    assert doc["images"][0]["name"] == "a" and doc["images"][0]["eta_s"] == 33.3
    assert doc["fetcher"] == {"requests": 1}
    with pytest.raises(AttributeError):
        status.mounted = False  # type: ignore[misc]
