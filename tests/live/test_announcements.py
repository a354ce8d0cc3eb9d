"""Announcements in the pool number's language: the caller of a Russian number hears the
Russian prompt, the caller of an English one the English prompt (compared by loudness
envelope with the prompt files of Debian's Asterisk sound packages)."""

from __future__ import annotations

import math

from bridge.devstack import asterisk
from bridge.devstack.audio import samples
from tests.live.conftest import announced

PROMPT_DIRS = {"en": "en_US_f_Allison", "ru": "ru_RU_f_IvrvoiceRU"}


def envelope(values: list[int], rate: int) -> list[float]:
    n = rate // 50  # 20 ms
    return [math.sqrt(sum(v * v for v in values[i : i + n]) / n) for i in range(0, len(values) - n + 1, n)]


def likeness(heard: list[float], prompt: list[float]) -> float:
    """The best normalised correlation of two envelopes, the prompt starting up to 0.6 s late."""
    best = -1.0
    for lag in range(0, 31):
        a, b = heard[lag : lag + len(prompt)], prompt[: len(heard) - lag]
        m = min(len(a), len(b))
        if m < 25:
            break
        a, b = a[:m], b[:m]
        ma, mb = sum(a) / m, sum(b) / m
        cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
        norm = math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b)) or 1.0
        best = max(best, cov / norm)
    return best


def prompt_envelope(stack, language: str, name: str) -> list[float]:
    """The loudness envelope of a prompt (`name` may be in a subdirectory, e.g. followme/options)."""
    file = f"prompt-{language}-{name.replace('/', '-')}.wav"
    out = f"{stack.ast_dir('carrier')}/spool/{file}"
    result = asterisk.rx(stack, "carrier", f"file convert /usr/share/asterisk/sounds/{PROMPT_DIRS[language]}/{name}.gsm {out}")
    assert "Converted" in result.stdout, result.stdout + result.stderr
    values, rate = samples(asterisk.host_path(stack, "carrier", "spool", file))
    return envelope(values, rate)


async def test_callers_hear_the_pool_numbers_language(stack, carrier, api, real_number, new_pool_number, fresh_region):
    russian, english = new_pool_number(), new_pool_number()
    status, _ = await api.request("POST", "/v1/pool-numbers", json={"numbers": [
        {"number": russian, "region": fresh_region, "language": "ru"},
        {"number": english, "region": fresh_region, "language": "en"},
    ]})
    assert status == 201
    prompts = {lang: prompt_envelope(stack, lang, "ss-noservice") for lang in PROMPT_DIRS}
    for number, language in ((russian, "ru"), (english, "en")):
        leg = await announced(carrier, real_number(), number)  # a stranger: "not in service"
        values, rate = samples(carrier.recording_path(leg))
        heard = envelope(values, rate)
        scores = {lang: likeness(heard, prompt) for lang, prompt in prompts.items()}
        other = "en" if language == "ru" else "ru"
        assert scores[language] > 0.5, scores
        assert scores[language] > scores[other] + 0.3, scores
