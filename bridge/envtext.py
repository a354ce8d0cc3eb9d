"""Parsers of settings written as text (the MB_ environment variables, and the admin tool's
options for the same values): text -> value, or ValueError saying what is wrong."""

from __future__ import annotations

from collections.abc import Callable


def whole(low: int, high: int, *, zero_is_none: bool = False) -> Callable[[str], int | None]:
    """A whole number from `low` to `high` (with zero_is_none, 0 reads as None: "none")."""

    def parse(raw: str) -> int | None:
        # (ASCII digits only: int() would also take "+8091", "8_091" or other scripts' digits)
        text = raw.strip()
        if not text.isascii() or not text.isdigit():
            raise ValueError("must be a whole number")
        value = int(text)
        if not low <= value <= high:
            raise ValueError(f"must be from {low} to {high}")
        return None if zero_is_none and value == 0 else value

    return parse


def yes_no(raw: str) -> bool:
    value = raw.strip().lower()
    if value not in ("yes", "no"):
        raise ValueError("must be yes or no")
    return value == "yes"
