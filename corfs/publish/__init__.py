"""`corfs publish IMAGE... DEST`: raw images written in published form (format: manifest.py).

publisher.py cuts, hashes, compresses and writes in the order that keeps readers safe (its
docstring holds the invariants); destination.py is where it writes: a directory or an S3
prefix, behind one `Destination` protocol.
"""

from .destination import Destination, DirDestination, S3Destination, open_destination
from .publisher import (
    PublishSummary,
    add_publish_arguments,
    format_summary,
    publish_from_args,
    publish_to,
    run_publish,
)

__all__ = [
    "Destination",
    "DirDestination",
    "PublishSummary",
    "S3Destination",
    "add_publish_arguments",
    "format_summary",
    "open_destination",
    "publish_from_args",
    "publish_to",
    "run_publish",
]
