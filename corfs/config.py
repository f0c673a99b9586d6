"""The frozen configuration of one mount, built by cli.py and read by everything else."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

from .base import BaseOptions

DEFAULT_CHUNK_SIZE = 1 << 20
DEFAULT_WRITE_BEHIND = 256 << 20  # write_behind.py: fetched bytes waiting to be stored
DEFAULT_RANDOM_RANGE = 4 << 10  # ranges.py: bytes fetched around a small random miss
DEFAULT_READ_MEMORY = 128 << 20  # read_memory.py: kept for client reads, all images together


@dataclass(frozen=True)
class StreamConfig:
    enabled: bool = True
    start_paused: bool = False
    bandwidth: int = 0  # bytes per second, 0 = unlimited
    run_chunks: int = 4  # adjacent chunks fetched by one base request
    workers: int = 2
    trace_file: str | None = None
    record_trace: bool = False


@dataclass(frozen=True)
class MountConfig:
    base_url: str
    cache_dir: str
    mountpoint: str
    chunk_size: int = DEFAULT_CHUNK_SIZE
    read_only: bool = False
    reset_stale: bool = False
    forget_detached: tuple[str, ...] = ()  # images handed over to QEMU to serve from BASE again
    allow_other: bool = False
    owner: tuple[int, int] | None = None  # uid, gid of the exposed files
    mode: int = 0o644
    commit_interval: float = 1.0
    metrics: tuple[str, int] | None = None  # (host, port) to serve Prometheus metrics on
    write_behind: int = DEFAULT_WRITE_BEHIND  # bytes of fetched chunks waiting to be stored
    random_range: int = DEFAULT_RANDOM_RANGE  # bytes fetched around a small random miss
    read_memory: int = DEFAULT_READ_MEMORY  # kept for client reads, all images together
    base: BaseOptions = field(default_factory=BaseOptions)
    stream: StreamConfig = field(default_factory=StreamConfig)

    def with_absolute_paths(self) -> MountConfig:
        """This config with every local path absolute (BASE when a directory, CACHE, MNT,
        --trace, --ca-file), resolved against the current directory: the daemon leaves it
        (chdir("/")) and a base reopened later must still find its files."""

        def absolute(path: str | None) -> str | None:
            return os.path.abspath(path) if path else path

        base_url = self.base_url if "://" in self.base_url else os.path.abspath(self.base_url)
        return replace(
            self,
            base_url=base_url,
            cache_dir=os.path.abspath(self.cache_dir),
            mountpoint=os.path.abspath(self.mountpoint),
            base=replace(self.base, ca_file=absolute(self.base.ca_file)),
            stream=replace(self.stream, trace_file=absolute(self.stream.trace_file)),
        )
