"""`corfs detach PATH IMAGE DEST [--qmp SOCKET | --virsh DOMAIN] [--wait] [--timeout S]`:
which detach applies, and the client side of the live one.

- PATH not mounted: detach.py copies the image out (--qmp/--virsh refused: no QEMU runs on it).
- PATH mounted (a mountpoint, or a cache dir whose mount is live): only live, with --qmp or
  --virsh: the daemon hands the image over (handoff.py). Everything that can be checked here
  is checked first, for a clear line with nothing changed; the daemon checks again."""

from __future__ import annotations

import os
import sys
import time

from . import control_client, detach
from .cache_layout import data_path_in, is_cache_dir
from .errors import CacheLocked, NotLocalError, UsageError
from .handoff import Via, check_dest
from .status_view import fill_percent

WAIT_POLL_S = 0.5


def run_detach(path: str, image: str, dest: str, via: Via | None, *, wait: bool,
               timeout: float) -> str:
    """Detach IMAGE as the case demands; returns the line to print."""
    mountpoint = _live_mountpoint(path)
    if mountpoint is None:
        if via is not None:
            raise UsageError(
                f"{path} is not mounted: no QEMU can be using it live (without --qmp/--virsh, "
                "detach copies the image out of the cache)"
            )
        written = detach.detach_image(path, image, dest)
        return f"{image}: wrote {written} bytes to {dest}"
    if via is None:
        raise CacheLocked(
            f"{path} is mounted on {mountpoint}: unmount it first to copy {image} out, or hand "
            f"it over live to the QEMU using it with --qmp SOCKET or --virsh DOMAIN"
        )
    mount = control_client.read_status(mountpoint)
    status = _image_in(mount, mountpoint, image)
    if status["state"] == "detached":
        raise UsageError(f"{image} was handed over to {status['detached_to']} already")
    dest = os.path.abspath(dest)
    bases = [mount["base"]] if mount["base"] else []
    # Before any wait: a DEST refused after hours of --wait (the daemon checks it again)
    check_dest(data_path_in(mount["cache"], image), dest, mountpoint, bases)
    if status["fill_ratio"] < 1.0:
        if not wait:
            raise NotLocalError(
                f"{image} is {fill_percent(status['fill_ratio'])} local: only a fully local "
                "image can be handed over (add --wait to wait for the stream)"
            )
        _wait_complete(mountpoint, image, timeout)
    control_client.send_command(
        mountpoint,
        {"op": "handoff", "image": image, "dest": dest, "qmp": via.qmp, "virsh": via.virsh},
    )
    return f"{image}: handed over to {via.describe()}; its data file is now {dest}"


def _live_mountpoint(path: str) -> str | None:
    """The mountpoint if PATH is a live corfs mount or a cache dir mounted now, else None."""
    if control_client.is_corfs_mount(path):  # first: see is_corfs_mount
        return path
    if is_cache_dir(path):
        return control_client.mountpoint_of_cache(path)
    control_client.check_corfs_mount(path)  # not a cache: it must be a mount (else a clear error)
    return path


def _image_status(mountpoint: str, image: str) -> dict:
    return _image_in(control_client.read_status(mountpoint), mountpoint, image)


def _image_in(mount: dict, mountpoint: str, image: str) -> dict:
    for entry in mount["images"]:
        if entry["name"] == image:
            return entry
    raise UsageError(f"{mountpoint} has no image {image!r}")


def _wait_complete(mountpoint: str, image: str, timeout: float) -> None:
    """Until IMAGE is fully local; progress on a terminal, quiet otherwise."""
    deadline = time.monotonic() + timeout
    show = sys.stderr.isatty()
    while (status := _image_status(mountpoint, image))["fill_ratio"] < 1.0:
        local = fill_percent(status["fill_ratio"])
        if status["state"] == "error":
            raise NotLocalError(f"{image} cannot be completed: {status['error']}")
        # Nothing would fill it: --timeout waited for nothing (a base that is down may come
        # back: "offline" is waited for)
        if status["state"] == "paused":
            raise NotLocalError(
                f"{image} is {local} local and its stream is paused: "
                f"corfs stream resume {mountpoint} {image}, then detach again"
            )
        if status["state"] == "idle":
            raise NotLocalError(
                f"{image} is {local} local and its mount streams nothing "
                f"(--no-stream): read it whole (cat {mountpoint}/{image} >/dev/null), then "
                "detach again"
            )
        if time.monotonic() > deadline:
            raise NotLocalError(
                f"{image} is still {local} local after {timeout:g} s"
            )
        if show:
            print(f"\r{image}: {local} local, waiting", end="",
                  file=sys.stderr, flush=True)
        time.sleep(WAIT_POLL_S)
    if show:
        print(file=sys.stderr)
