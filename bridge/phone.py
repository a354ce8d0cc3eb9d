"""Phone numbers: one canonical form (E.164 with '+') and a masked form for logs and answers."""

from __future__ import annotations

import re

import phonenumbers


class InvalidNumber(ValueError):
    """The text is not a phone number we can route."""


_SEPARATORS = re.compile(r"[\s\-().]")


# +7 and ten digits, the form the order system sends and the one stored: every such number
# is possible in the +7 plan (whose one rule is the length) and is its own E.164, so it needs
# no parsing; phonenumbers' parse cost more than the rest of a session open in Python (issue
# 14). tests/unit/test_phone_numbers.py checks that both ways agree.
_RU_E164 = re.compile(r"\+7[0-9]{10}")


def normalize(raw: str, default_region: str = "RU") -> str:
    """E.164 with '+'. Carriers deliver Russian numbers as +79161234567, 79161234567 or
    89161234567: all three are the same number."""
    if raw and _RU_E164.fullmatch(raw):
        return raw
    return _parsed(raw, default_region)


def _parsed(raw: str, default_region: str) -> str:
    text = _SEPARATORS.sub("", raw or "")
    if not text:
        raise InvalidNumber("empty number")
    if text.startswith("00"):
        text = "+" + text[2:]
    if not re.fullmatch(r"\+?\d{5,16}", text):
        raise InvalidNumber("not a phone number")
    if not text.startswith("+") and default_region == "RU" and len(text) == 11 and text[0] == "7":
        text = "+" + text
    try:
        parsed = phonenumbers.parse(text, None if text.startswith("+") else default_region)
    except phonenumbers.NumberParseException as exc:
        raise InvalidNumber(str(exc)) from exc
    # (Possible "local only" is not enough: +74034835 is a city's 7 digits without the area code.)
    if phonenumbers.is_possible_number_with_reason(parsed) != phonenumbers.ValidationResult.IS_POSSIBLE:
        raise InvalidNumber("not a possible number")
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


# Digits of a real number that a masked form keeps: the last two. Eight of eleven (the old
# +7916***4567) left 1,000 candidates, found in minutes by calling them; two leave a
# subscriber number among 10^8 (issue 15).
MASK_KEEPS = 2


def mask(number: str) -> str:
    """+79161234567 -> +***67: enough for a person to tell two numbers of one order apart,
    useless to anyone looking for the number. Anything that is not a digit is dropped (but a
    leading '+'); a text with fewer than three digits keeps none."""
    digits = re.sub(r"\D", "", number)
    plus = "+" if number.startswith("+") else ""
    return f"{plus}***{digits[-MASK_KEEPS:] if len(digits) > MASK_KEEPS else ''}"
