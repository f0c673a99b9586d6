"""The options a running QEMU was started with for the nodes on one file, where QEMU 7.2's QMP
does not report them (qmp_switch.py: `aio`, `locking`, `discard`): read from the QEMU's own
command line, so that the nodes a live handoff makes keep them. Nodes added later over QMP
are not on it; theirs fall back to QEMU's defaults (logged)."""

from __future__ import annotations

import json
import logging
import os

from .qmp_switch import same_path

log = logging.getLogger(__name__)

FILE_KEYS = ("aio", "locking")  # options of the `file` node
NODE_KEYS = ("discard",)  # options of every node (file and format)


def qemu_pid_for_socket(socket_path: str) -> int | None:
    """The QEMU whose command line names this QMP socket, if exactly one does."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and b"qemu" in os.path.basename(argv[0]) and any(
            _names_socket(os.fsdecode(arg), socket_path) for arg in argv
        ):
            found.append(int(entry))
    return found[0] if len(found) == 1 else None


Started = dict[str | None, tuple[dict, dict]]  # qmp_switch.plan_switch's `started`


def _names_socket(arg: str, socket_path: str) -> bool:
    """Whether a -qmp / -chardev argument is that unix socket (`unix:PATH[,...]`, `path=PATH`)."""
    items = _split_options(arg)
    return f"unix:{socket_path}" in items[:1] or f"path={socket_path}" in items


def started_options(pid: int | None, path: str) -> Started:
    """Per file node on `path` (by node name; None: a -drive's auto-named ones), the options
    for every node over it and for the file node that QEMU `pid` was started with."""
    if pid is None:
        log.info("QEMU's command line is unknown: new nodes on the image get QEMU's default "
                 "aio, locking and discard")
        return {}
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [os.fsdecode(arg) for arg in f.read().split(b"\0")]
    except OSError as exc:
        log.info("cannot read QEMU's command line (%s): default aio, locking, discard", exc)
        return {}
    return options_for(argv, path)


def options_for(argv: list[str], path: str) -> Started:
    """The same, from an argv: `-drive file=PATH,...` (key None) and `-blockdev` (key=value or
    JSON) file nodes on PATH (their node names) with the format nodes over them."""
    out: Started = {}
    pairs = list(zip(argv, argv[1:], strict=False))
    blockdevs = [_parse(value) for flag, value in pairs if flag == "-blockdev"]
    for drive in (_parse(value) for flag, value in pairs if flag == "-drive"):
        if _same(drive.get("file"), path):
            file = _pick(drive, FILE_KEYS) | _pick(drive, FILE_KEYS, "file.")
            out[None] = (_pick(drive, NODE_KEYS), file)
    for dev in blockdevs:
        if dev.get("driver") == "file" and _same(dev.get("filename"), path):
            node = _pick(dev, NODE_KEYS)
            for over in blockdevs:
                if over.get("file") == dev.get("node-name"):
                    node.update(_pick(over, NODE_KEYS))
            out[dev.get("node-name")] = (node, _pick(dev, FILE_KEYS))
    return out


def _parse(value: str) -> dict:
    if value.lstrip().startswith("{"):
        try:
            parsed = json.loads(value)
        except ValueError:
            return {}
        return parsed if isinstance(parsed, dict) else {}
    out = {}
    for item in _split_options(value):
        key, sep, val = item.partition("=")
        if sep:
            out[key] = val
    return out


def _split_options(value: str) -> list[str]:
    """QEMU's option list, read as QEMU does, left to right: ",," is a comma of the value,
    a single "," ends it (hunt: a lookaround split nothing in "disk,,,discard=unmap", a file
    name ending in a comma, and its options were lost across a handoff)."""
    items: list[str] = []
    current: list[str] = []
    at = 0
    while at < len(value):
        if value[at] != ",":
            current.append(value[at])
            at += 1
        elif value.startswith(",,", at):
            current.append(",")
            at += 2
        else:
            items.append("".join(current))
            current = []
            at += 1
    items.append("".join(current))
    return items


def _pick(options: dict, keys: tuple[str, ...], prefix: str = "") -> dict:
    picked = {key: options[prefix + key] for key in keys if prefix + key in options}
    if "discard" in picked:  # -drive also takes on/off; blockdev-add only unmap/ignore
        picked["discard"] = {"on": "unmap", "off": "ignore"}.get(picked["discard"],
                                                               picked["discard"])
    return picked


def _same(a: object, b: str) -> bool:
    return isinstance(a, str) and same_path(a, b)
