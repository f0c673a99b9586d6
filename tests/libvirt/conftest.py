"""Fixtures for the libvirt tests: a libvirtd of our own for each module (tests/libvirt/
libvirtd.py says how it is run), and domains that are destroyed and undefined after each test,
whether it passed or not. libvirtd that cannot run fails the tests with the reason."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.libvirt.libvirtd import Libvirt, LibvirtUnavailable, running_libvirt


# Per module, not per session: a machine runs one libvirtd of the tests' at a time (libvirtd.py
# takes a lock for it), and under pytest-xdist (`make test`) another worker's module may need
# one too: it waits for this module's tests (seconds), not for this worker's whole session.
@pytest.fixture(scope="module")
def libvirt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Libvirt]:
    try:
        with running_libvirt(tmp_path_factory.mktemp("libvirtd")) as daemon:
            yield daemon
        return
    except LibvirtUnavailable as error:
        reason = str(error)
    pytest.fail(reason, pytrace=False)  # outside the except: the reason alone, no chain


@pytest.fixture
def define_domain(libvirt: Libvirt) -> Iterator[Callable[..., str]]:
    """define_domain(name, xml) -> name: `virsh define` it (persistent), or with
    transient=True `virsh create` it (started, no persistent definition); either way it is
    destroyed and undefined at teardown."""
    names: list[str] = []

    def define(name: str, xml: str, *, transient: bool = False) -> str:
        names.append(name)
        verb = "create" if transient else "define"
        libvirt.virsh(verb, "--file", "/dev/stdin", input_text=xml)
        return name

    yield define
    for name in reversed(names):
        libvirt.remove_domain(name)
