"""Build the small bootable VM image the corfs VM tests boot.

Output (all outside the repo, in the test cache dir):

- ``disk.raw``: a raw ext4 image (no partition table) made with ``mkfs.ext4 -d ROOTDIR``, so no
  loop mount and no privileges are needed. Its root is a busybox-static userland whose
  ``/sbin/init`` is ``guest/workload``; ``/data`` holds a few MiB of varied, deterministic files.
- ``vmlinux``: the kernel of Debian's current ``linux-image-*-amd64`` (``apt-get download`` +
  ``dpkg -x``; nothing is installed), taken out of its compressed ``vmlinuz``: QEMU boots that
  ELF straight through its PVH entry point (Debian sets CONFIG_PVH), skipping the firmware's
  -kernel loader and the decompression, which under TCG took 3.5 of a boot's 8 s.
- ``initrd.img``: a tiny gzip'd cpio with busybox, ``guest/initramfs-init`` and the modules
  virtio_pci, virtio_blk and ext4 need (Debian builds them as modules), in dependency order.
- ``manifest.json``: kernel version and the tree checksum the guest must print.

The build is cached by a key over this script, the guest scripts, the busybox binary and the
kernel version, so a rerun only resolves the kernel version and returns. ``disk.raw`` in the
cache is pristine: boot a copy (:func:`copy_disk`), never the cached file.

Run: ``python -m tests.vm.build_image [--out DIR]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import gzip
import hashlib
import json
import logging
import lzma
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

log = logging.getLogger(__name__)

GUEST_DIR = Path(__file__).resolve().parent / "guest"
BUSYBOX = Path("/bin/busybox")
DISK_SIZE_MIB = 128
# The modules the initramfs loads; their depends= fields pull in the rest.
ROOT_MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4")
# softdep "pre: crypto-crc32c" is resolved by modprobe at run time; we resolve it here.
SOFTDEP_ALIASES = {"crypto-crc32c": "crc32c_generic"}
BUILD_FORMAT = 2  # bump to invalidate every cached build


@dataclasses.dataclass(frozen=True)
class VmArtifacts:
    disk: Path
    kernel: Path
    initrd: Path
    kernel_version: str
    tree_sum: str  # sha256 the guest prints as sum=

    def append_line(self, root: str = "/dev/vda") -> str:
        return f"root={root} console=ttyS0 panic=1 loglevel=4"


def cache_root() -> Path:
    return Path(os.environ.get("CORFS_TEST_CACHE", "/var/cache/corfs-tests"))


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    log.debug("run %s", cmd)
    return subprocess.run(cmd, check=True, **kwargs)


# --------------------------------------------------------------------------- kernel


def kernel_package_name() -> str:
    """The linux-image-X-amd64 package the linux-image-amd64 metapackage depends on."""
    for attempt in range(2):
        out = subprocess.run(
            ["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True
        ).stdout
        match = re.search(r"Depends:\s*(linux-image-[0-9][^\s]*-amd64)\b", out)
        if match:
            return match.group(1)
        if attempt == 0 and os.geteuid() == 0 and not (cache_root() / "debs").is_dir():
            # A machine whose apt lists were never fetched knows no linux-image-amd64.
            log.info("apt-cache knows no linux-image-amd64: running apt-get update")
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, check=False)
    cached = sorted((cache_root() / "debs").glob("linux-image-*-amd64_*.deb"))
    if cached:
        return cached[-1].name.split("_", 1)[0]
    raise RuntimeError(
        "cannot resolve linux-image-amd64 (run 'apt-get update' first); nothing cached either"
    )


def fetch_kernel(package: str) -> Path:
    """Download and unpack ``package`` once; returns the unpacked tree."""
    debs = cache_root() / "debs"
    tree = cache_root() / "kernels" / package
    if (tree / ".complete").exists():
        return tree
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        # apt's sandbox user may not write here; download into a temp dir it can write.
        with tempfile.TemporaryDirectory(prefix="corfs-apt-") as tmp:
            os.chmod(tmp, 0o777)
            _run(["apt-get", "download", "-q", package], cwd=tmp, stdout=subprocess.DEVNULL)
            for deb in Path(tmp).glob("*.deb"):
                shutil.move(str(deb), debs / deb.name)
        found = sorted(debs.glob(f"{package}_*.deb"))
        if not found:
            raise RuntimeError(f"apt-get download {package} produced no .deb")
    if tree.exists():
        shutil.rmtree(tree)
    tree.mkdir(parents=True)
    _run(["dpkg", "-x", str(found[-1]), str(tree)])
    (tree / ".complete").touch()
    return tree


def kernel_version_of(tree: Path) -> str:
    versions = [p.name for p in (tree / "lib" / "modules").iterdir() if p.is_dir()]
    if len(versions) != 1:
        raise RuntimeError(f"expected one module tree in {tree}, found {versions}")
    return versions[0]


def _modinfo_field(ko: Path, field: str) -> list[str]:
    data = ko.read_bytes()
    values = []
    for match in re.finditer(rb"(?:^|\0)" + field.encode() + rb"=([^\0]*)", data):
        values.append(match.group(1).decode())
    return values


def module_load_order(moddir: Path, roots: tuple[str, ...]) -> list[tuple[str, Path]]:
    """Modules to insmod, dependencies first, resolved from each .ko's depends=/softdep=."""
    by_name: dict[str, Path] = {}
    for ko in (moddir / "kernel").rglob("*.ko"):
        by_name[ko.stem.replace("-", "_")] = ko
    order: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = SOFTDEP_ALIASES.get(name, name).replace("-", "_")
        if name in seen:
            return
        seen.add(name)
        if name not in by_name:
            raise RuntimeError(f"module {name} not found under {moddir}")
        ko = by_name[name]
        for soft in _modinfo_field(ko, "softdep"):
            pre = soft.split("post:")[0]
            for dep in pre.replace("pre:", " ").split():
                if dep in SOFTDEP_ALIASES:
                    visit(dep)
        for deps in _modinfo_field(ko, "depends"):
            for dep in filter(None, deps.split(",")):
                visit(dep)
        order.append((name, ko))

    for root in roots:
        visit(root)
    return order


