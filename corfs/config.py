"""The frozen configuration of one mount, built by cli.py and read by everything else."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import BaseOptions

DEFAULT_CHUNK_SIZE = 1 << 20
DEFAULT_WRITE_BEHIND = 256 << 20  # write_behind.py: fetched bytes waiting to be stored
DEFAULT_RANDOM_RANGE = 4 << 10  # ranges.py: bytes fetched around a small random miss


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
    base: BaseOptions = field(default_factory=BaseOptions)
    stream: StreamConfig = field(default_factory=StreamConfig)
