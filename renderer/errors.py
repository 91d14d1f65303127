"""The renderer package's one exception type."""


class RendererError(Exception):
    """A render, store or export problem a user can act on (message says how)."""
