"""The pure parts of bench/peers.py and bench/cachedev.py: option lists, the best peer, the
medians that skip failed runs, issue 13's target rows and the blkio rule line."""

from __future__ import annotations

import pytest

from bench.cachedev import throttle_rule
from bench.peers import (
    CORFS_STREAM,
    QEMU_STREAM,
    WORKLOADS,
    best_peer,
    median_of,
    parse_names,
    target_rows,
)


def test_parse_names_keeps_the_order_given_and_names_unknown_ones() -> None:
    assert parse_names("stream, seq,", WORKLOADS, "workload") == ["stream", "seq"]
    with pytest.raises(ValueError, match="unknown workload: fast, slow"):
        parse_names("seq,fast,slow", WORKLOADS, "workload")
    with pytest.raises(ValueError, match="none given"):
        parse_names(" , ", WORKLOADS, "workload")


def test_median_skips_failed_runs_and_is_none_when_all_failed() -> None:
    assert median_of([{"MB/s": 3.0}, {"error": "x"}, {"MB/s": 1.0}, {"MB/s": 2.0}], "MB/s") == 2
    assert median_of([{"error": "x"}], "MB/s") is None


def test_best_peer_is_the_fastest_system_that_is_not_corfs() -> None:
    results = {"seq": {
        "corfs": [{"MB/s": 900.0}],
        "corfs+stream": [{"MB/s": 800.0}],
        "rclone": [{"MB/s": 100.0}, {"MB/s": 300.0}, {"MB/s": 200.0}],
        "nbdkit": [{"MB/s": 250.0}],
        "qemu": [{"error": "stalled"}],
    }}
    assert best_peer(results) == "nbdkit"  # 250 against rclone's median 200
    results["seq"]["nbdkit"] = [{"MB/s": 150.0}]
    assert best_peer(results) == "rclone"
    assert best_peer({"seq": {"corfs": [{"MB/s": 1.0}]}}) is None
    results["seq"]["floor"] = [{"MB/s": 9999.0}]  # a baseline, never a peer
    assert best_peer(results) == "rclone"


def test_floors_are_shown_beside_corfs_for_random_reads_with_no_goal() -> None:
    results = {"random": {
        "corfs": [{"IOPS": 1500.0, "p99_ms": 1.0, "fetched / read": 1.0}],
        "nbdkit": [{"IOPS": 1500.0, "p99_ms": 1.5, "fetched / read": 15.0}],
        "floor": [{"IOPS": 2000.0}],
        "floor-blocking": [{"IOPS": 3000.0}],
    }}
    floors = [r for r in target_rows(results) if r.against.startswith("floor")]
    assert [(r.target, r.ratio, r.goal, r.met) for r in floors] == [
        ("cold random 4 KiB QD1 IOPS", 0.75, None, None),
        ("cold random 4 KiB QD1 IOPS", 0.5, None, None),
    ]


def test_target_rows_give_ratios_against_the_right_figure_and_direction() -> None:
    results = {
        "seq": {"corfs": [{"MB/s": 300.0}], "nbdkit": [{"MB/s": 200.0}]},
        "random": {
            "corfs": [{"IOPS": 3000.0, "p99_ms": 2.0, "fetched / read": 8.0}],
            "nbdkit": [{"IOPS": 1000.0, "p99_ms": 4.0, "fetched / read": 12.0}],
        },
        "stream": {
            "curl -o FILE && sync": [{"MB/s": 200.0}],
            CORFS_STREAM: [{"MB/s": 190.0}],
            QEMU_STREAM: [{"error": "failed"}],
        },
    }
    rows = {(r.target, r.against.split(" ")[0]): r for r in target_rows(results)}
    seq = rows[("cold sequential, --no-stream", "best")]
    assert (seq.ratio, seq.met) == (1.5, True)
    assert rows[("cold random 4 KiB QD1 IOPS", "nbdkit")].ratio == 3.0
    p99 = rows[("cold random p99", "nbdkit")]
    assert (p99.ratio, p99.met) == (0.5, True)  # lower is better: at most nbdkit's
    amplification = rows[("cold random base bytes / byte read", "16")]
    assert (amplification.ratio, amplification.met) == (0.5, True)
    assert rows[("full stream", "curl")].met is True  # 0.95 >= 0.9
    qemu = rows[("full stream", "QEMU")]
    assert (qemu.ratio, qemu.met) == (None, None)  # QEMU failed: no ratio, not "met"
    assert ("cold sequential, default mount", "best") not in rows  # not run


def test_throttle_rule_is_one_device_line_and_refuses_garbage() -> None:
    assert throttle_rule("7:0", 157286400) == "7:0 157286400\n"
    assert throttle_rule("7:3", 0) == "7:3 0\n"  # 0 removes the rule
    for bad in (("7", 1), ("a:b", 1), ("7:0", -1), ("7:0\n8:0", 1)):
        with pytest.raises(ValueError):
            throttle_rule(*bad)
