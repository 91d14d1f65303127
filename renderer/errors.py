"""The renderer package's exception types: RendererError and its IncompleteStoreError, BadInputError."""

from creps.errors import UserError


class RendererError(UserError):
    """A render, store or export problem a user can act on (message says how).

    Exit code 1: it is raised once work may have started; what was written is
    kept and a re-run continues from it.
    """

    exit_code = 1


class IncompleteStoreError(RendererError):
    """The store's render is not finished (tiles are missing), and the caller asked for a whole result.

    Exit code 2: nothing was done; finish the render, or ask for a partial
    result (``render.py assemble --partial``).
    """

    exit_code = 2


class BadInputError(RendererError):
    """What a renderer call was given cannot be used (no store there, a target that cannot be
    written, an endpoint that does not answer), found before anything was done: exit code 2."""

    exit_code = 2
