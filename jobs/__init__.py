"""What to render: job spec (TOML/CLI), tile plan, the job driver and the CLI."""

from creps.errors import UserError


class JobSpecError(UserError):
    """A job that cannot run as specified (message names what is wrong and how to fix it).

    Exit code 2: raised before anything is rendered or written.
    """


__all__ = ["JobSpecError"]
