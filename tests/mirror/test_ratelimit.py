"""Token bucket arithmetic, the AIMD resync throttle and the moving rate behind ETAs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vsand.mirror.ratelimit import MovingRate, ResyncThrottle, TokenBucket

MIB = 1 << 20


def test_bucket_starts_full_then_reserves_with_debt() -> None:
    b = TokenBucket(1000, 500)
    assert b.take(500, 0.0) == 0.0  # the burst goes at once
    assert b.take(1000, 0.0) == pytest.approx(1.0)  # 1000 bytes of debt at 1000/s
    assert b.take(500, 0.0) == pytest.approx(1.5)  # queued behind the previous reservation
    assert b.tokens(1.5) == pytest.approx(0.0)
    assert b.take(0, 1.5) == 0.0


def test_bucket_larger_than_burst_still_goes() -> None:
    b = TokenBucket(MIB, 64 * 1024)
    wait = b.take(MIB, 0.0)
    assert wait == pytest.approx((MIB - 64 * 1024) / MIB)


def test_bucket_refill_is_capped_at_burst() -> None:
    b = TokenBucket(100, 50)
    b.take(50, 0.0)
    assert b.tokens(1000.0) == 50
    assert b.take(60, 1000.0) == pytest.approx(0.1)


def test_bucket_clock_stepping_back_mints_nothing() -> None:
    b = TokenBucket(100, 100, now=10.0)
    b.take(100, 10.0)
    assert b.tokens(5.0) == 0.0
    assert b.tokens(10.5) == pytest.approx(50.0)


def test_bucket_set_rate_refills_at_old_rate_first() -> None:
    b = TokenBucket(100, 1000)
    b.take(1000, 0.0)
    b.set_rate(1000, 1.0)  # one second at 100/s: 100 tokens
    assert b.tokens(1.0) == pytest.approx(100.0)
    assert b.tokens(1.5) == pytest.approx(600.0)


@pytest.mark.parametrize("rate,burst", [(0, 10), (-1, 10), (10, 0)])
def test_bucket_rejects_nonsense(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)


def test_bucket_rejects_negative_take() -> None:
    with pytest.raises(ValueError):
        TokenBucket(1, 1).take(-1, 0.0)


@given(st.lists(st.tuples(st.integers(0, 10_000), st.floats(0, 2)), max_size=50))
def test_bucket_never_exceeds_rate_plus_burst(takes: list[tuple[int, float]]) -> None:
    """Whatever the request pattern, bytes sent by time T (each sent at its grant time) never
    exceed burst + rate * T."""
    rate, burst = 1000.0, 2000
    b = TokenBucket(rate, burst)
    now = 0.0
    sent: list[tuple[float, int]] = []
    for n, dt in takes:
        now += dt
        sent.append((now + b.take(n, now), n))
    for t, _ in sent:
        total = sum(n for s, n in sent if s <= t)
        assert total <= burst + rate * t + 1e-6


def test_throttle_idle_runs_at_max() -> None:
    t = ResyncThrottle(100 * MIB, 10 * MIB, interval=1.0)
    assert t.foreground(0, None, 1.0) == 100 * MIB


def test_throttle_halves_on_high_latency_down_to_min() -> None:
    t = ResyncThrottle(100 * MIB, 10 * MIB, target_latency=0.005, interval=1.0)
    rates = [t.foreground(50, 0.020, float(s)) for s in range(1, 6)]
    assert rates == [50 * MIB, 25 * MIB, 12.5 * MIB, 10 * MIB, 10 * MIB]
    assert t.decreases == 5


def test_throttle_adds_while_foreground_is_healthy() -> None:
    t = ResyncThrottle(100 * MIB, 10 * MIB, target_latency=0.005, interval=1.0)
    t.foreground(50, 0.020, 1.0)
    t.foreground(50, 0.020, 2.0)
    assert t.rate == 25 * MIB
    assert t.foreground(50, 0.001, 3.0) == 35 * MIB  # + max/10
    for s in range(4, 20):
        t.foreground(50, 0.001, float(s))
    assert t.rate == 100 * MIB  # capped


def test_throttle_queue_depth_counts_as_congestion() -> None:
    t = ResyncThrottle(100 * MIB, 10 * MIB, target_queue_depth=16, interval=1.0)
    assert t.foreground(5, None, 1.0, queue_depth=8) == 100 * MIB
    assert t.foreground(5, None, 2.0, queue_depth=32) == 50 * MIB


def test_throttle_evaluates_once_per_interval_on_the_worst_report() -> None:
    t = ResyncThrottle(100 * MIB, 1 * MIB, target_latency=0.005, interval=1.0)
    # Many reports inside one interval: pooled, one decision (a single halving).
    assert t.foreground(10, 0.050, 0.2) == 100 * MIB
    assert t.foreground(10, 0.001, 0.5) == 100 * MIB
    assert t.foreground(10, 0.001, 1.0) == 50 * MIB  # the worst of the interval was high
    assert t.foreground(10, 0.001, 1.5) == 50 * MIB
    assert t.foreground(10, 0.001, 2.0) == 60 * MIB


def test_throttle_bucket_follows_the_rate() -> None:
    t = ResyncThrottle(10 * MIB, 1 * MIB, target_latency=0.005, interval=1.0, burst=MIB)
    t.foreground(1, 0.1, 1.0)  # -> 5 MiB/s
    assert t.take(MIB, 1.0) == 0.0  # the bucket was full
    assert t.take(5 * MIB, 1.0) == pytest.approx(1.0)


@pytest.mark.parametrize("kw", [dict(max_rate=1, min_rate=2), dict(max_rate=1, min_rate=0),
                                dict(max_rate=2, min_rate=1, decrease=1.0)])
def test_throttle_rejects_nonsense(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ResyncThrottle(**kw)  # type: ignore[arg-type]


def test_moving_rate_windows_and_decay() -> None:
    r = MovingRate(period=1.0, tau=5.0)
    r.start(0.0)
    r.add(MIB, 0.5)
    r.add(MIB, 0.9)
    assert r.value(0.99) is None  # the first window is still open
    assert r.value(1.0) == pytest.approx(2 * MIB)
    r.add(4 * MIB, 1.5)
    alpha = 1 - 2.718281828459045 ** (-1 / 5)
    second = 2 * MIB + alpha * (4 * MIB - 2 * MIB)
    assert r.value(2.0) == pytest.approx(second)
    # Three empty windows: the rate falls toward zero instead of holding.
    assert r.value(5.0) == pytest.approx(second * (1 - alpha) ** 3)


def test_moving_rate_unstarted_is_unknown() -> None:
    assert MovingRate().value(100.0) is None
