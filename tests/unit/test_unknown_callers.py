"""The unknown-caller limit: per pool number and in total, in a sliding window."""

from __future__ import annotations

from bridge.calls.flood import UnknownCallers


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_each_pool_number_has_its_own_limit():
    limit = UnknownCallers(per_number=2, total=100, clock=Clock())
    assert [limit.admit("+74950000001") for _ in range(3)] == [None, None, "pool_number"]
    assert limit.admit("+74950000002") is None


def test_the_total_limit_counts_every_number():
    limit = UnknownCallers(per_number=10, total=3, clock=Clock())
    assert [limit.admit(f"+7495000000{i}") for i in range(4)] == [None, None, None, "total"]


def test_the_window_slides_and_refused_calls_are_not_counted():
    clock = Clock()
    limit = UnknownCallers(per_number=2, total=100, window=60, clock=clock)
    limit.admit("+74950000001")
    clock.now += 30
    limit.admit("+74950000001")
    for _ in range(50):
        assert limit.admit("+74950000001") == "pool_number"
    clock.now += 30.5  # the first one is a minute old
    assert limit.admit("+74950000001") is None
    assert limit.admit("+74950000001") == "pool_number"


def test_zero_is_no_limit():
    limit = UnknownCallers(per_number=0, total=0, clock=Clock())
    assert all(limit.admit("+74950000001") is None for _ in range(1000))
