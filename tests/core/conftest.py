"""The `rig_factory` fixture of tests/core; the rig itself is in tests/core/rig.py."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from tests.core.rig import open_rig


@pytest.fixture
def rig_factory(tmp_path: Path):
    """`rig_factory(images, **options)`: tests/core/rig.py's `open_rig` in this test's tmp_path."""
    return functools.partial(open_rig, tmp_path)
