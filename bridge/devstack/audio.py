"""What a recording holds: its loudness and how much of it is one tone (Goertzel)."""

from __future__ import annotations

import array
import math
import wave
from pathlib import Path


def samples(path: Path) -> tuple[list[int], int]:
    """The 16-bit samples of a WAV file and its sample rate."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: expected 16-bit PCM, got {8 * w.getsampwidth()}-bit")
        data = array.array("h", w.readframes(w.getnframes()))
        return list(data), w.getframerate()


def rms(values: list[int]) -> float:
    return math.sqrt(sum(v * v for v in values) / len(values)) if values else 0.0


def tone_share(values: list[int], rate: int, freq: float) -> float:
    """Share of the signal's energy at `freq` (0..1), over blocks of 20 ms."""
    n = rate // 50
    coeff = 2 * math.cos(2 * math.pi * freq / rate)
    at_freq = total = 0.0
    for start in range(0, len(values) - n + 1, n):
        block = values[start : start + n]
        s1 = s2 = 0.0
        for v in block:
            s0 = v + coeff * s1 - s2
            s2, s1 = s1, s0
        power = s1 * s1 + s2 * s2 - coeff * s1 * s2  # |X(f)|^2
        at_freq += 2 * power / n
        total += sum(v * v for v in block)
    return at_freq / total if total else 0.0
