"""The checks of repeated kinds of argument, so that every bad value of a kind gets the same clear error."""

from __future__ import annotations

TOKENS = ("last", "all")  # the tokens an angular distance is averaged over: each sequence's last, or all


def check_int(name: str, value, least: int = 1, most: int | None = None, *, optional: bool = False):
    """Return ``value`` if it is an int (not a bool) from ``least`` to ``most`` (``None`` too if ``optional``);
    otherwise raise a ValueError that names the argument, says what is accepted and shows what was given."""
    if value is None and optional:
        return value
    if not isinstance(value, bool) and isinstance(value, int) and value >= least and (most is None or value <= most):
        return value
    accepted = f"an int from {least} to {most}" if most is not None else f"an int >= {least}"
    raise ValueError(f"{name} must be {accepted}" + (" or None" if optional else "") + f", got {value!r}")


def check_fraction(name: str, value, what: str = "a fraction") -> float:
    """Return ``value`` if it is a number strictly between 0 and 1; otherwise raise a ValueError that names
    the argument (``what`` it is a fraction of) and shows what was given."""
    if not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value < 1:
        return value
    raise ValueError(f"{name} must be {what} in (0, 1), got {value!r}")


def check_choice(name: str, value, choices: tuple):
    """Return ``value`` if it is one of ``choices``; otherwise raise a ValueError listing them."""
    if isinstance(value, (str, int, float, bool, type(None))) and value in choices:
        return value
    raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
