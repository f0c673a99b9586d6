"""Issue 10, item 7: the one check of image names and sizes every base uses, and data file
names that stay within NAME_MAX while old caches keep their files."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from corfs.base import MAX_IMAGE_SIZE, entry_problem, image_name_problem
from corfs.cache_layout import data_file_name

GOOD = ["disk.raw", "é" * 127, "a" * 255, "with space", ".hidden", "日本語.img"]
BAD = ["", ".", "..", "a/b", "nul\0", "esc\x1b", "del\x7f", "c1\x85", "\udce9", "a" * 256]


@pytest.mark.parametrize("name", GOOD)
def test_good_names(name: str) -> None:
    assert image_name_problem(name) is None


@pytest.mark.parametrize("name", BAD)
def test_bad_names(name: str) -> None:
    assert image_name_problem(name) is not None


def test_sizes_are_bounded() -> None:
    assert entry_problem("a", 0) is None and entry_problem("a", MAX_IMAGE_SIZE) is None
    assert entry_problem("a", MAX_IMAGE_SIZE + 1) is not None
    assert entry_problem("a", 99999999999999999999) is not None
    assert entry_problem("a", -1) is not None


@pytest.mark.parametrize("name", GOOD)
def test_data_file_names_fit_and_short_ones_are_unchanged(name: str) -> None:
    file = data_file_name(name)
    assert len(file.encode()) <= 255 and "/" not in file and file not in (".", "..")
    if len(quote(name, safe="")) <= 255:
        assert file == quote(name, safe="")  # what caches before long names hold


def test_long_names_sharing_a_prefix_get_distinct_files() -> None:
    names = ["é" * 120 + "a", "é" * 120 + "b", "é" * 127]
    files = {data_file_name(n) for n in names}
    assert len(files) == 3
    assert all("%~" in f and len(f) <= 255 for f in files)