# --------------------------------------------------------------------------- cache key


def build_key(kernel_version: str) -> str:
    h = hashlib.sha256()
    h.update(f"format={BUILD_FORMAT} size={DISK_SIZE_MIB} kernel={kernel_version}\n".encode())
    h.update(Path(__file__).read_bytes())
    for path in sorted(GUEST_DIR.iterdir()):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    h.update(hashlib.sha256(BUSYBOX.read_bytes()).digest())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- initramfs


CpioEntry = tuple[str, int, bytes] | tuple[str, int, bytes, tuple[int, int]]


def _cpio_newc(entries: list[CpioEntry]) -> bytes:
    """A newc cpio archive of (name, mode, data[, (rdev major, minor)]) entries.

    Symlinks carry their target as data. Written by hand so that no root-owned device node
    has to exist on the host to put /dev/console into the archive.
    """
    out = bytearray()
    for ino, entry in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        name, mode, data = entry[:3]
        rdev = entry[3] if len(entry) > 3 else (0, 0)
        name_b = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, *rdev, len(name_b), 0)
        header = "070701" + "".join(f"{v:08X}" for v in fields)
        out += header.encode() + name_b
        out += b"\0" * (-len(out) % 4)
        out += data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def build_initramfs(moddir: Path, dest: Path) -> None:
    dirs = ["bin", "dev", "proc", "sys", "newroot", "etc", "lib", "lib/modules"]
    entries: list[CpioEntry] = [(d, 0o040755, b"") for d in dirs]
    # The kernel opens /dev/console for init's stdio before devtmpfs is mounted.
    entries.append(("dev/console", 0o020600, b"", (5, 1)))
    entries.append(("bin/busybox", 0o100755, BUSYBOX.read_bytes()))
    entries.append(("bin/sh", 0o120777, b"busybox"))
    entries.append(("init", 0o100755, (GUEST_DIR / "initramfs-init").read_bytes()))
    order = module_load_order(moddir, ROOT_MODULES)
    for name, ko in order:
        entries.append((f"lib/modules/{name}.ko", 0o100644, ko.read_bytes()))
    load_list = "".join(f"{name}\n" for name, _ in order).encode()
    entries.append(("etc/modules.load", 0o100644, load_list))
    dest.write_bytes(gzip.compress(_cpio_newc(entries), compresslevel=6, mtime=0))
    log.info("initramfs: %s modules: %s", dest, " ".join(n for n, _ in order))


# --------------------------------------------------------------------------- root filesystem


