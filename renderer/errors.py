"""The renderer package's one exception type."""

from creps.errors import UserError


class RendererError(UserError):
    """A render, store or export problem a user can act on (message says how).

    Exit code 1: it is raised once work may have started; what was written is
    kept and a re-run continues from it.
    """

    exit_code = 1
