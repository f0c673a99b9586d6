"""Boot traces: recording first reads, the file format, and converting chunk sizes."""

from __future__ import annotations

import json

import pytest

from corfs.errors import UsageError
from corfs.trace import TraceRecorder, convert_order, load_trace


def test_recorder_keeps_first_reads_in_order() -> None:
    recorder = TraceRecorder()
    note_a = recorder.hook_for("a.raw", 1 << 20)
    note_b = recorder.hook_for("b.raw", 65536)
    note_a(range(5, 7))
    note_a(range(2, 3))
    note_a(range(6, 9))  # 6 already seen
    note_b(range(0))
    note_a(range(5, 6))
    doc = json.loads(recorder.to_json())
    assert doc == {
        "version": 1,
        "images": {
            "a.raw": {"chunk_size": 1 << 20, "chunks": [5, 6, 2, 7, 8]},
            "b.raw": {"chunk_size": 65536, "chunks": []},
        },
    }


def test_round_trip_through_load() -> None:
    recorder = TraceRecorder()
    recorder.hook_for("x", 4096)(range(3, 5))
    assert load_trace(recorder.to_json(), "t") == {"x": (4096, [3, 4])}


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "[]",
        '{"version": 2, "images": {}}',
        '{"images": {}}',
        '{"version": 1}',
        '{"version": 1, "images": []}',
        '{"version": 1, "images": {"a": {"chunks": [1]}}}',
        '{"version": 1, "images": {"a": {"chunk_size": 4096}}}',
        '{"version": 1, "images": {"a": {"chunk_size": 4096, "chunks": ["x"]}}}',
        '{"version": 1, "images": {"a": {"chunk_size": 4096, "chunks": 5}}}',
    ],
)
def test_load_rejects_malformed(text: str) -> None:
    with pytest.raises(UsageError, match="not a corfs trace"):
        load_trace(text, "trace.json")


def test_convert_same_size_drops_duplicates_and_out_of_range() -> None:
    assert convert_order([3, 1, 3, 9, 2], 4096, 4096, 5) == [3, 1, 2]


def test_convert_to_larger_chunks() -> None:
    # 64 KiB chunks 0..15 are 1 MiB chunk 0; 16 is chunk 1.
    order = [17, 0, 5, 16, 40]
    assert convert_order(order, 65536, 1 << 20, 10) == [1, 0, 2]
    assert convert_order(order, 65536, 1 << 20, 2) == [1, 0]


def test_convert_to_smaller_chunks_covers_the_same_bytes() -> None:
    """A traced 1 MiB chunk is 16 chunks of 64 KiB: all of them, in byte order."""
    assert convert_order([1, 0], 1 << 20, 65536, 64) == list(range(16, 32)) + list(range(16))
    # Clipped to the image: the last chunks of the image are shorter than the trace's.
    assert convert_order([1], 1 << 20, 65536, 20) == list(range(16, 20))
    assert convert_order([0, 0], 8192, 4096, 100) == [0, 1]


def test_trace_with_a_zero_chunk_size_is_a_usage_error() -> None:
    text = '{"version": 1, "images": {"a": {"chunk_size": 0, "chunks": [1]}}}'
    with pytest.raises(UsageError, match="not a corfs trace"):
        load_trace(text, "t.json")
