"""The one check of integer arguments, so that every bad count gets the same clear error."""

from __future__ import annotations


def check_int(name: str, value, least: int = 1, most: int | None = None, *, optional: bool = False):
    """Return ``value`` if it is an int (not a bool) from ``least`` to ``most`` (``None`` too if ``optional``);
    otherwise raise a ValueError that names the argument, says what is accepted and shows what was given."""
    if value is None and optional:
        return value
    if not isinstance(value, bool) and isinstance(value, int) and value >= least and (most is None or value <= most):
        return value
    accepted = f"an int from {least} to {most}" if most is not None else f"an int >= {least}"
    raise ValueError(f"{name} must be {accepted}" + (" or None" if optional else "") + f", got {value!r}")
