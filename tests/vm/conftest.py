"""Fixtures for the VM tests: the cached test image, and a private copy of its disk per test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.vm.build_image import VmArtifacts, build_test_image, copy_disk

REQUIRED_TOOLS = ("qemu-system-x86_64", "qemu-img", "mkfs.ext4", "dpkg")


@pytest.fixture(scope="session")
def vm_artifacts() -> VmArtifacts:
    # Fail, not skip: scripts/setup.sh installs these, so a missing one is a broken set-up.
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"VM tests need {', '.join(missing)} (run scripts/setup.sh)")
    return build_test_image()


@pytest.fixture
def fresh_disk(vm_artifacts: VmArtifacts, tmp_path: Path) -> Path:
    """A writable copy of the pristine image (boot counter 0)."""
    return copy_disk(vm_artifacts.disk, tmp_path / "disk.raw")
