from __future__ import annotations

import random

import pytest

from bridge.phone import InvalidNumber, _parsed, mask, normalize


@pytest.mark.parametrize("raw", ["+79161234567", "79161234567", "89161234567", "8 (916) 123-45-67", "+7 916 123 45 67"])
def test_russian_forms_are_one_number(raw):
    assert normalize(raw) == "+79161234567"


def test_moscow_landline_and_foreign_numbers():
    assert normalize("84951234567") == "+74951234567"
    assert normalize("+442071234567") == "+442071234567"
    assert normalize("00442071234567") == "+442071234567"


@pytest.mark.parametrize("raw", ["", "abc", "+7", "12", "+7916123456789012", "79161234567; DROP", "+79161234567@evil",
                                 # a city's digits without its area code: "possible" only locally
                                 "-4034835", "+74034835", "4034835"])
def test_garbage_is_refused(raw):
    with pytest.raises(InvalidNumber):
        normalize(raw)


def test_mask_keeps_only_what_a_person_recognises():
    assert mask("+79161234567") == "+***67"
    assert mask("89161234567") == "***67"
    assert "916" not in mask("+79161234567") and "45" not in mask("+79161234567")
    assert mask("anonymous") == "***" and mask("7") == "***", "fewer than three digits keep none"
    assert mask("+7916***4567") == "+***67", "an older masked form is masked again"
    assert mask("12345") == "***45"


def test_numbers_in_the_stored_form_are_taken_as_they_are_and_that_is_what_parsing_gives():
    """normalize takes +7 and ten digits without parsing them: phonenumbers says the same of
    each (possible, and its own E.164), whatever the digits."""
    draw = random.Random(14)
    numbers = [f"+7{d}{n:09d}" for d in range(10) for n in (0, 1, 999999999)]
    numbers += [f"+7{draw.randrange(10**10):010d}" for _ in range(5000)]
    for number in numbers:
        assert normalize(number) == _parsed(number, "RU") == number
