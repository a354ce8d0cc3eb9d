"""The numbers the bridge may dial: the ranges a deployment serves (MB_ALLOWED_DESTINATIONS).

Every courier call to a client, and back, is paid by the deployment: a "client" number in a
premium-rate or international-network range would make each of those calls pay whoever
holds it. So a participant's number (at open and at reassignment) and the support number
(at start) must be in the listed ranges, and the routing decision checks the number it is
about to dial once more (a list narrowed since the session opened).

The setting is a comma-separated list of entries:

* a kind of number of a region, by the numbering plan (libphonenumber's metadata):
  `RU:mobile`, `RU:geographic` (fixed-line numbers of an area code), `RU:toll_free`
  (8-800 and 8-804: free for the caller, so a support line may be one); a kind without a
  region (`mobile`) is of MB_DEFAULT_REGION;
* an E.164 prefix: `+7916`, `+4420`.

Default `mobile,geographic`. A region's kinds leave out the ranges other networks run inside
its numbering plan (+7 840 and +7 940: Abkhazia's, billed as international); a prefix entry
naming one lets it in. Whatever the list says, premium-rate, shared-cost and personal
numbers, and the international networks' own country codes (satellite and global services
such as +870, +881, +882, +883, +979), are never allowed: no order needs one, and each is a
known revenue-share fraud target.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import phonenumbers
from phonenumbers import PhoneNumberType

from bridge.errors import DestinationNotAllowed

DEFAULT = "mobile,geographic"
KINDS: dict[str, frozenset[int]] = {
    "mobile": frozenset({PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE_OR_MOBILE}),
    "geographic": frozenset({PhoneNumberType.FIXED_LINE, PhoneNumberType.FIXED_LINE_OR_MOBILE}),
    "toll_free": frozenset({PhoneNumberType.TOLL_FREE}),
}
NEVER_TYPES = frozenset({PhoneNumberType.PREMIUM_RATE, PhoneNumberType.SHARED_COST, PhoneNumberType.PERSONAL_NUMBER})
# Named here as well as found by type, so that an older or newer numbering plan cannot let one
# through: Russia's premium-rate 8-809, and the country codes of no country.
NEVER_PREFIXES = ("+7809", "+800", "+808", "+870", "+878", "+881", "+882", "+883", "+888", "+979")
# Ranges the numbering plan counts as a region's own kinds though other networks run them,
# billed as international (and so a revenue-share target): a region's kinds leave them out;
# only a prefix entry naming them lets them in. +7 840 and +7 940: Abkhazia's networks.
FOREIGN_IN_PLAN: dict[str, tuple[str, ...]] = {"RU": ("+7840", "+7940")}
_PREFIX = re.compile(r"\+[1-9][0-9]{0,14}")
_KIND = re.compile(r"(?:([A-Z]{2}):)?([a-z_]+)")


def never(number: str) -> bool:
    """A premium-rate, shared-cost or personal number, or one of an international network:
    refused whatever MB_ALLOWED_DESTINATIONS lists."""
    return _never(number)[0]


def _never(number: str) -> tuple[bool, phonenumbers.PhoneNumber | None, int | None]:
    """never(number), and the number parsed and its type when it could be (parsed once)."""
    if number.startswith(NEVER_PREFIXES):
        return True, None, None
    try:
        parsed = phonenumbers.parse(number)
    except phonenumbers.NumberParseException:
        return True, None, None
    kind = phonenumbers.number_type(parsed)
    refused = (phonenumbers.region_code_for_country_code(parsed.country_code or 0) == "001"
               or kind in NEVER_TYPES)
    return refused, parsed, kind


VERDICTS = 10_000  # Destinations.allows: verdicts kept (a digest and a bool each)


@dataclass(frozen=True)
class Destinations:
    """The allowed ranges: (region, kind) pairs and E.164 prefixes."""

    kinds: frozenset[tuple[str, str]] = frozenset({("RU", "mobile"), ("RU", "geographic")})
    prefixes: tuple[str, ...] = ()
    # Verdicts already reached (the numbering plan's parse costs ~80 us, on every call's way to
    # the other phone): by a digest of the number, not the number; the oldest go past VERDICTS.
    _verdicts: dict[bytes, bool] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def parse(cls, raw: str, default_region: str = "RU") -> "Destinations":
        """MB_ALLOWED_DESTINATIONS; ValueError naming the first bad entry."""
        kinds: set[tuple[str, str]] = set()
        prefixes: list[str] = []
        for entry in (e.strip() for e in (raw or DEFAULT).split(",")):
            if _PREFIX.fullmatch(entry):
                if entry.startswith(NEVER_PREFIXES):  # (a wider prefix, like +8, is fine: never() still holds)
                    raise ValueError(f"lists {entry}, a premium-rate or international-network range: those are "
                                     "never allowed")
                prefixes.append(entry)
                continue
            match = _KIND.fullmatch(entry)
            if not entry or match is None or match.group(2) not in KINDS:
                raise ValueError(f"has {entry[:40]!r}: each entry must be an E.164 prefix (+7916) or a kind of "
                                 f"number ({', '.join(KINDS)}), optionally of a region (RU:mobile)")
            region = match.group(1) or default_region
            if region not in phonenumbers.SUPPORTED_REGIONS:
                raise ValueError(f"has {entry}: {region} is not a region of the numbering plan")
            kinds.add((region, match.group(2)))
        return cls(frozenset(kinds), tuple(prefixes))

    def allows(self, number: str) -> bool:
        """Whether the bridge may dial `number` (E.164, as normalize() gives it)."""
        key = hashlib.blake2b(number.encode(), digest_size=16).digest()
        verdict = self._verdicts.get(key)
        if verdict is None:
            verdict = self._allows(number)
            if len(self._verdicts) >= VERDICTS:
                del self._verdicts[next(iter(self._verdicts))]
            self._verdicts[key] = verdict
        return verdict

    def _allows(self, number: str) -> bool:
        refused, parsed, kind = _never(number)
        if refused or parsed is None:
            return False
        if number.startswith(self.prefixes):
            return True
        region = phonenumbers.region_code_for_number(parsed)
        if number.startswith(FOREIGN_IN_PLAN.get(region or "", ())):
            return False
        return any(region == r and kind in KINDS[k] for r, k in self.kinds)

    def check(self, numbers: dict[str, str]) -> None:
        """DestinationNotAllowed for the first of these numbers (by request field) that is not allowed."""
        for name, number in numbers.items():
            if not self.allows(number):
                why = ("a premium-rate or international-network number" if never(number)
                       else "outside the number ranges this bridge serves (MB_ALLOWED_DESTINATIONS)")
                raise DestinationNotAllowed(f"{name} is {why}", field=name)
