"""Published images (see corfs/publish.py): placeholder until the published adapter lands."""

from __future__ import annotations

from . import BaseStore


async def with_published_images(store: BaseStore) -> BaseStore:
    return store
