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


def number(value, name: str, kind: type = float):
    """``kind(value)`` for a config value, or a one-line UserError naming ``name`` and the bad value."""
    if isinstance(value, bool) or value is None:
        raise UserError(f"{name}={value!r} is invalid; it must be a number")
    try:
        out = kind(value)
    except (TypeError, ValueError):
        what = "an integer" if kind is int else "a number"
        raise UserError(f"{name}={value!r} is invalid; it must be {what}") from None
    if kind is int and isinstance(value, float) and value != out:
        raise UserError(f"{name}={value!r} is invalid; it must be an integer")
    return out
