from __future__ import annotations

import pytest

from bridge.phone import InvalidNumber, mask, normalize


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