def _write_data_tree(data: Path) -> None:
    """A few MiB of varied, deterministic files: random, text, zeros, sparse, nested dirs."""
    rng = random.Random(20240607)
    words = [
        "chunk", "cache", "fuse", "stream", "image", "base", "qemu", "sector", "fill", "trio",
    ]
    for i in range(120):
        sub = data / f"d{i % 7}" / f"e{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        kind = i % 4
        size = rng.choice([0, 1, 511, 4096, 4097, 65536, 100_000, 131_072]) + rng.randrange(
            0, 40_000
        )
        path = sub / f"f{i:03d}.{['bin', 'txt', 'zero', 'mix'][kind]}"
        if kind == 0:
            path.write_bytes(rng.randbytes(size))
        elif kind == 1:
            text = " ".join(rng.choice(words) for _ in range(size // 6 + 1))
            path.write_text(text[:size])
        elif kind == 2:
            path.write_bytes(bytes(size))
        else:
            path.write_bytes(bytes(size // 2) + rng.randbytes(size - size // 2))
    # A couple of larger files spanning many chunks.
    (data / "big-random.bin").write_bytes(rng.randbytes(3 * 1024 * 1024 + 12345))
    with open(data / "big-sparse.bin", "wb") as f:
        f.write(rng.randbytes(4096))
        f.seek(2 * 1024 * 1024)
        f.write(rng.randbytes(4096))


def tree_checksum(data: Path) -> str:
    """What `find . -type f | sort | xargs sha256sum | sha256sum` prints in the guest."""
    rels = sorted(
        ("./" + p.relative_to(data).as_posix()).encode() for p in data.rglob("*") if p.is_file()
    )
    listing = b"".join(
        hashlib.sha256((data / rel[2:].decode()).read_bytes()).hexdigest().encode()
        + b"  " + rel + b"\n"
        for rel in rels
    )
    return hashlib.sha256(listing).hexdigest()


def build_rootfs(root: Path) -> str:
    for d in ["bin", "sbin", "dev", "proc", "sys", "tmp", "etc", "var/corfs", "data", "root"]:
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    applets = subprocess.run(
        [str(BUSYBOX), "--list-full"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in applets:
        link = root / applet
        if link.name == "busybox" or link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")
    init = root / "sbin" / "init"
    if init.is_symlink() or init.exists():
        init.unlink()
    shutil.copy2(GUEST_DIR / "workload", init)
    init.chmod(0o755)
    (root / "etc" / "hostname").write_text("corfs-test\n")
    (root / "var" / "corfs" / "boot-count").write_text("0\n")
    _write_data_tree(root / "data")
    return tree_checksum(root / "data")


def make_disk(root: Path, disk: Path) -> None:
    if disk.exists():
        disk.unlink()
    _run(
        [
            "mkfs.ext4", "-q", "-F", "-L", "corfs-test", "-d", str(root),
            "-E", "lazy_itable_init=0,lazy_journal_init=0",
            str(disk), f"{DISK_SIZE_MIB}M",
        ],
        env={**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"},
    )


def extract_vmlinux(bzimage: Path, out: Path) -> None:
    """The ELF kernel inside a bzImage (its payload: one compressed stream after the setup
    code, whose magic bytes may also occur by chance before it). xz, zstd and gzip are what
    Debian has used; QEMU boots the ELF only through its PVH note (a Xen ELF note)."""
    import zstandard

    data = bzimage.read_bytes()
    for magic, decompress in (
        (b"\xfd7zXZ\x00", lambda b: lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(b)),
        (b"\x28\xb5\x2f\xfd", _zstd_decompress),
        (b"\x1f\x8b\x08", lambda b: zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(b)),
    ):
        at = data.find(magic)
        while at >= 0:
            try:
                elf = decompress(data[at:])
            except (lzma.LZMAError, zlib.error, zstandard.ZstdError):
                elf = b""
            if elf[:4] == b"\x7fELF":
                if b"Xen\x00" not in elf:
                    raise RuntimeError(f"{bzimage}: the kernel has no Xen ELF note (no PVH entry)")
                out.write_bytes(elf)
                return
            at = data.find(magic, at + 1)
    raise RuntimeError(f"{bzimage}: no compressed ELF kernel found in it")


def _zstd_decompress(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


# --------------------------------------------------------------------------- entry points


def build_test_image(out: Path | None = None) -> VmArtifacts:
    """Build (or reuse) the test VM artifacts; ``out`` defaults to CACHE/vm/<key>. One build
    at a time on the machine (pytest-xdist workers ask together): the second finds the first's."""
    cache_root().mkdir(parents=True, exist_ok=True)
    with open(cache_root() / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_test_image(out)


def _build_test_image(out: Path | None) -> VmArtifacts:
    package = kernel_package_name()
    ktree = fetch_kernel(package)
    kver = kernel_version_of(ktree)
    key = build_key(kver)
    dest = Path(out) if out is not None else cache_root() / "vm" / key
    manifest_path = dest / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("key") == key:
            return _artifacts(dest, manifest)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="corfs-vm-build-", dir=dest) as tmp:
        tmp_path = Path(tmp)
        extract_vmlinux(ktree / "boot" / f"vmlinuz-{kver}", tmp_path / "vmlinux")
        build_initramfs(ktree / "lib" / "modules" / kver, tmp_path / "initrd.img")
        tree_sum = build_rootfs(tmp_path / "root")
        make_disk(tmp_path / "root", tmp_path / "disk.raw")
        for name in ("vmlinux", "initrd.img", "disk.raw"):
            os.replace(tmp_path / name, dest / name)
    manifest = {"key": key, "kernel_version": kver, "package": package, "tree_sum": tree_sum}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return _artifacts(dest, manifest)


def _artifacts(dest: Path, manifest: dict) -> VmArtifacts:
    return VmArtifacts(
        disk=dest / "disk.raw",
        kernel=dest / "vmlinux",
        initrd=dest / "initrd.img",
        kernel_version=manifest["kernel_version"],
        tree_sum=manifest["tree_sum"],
    )


def copy_disk(src: Path, dst: Path) -> Path:
    """Copy a (sparse) disk image, keeping holes; reflink where the filesystem can."""
    _run(["cp", "--reflink=auto", "--sparse=always", str(src), str(dst)])
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.vm.build_image", description=__doc__)
    parser.add_argument("--out", type=Path, help="output dir (default: CACHE/vm/<key>)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO)
    artifacts = build_test_image(args.out)
    json.dump(
        {k: str(v) for k, v in dataclasses.asdict(artifacts).items()}, sys.stdout, indent=2
    )
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
