"""Boot traces: the order in which chunks were first read (say, one VM boot), recorded with
--record-trace and replayed by the stream worker of a later mount so those chunks come first.

File format (JSON): {"version": 1, "images": {NAME: {"chunk_size": N, "chunks": [i, ...]}}}.
Chunk indexes are converted when the replaying mount uses another chunk size."""

from __future__ import annotations

import json
import logging

from .errors import UsageError

log = logging.getLogger(__name__)


class TraceRecorder:
    """Collects first reads per image; cheap enough to sit on the read path when enabled."""

    def __init__(self) -> None:
        self._orders: dict[str, tuple[int, list[int], set[int]]] = {}

    def hook_for(self, name: str, chunk_size: int):  # a closure for Image.first_reads
        order: list[int] = []
        seen: set[int] = set()
        self._orders[name] = (chunk_size, order, seen)

        def note(chunks: range) -> None:
            for index in chunks:
                if index not in seen:
                    seen.add(index)
                    order.append(index)

        return note

    def to_json(self) -> str:
        images = {
            name: {"chunk_size": chunk_size, "chunks": order}
            for name, (chunk_size, order, _) in self._orders.items()
        }
        return json.dumps({"version": 1, "images": images})


def load_trace(text: str, source: str) -> dict[str, tuple[int, list[int]]]:
    """{image: (chunk_size, chunk order)} from a trace file's text; UsageError if malformed."""
    try:
        doc = json.loads(text)
        if doc.get("version") != 1:
            raise ValueError(f"unknown version {doc.get('version')!r}")
        traces = {
            str(name): (int(entry["chunk_size"]), [int(i) for i in entry["chunks"]])
            for name, entry in doc["images"].items()
        }
        for name, (chunk_size, _) in traces.items():
            if chunk_size <= 0:
                raise ValueError(f"chunk size {chunk_size} of {name}")
        return traces
    # RecursionError: what json.loads raises for nesting a few thousand deep ('[[[[...').
    except (ValueError, RecursionError, KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"trace {source} is not a corfs trace: {exc}") from None


def convert_order(
    order: list[int], from_chunk_size: int, to_chunk_size: int, count: int
) -> list[int]:
    """The same byte order expressed in chunks of another size, duplicates dropped."""
    seen: set[int] = set()
    result = []
    for index in order:
        # Every chunk of the new size that holds bytes of the traced chunk, not just the first.
        first = index * from_chunk_size // to_chunk_size
        last = ((index + 1) * from_chunk_size - 1) // to_chunk_size
        for converted in range(max(0, first), min(last + 1, count)):
            if converted not in seen:
                seen.add(converted)
                result.append(converted)
    return result
