"""Can the base supply a cached image's chunks again? Asked before a chunk that failed a scrub
is forgotten (`corfs verify`): forgetting a chunk whose base is gone or changed would destroy
the only copy of those bytes, so it is forgotten only when the base lists the image now with
the identity and size the cache recorded. Asked at forget time, through `list_images` (a base
whose file was deleted still reads through a descriptor opened before)."""

from __future__ import annotations

from .base import BaseStore
from .errors import BaseError


async def why_base_cannot_supply(
    base: BaseStore | None, name: str, identity: str, size: int
) -> str | None:
    """None if `base` lists `name` now with this identity and size, else why not."""
    if base is None:
        return f"{name} is served without its base"
    try:
        listed = {image.name: image for image in await base.list_images()}
    except BaseError as exc:
        return f"the base cannot be listed: {exc}"
    current = listed.get(name)
    if current is None:
        return f"{name} is not in the base {base.description} any more"
    if current.identity != identity or current.size != size:
        return f"{name} changed in the base {base.description} since it was cached"
    return None
