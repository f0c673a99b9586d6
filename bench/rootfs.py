"""A realistic disk image for the benchmarks: a Debian 12 root filesystem in a 2 GiB ext4 raw
image, as a VM would boot from.

    python -m bench.rootfs            # build (or reuse) and print the image's path

How: `mmdebstrap` (or `debootstrap` if mmdebstrap fails) installs Debian bookworm from the
mirror apt uses into a directory under /var/tmp/corfs-bench, then `mkfs.ext4 -d DIR img 2G`
turns that tree into an image without mounting anything. If neither bootstrapper works, the
image is filled from this machine's /usr instead (`kind` says which one was built; the
benchmark reports it).

The result is cached under a key made of every input (suite, variant, package list, size,
mirror, tool versions): a second run reuses it. Nothing here goes into the repository.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass

from bench.harness import WORK

SUITE = "bookworm"
VARIANT = "important"  # what a minimal installed system has (apt, systemd, coreutils ...)
EXTRA_PACKAGES = ("linux-image-amd64", "openssh-server", "ca-certificates", "curl", "less")
IMAGE_SIZE = "2G"
MIRROR = "http://deb.debian.org/debian"
FALLBACK_SOURCE = "/usr"


@dataclass(frozen=True)
class RootfsImage:
    path: str
    kind: str  # "debian-mmdebstrap" | "debian-debootstrap" | "usr-fallback"
    key: str
    note: str


def _tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "missing"


def _key(kind: str) -> str:
    inputs = {
        "kind": kind,
        "suite": SUITE,
        "variant": VARIANT,
        "packages": EXTRA_PACKAGES,
        "size": IMAGE_SIZE,
        "mirror": MIRROR,
        "mke2fs": _tool_version(["mke2fs", "-V"]),
        "tool": _tool_version(["mmdebstrap", "--version"])
        if kind == "debian-mmdebstrap"
        else _tool_version(["debootstrap", "--version"])
        if kind == "debian-debootstrap"
        else FALLBACK_SOURCE,
        "version": 1,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def _run(argv: list[str], log: str) -> bool:
    print("+", " ".join(argv), file=sys.stderr)
    with open(log, "ab") as f:
        return subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT).returncode == 0


def _bootstrap(kind: str, tree: str, log: str) -> bool:
    shutil.rmtree(tree, ignore_errors=True)
    if kind == "debian-mmdebstrap":
        if not shutil.which("mmdebstrap"):
            return False
        return _run(
            [
                "mmdebstrap",
                f"--variant={VARIANT}",
                f"--include={','.join(EXTRA_PACKAGES)}",
                "--mode=root",
                SUITE,
                tree,
                MIRROR,
            ],
            log,
        )
    if kind == "debian-debootstrap":
        if not shutil.which("debootstrap"):
            return False
        return _run(
            [
                "debootstrap",
                f"--variant={'minbase' if VARIANT == 'minbase' else 'buildd'}",
                f"--include={','.join(EXTRA_PACKAGES)}",
                SUITE,
                tree,
                MIRROR,
            ],
            log,
        )
    raise ValueError(kind)


def _mkfs(tree: str, image: str, log: str) -> bool:
    tmp = image + ".tmp"
    if os.path.exists(tmp):
        os.unlink(tmp)
    ok = _run(["mkfs.ext4", "-q", "-F", "-L", "rootfs", "-d", tree, tmp, IMAGE_SIZE], log)
    if ok:
        os.replace(tmp, image)
    return ok


def build(workdir: str | None = None) -> RootfsImage:
    """The cached rootfs image, building it first if needed."""
    root = workdir or os.path.join(WORK, "rootfs")
    os.makedirs(root, exist_ok=True)
    log = os.path.join(root, "build.log")
    for kind in ("debian-mmdebstrap", "debian-debootstrap", "usr-fallback"):
        key = _key(kind)
        image = os.path.join(root, f"rootfs-{kind}-{key}.raw")
        meta = image + ".json"
        if os.path.exists(image) and os.path.exists(meta):
            with open(meta) as f:
                return RootfsImage(**json.load(f))
        if kind == "usr-fallback":
            tree = FALLBACK_SOURCE
            note = f"ext4 image filled from {FALLBACK_SOURCE} of this machine (no Debian bootstrap)"
        else:
            tree = os.path.join(root, f"tree-{key}")
            if not _bootstrap(kind, tree, log):
                print(f"{kind} failed, see {log}", file=sys.stderr)
                continue
            note = f"Debian {SUITE} ({VARIANT} + {' '.join(EXTRA_PACKAGES)}) via {kind[7:]}"
        if not _mkfs(tree, image, log):
            print(f"mkfs.ext4 -d {tree} failed, see {log}", file=sys.stderr)
            continue
        if tree != FALLBACK_SOURCE:
            shutil.rmtree(tree, ignore_errors=True)
        result = RootfsImage(image, kind, key, note)
        with open(meta, "w") as f:
            json.dump(asdict(result), f)
        return result
    raise RuntimeError(f"could not build a rootfs image; see {log}")


def main() -> None:
    image = build()
    print(json.dumps(asdict(image)))


if __name__ == "__main__":
    main()
