"""The options QMP does not report, read from a QEMU command line for the nodes on one file."""

from __future__ import annotations

from corfs.qemu_cmdline import options_for

P = "/mnt/vm/disk,raw"  # a comma in the path: -drive escapes it as ,,


def test_drive_options_and_escaped_commas() -> None:
    argv = ["qemu", "-drive", "file=/mnt/vm/disk,,raw,if=none,aio=native,discard=on,"
            "cache=none,file.locking=off", "-drive", "file=/other,aio=threads"]
    want = ({"discard": "unmap"}, {"aio": "native", "locking": "off"})
    assert options_for(argv, P) == {None: want}


def test_blockdev_keyval_and_json_file_and_format_nodes() -> None:
    argv = [
        "qemu",
        "-blockdev", '{"driver":"file","filename":"/mnt/vm/disk,raw","node-name":"s",'
        '"aio":"io_uring","locking":"on"}',
        "-blockdev", '{"driver":"raw","file":"s","node-name":"f","discard":"unmap"}',
        "-blockdev", "driver=file,filename=/elsewhere,node-name=x,aio=native",
    ]
    want = ({"discard": "unmap"}, {"aio": "io_uring", "locking": "on"})
    assert options_for(argv, P) == {"s": want}


def test_nothing_known_for_a_file_not_on_the_command_line() -> None:
    assert options_for(["qemu", "-machine", "none"], P) == {}


def test_a_socket_is_named_exactly() -> None:
    from corfs.qemu_cmdline import _names_socket

    assert _names_socket("unix:/run/a.qmp,server=on,wait=off", "/run/a.qmp")
    assert _names_socket("socket,id=m,path=/run/a.qmp,server=on", "/run/a.qmp")
    assert not _names_socket("unix:/run/a.qmp2,server=on", "/run/a.qmp")
    assert not _names_socket("file=/run/a.qmp.raw,if=none", "/run/a.qmp")
