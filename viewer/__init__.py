"""Browser viewer: an OpenSeadragon page served on 127.0.0.1, tiles from a DZI or straight from the store."""

from .errors import ViewerError

__all__ = ["ViewerError"]
