"""`make bench`: run the benchmarks one after the other (each prints its own ratios).

    python -m bench.run [NAME...]     names: reads stream chunk_size published boot peers tls"""

from __future__ import annotations

import importlib
import sys

ALL = ["reads", "stream", "chunk_size", "published", "boot", "peers", "tls"]


def main() -> None:
    names = sys.argv[1:] or ALL
    for name in names:
        print(f"== bench.{name}", flush=True)
        module = importlib.import_module(f"bench.{name}")
        sys.argv = [f"bench.{name}"]
        module.main()


if __name__ == "__main__":
    main()
