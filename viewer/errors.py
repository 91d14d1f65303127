"""The viewer package's one exception type."""

from creps.errors import UserError


class ViewerError(UserError):
    """A viewer problem a user can act on (bad source, bad bind address, bad tile request)."""
