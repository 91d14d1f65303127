"""The viewer package's one exception type."""


class ViewerError(Exception):
    """A viewer problem a user can act on (bad source, bad bind address, bad tile request)."""
