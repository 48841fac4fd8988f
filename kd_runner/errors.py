"""User-facing errors: one line, non-zero exit, no traceback."""


class UserError(Exception):
    """A mistake in the user's config, data or files.

    The entry point prints ``str(err)`` as a single line and exits with code 2.
    Anything else escaping is a bug and keeps its traceback.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


def choices(values) -> str:
    """Format valid choices for an error message."""
    return ", ".join(sorted(str(v) for v in values))
