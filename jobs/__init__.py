"""What to render: job spec (TOML/CLI), tile plan, the job driver and the CLI."""


class JobSpecError(Exception):
    """A job that cannot run as specified (message names what is wrong and how to fix it)."""


__all__ = ["JobSpecError"]
