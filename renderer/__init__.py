"""How images are made: line stage, pixel stage on tiles, Ray pool, store, pyramid, exports."""

from .errors import RendererError

__all__ = ["RendererError"]
