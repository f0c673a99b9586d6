"""The test VM boots from a plain raw file (no corfs): the baseline the corfs VM tests need."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vm.build_image import VmArtifacts
from tests.vm.vmboot import boot

pytestmark = pytest.mark.slow


def test_raw_image_boots_and_keeps_its_writes(vm_artifacts: VmArtifacts, fresh_disk: Path):
    first = boot(fresh_disk, artifacts=vm_artifacts)
    assert first.boot_counter == 1
    assert first.tree_sum == vm_artifacts.tree_sum
    assert (first.prev_write, first.write) == ("none", "ok")

    second = boot(fresh_disk, artifacts=vm_artifacts)
    assert second.boot_counter == 2
    assert second.tree_sum == vm_artifacts.tree_sum
    assert (second.prev_write, second.write) == ("ok", "ok")


def test_raw_image_boots_with_cache_none(vm_artifacts: VmArtifacts, fresh_disk: Path):
    result = boot(fresh_disk, cache="none", artifacts=vm_artifacts)
    assert result.boot_counter == 1
    assert result.write == "ok"
