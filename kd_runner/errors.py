"""User-facing errors: one line, non-zero exit, no traceback."""

import math


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
    """``kind(value)`` for a config value, or a one-line UserError naming ``name`` and the bad value.

    NaN and infinities are refused: they pass every range check (``nan > 0`` is simply False) and
    would only surface epochs later as a nan loss.
    """
    if isinstance(value, bool) or value is None:
        raise UserError(f"{name}={value!r} is invalid; it must be a number")
    try:
        finite = math.isfinite(float(value))
    except (TypeError, ValueError, OverflowError):
        finite = True  # not a number at all (reported below), or an integer too large for a float
    if not finite:
        raise UserError(f"{name}={value!r} is invalid; it must be a finite number")
    try:
        out = kind(value)
    except (TypeError, ValueError, OverflowError):
        what = "an integer" if kind is int else "a number"
        raise UserError(f"{name}={value!r} is invalid; it must be {what}") from None
    if kind is int and isinstance(value, float) and value != out:
        raise UserError(f"{name}={value!r} is invalid; it must be an integer")
    return out
