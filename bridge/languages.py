"""The languages callers can be told things in, defined once.

Each is a language code (what a pool number's `language` holds, and MB_DEFAULT_LANGUAGE)
and the directory of Asterisk's sounds that Debian's sound packages install for it. The
database learns them from here at every start (the `languages` table, which
`pool_numbers.language` references); the API's schema, the import checks and the
configuration take them from here too.
"""

from __future__ import annotations

# language code -> Asterisk sounds directory
SOUNDS: dict[str, str] = {
    "en": "en",
    "ru": "ru_RU_f_IvrvoiceRU",
}
LANGUAGES: tuple[str, ...] = tuple(SOUNDS)


def sounds_of(language: str) -> str:
    """The sounds directory of a language (an unknown one is passed through as is)."""
    return SOUNDS.get(language, language)
