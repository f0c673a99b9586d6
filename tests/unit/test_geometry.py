"""Chunk geometry: ranges, partial coverage, clipping, the short last chunk, a 0-byte image."""

from __future__ import annotations

import random

import pytest

from corfs.geometry import ChunkGeometry

CS = 4096


def test_rejects_bad_sizes() -> None:
    for bad in (0, -4096, 3000, 4097):
        with pytest.raises(ValueError):
            ChunkGeometry(10, bad)
    with pytest.raises(ValueError):
        ChunkGeometry(-1, CS)


def test_counts_and_short_last_chunk() -> None:
    g = ChunkGeometry(10 * CS + 5, CS)
    assert g.chunk_count == 11
    assert g.chunk_start(10) == 10 * CS
    assert g.chunk_length(9) == CS and g.chunk_length(10) == 5
    assert g.chunk_length(11) == 0
    assert ChunkGeometry(10 * CS, CS).chunk_count == 10
    assert ChunkGeometry(1, CS).chunk_count == 1


def test_zero_byte_image() -> None:
    g = ChunkGeometry(0, CS)
    assert g.chunk_count == 0
    assert g.clip(0, 100) == 0
    assert g.chunks_of(0, 100) == range(0)
    assert g.partly_covered(0, 100) == []


def test_chunks_of_and_clip() -> None:
    g = ChunkGeometry(10 * CS + 5, CS)
    assert g.chunks_of(0, 1) == range(0, 1)
    assert g.chunks_of(CS - 1, 2) == range(0, 2)
    assert g.chunks_of(CS, CS) == range(1, 2)
    assert g.chunks_of(CS, CS + 1) == range(1, 3)
    assert g.chunks_of(0, 0) == range(0)
    assert g.chunks_of(10 * CS + 4, 100) == range(10, 11)  # clipped at the end
    assert g.chunks_of(10 * CS + 5, 100) == range(0)  # at EOF
    assert g.chunks_of(20 * CS, 1) == range(0)  # past EOF
    assert g.clip(10 * CS, 100) == 5
    assert g.clip(10 * CS + 5, 100) == 0
    assert g.clip(30 * CS, 100) == 0
    assert g.clip(0, 3) == 3


def test_partly_covered() -> None:
    g = ChunkGeometry(10 * CS + 5, CS)
    assert g.partly_covered(0, CS) == []
    assert g.partly_covered(0, 3 * CS) == []
    assert g.partly_covered(1, CS - 1) == [0]
    assert g.partly_covered(0, CS - 1) == [0]
    assert g.partly_covered(CS - 1, CS + 2) == [0, 2]  # middle chunk whole
    assert g.partly_covered(CS + 1, 10) == [1]  # one chunk, both ends inside
    assert g.partly_covered(10 * CS, 5) == []  # the short last chunk, whole
    assert g.partly_covered(10 * CS, 4) == [10]
    assert g.partly_covered(9 * CS + 1, CS + 4) == [9]


def test_against_brute_force() -> None:
    rnd = random.Random(1)
    for _ in range(2000):
        cs = 1 << rnd.randrange(0, 6)
        size = rnd.randrange(0, 200)
        g = ChunkGeometry(size, cs)
        offset, length = rnd.randrange(0, 220), rnd.randrange(0, 80)
        inside = [b for b in range(offset, offset + length) if b < size]
        touched = sorted({b // cs for b in inside})
        assert list(g.chunks_of(offset, length)) == touched
        assert g.clip(offset, length) == len(inside)
        assert sum(g.chunk_length(i) for i in range(g.chunk_count)) == size
        partial = [i for i in touched if sum(1 for b in inside if b // cs == i) < g.chunk_length(i)]
        assert g.partly_covered(offset, length) == partial, (size, cs, offset, length)


def test_bytes_of_chunks_count_the_short_last_chunk_once() -> None:
    g = ChunkGeometry(3 * CS + 5, CS)
    assert g.length_of_chunks([0, 3]) == CS + 5
    assert g.length_of_chunks([]) == 0
    assert g.most_bytes_of(2) == 2 * CS
    assert g.most_bytes_of(4) == 3 * CS + 5  # never more than the image
