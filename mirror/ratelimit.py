"""Rate limiting for background copy traffic (resync, verify repair), sans-IO.

Theory of operation
-------------------
``TokenBucket`` is a reservation bucket: ``take(n, now)`` always grants the ``n`` bytes and
answers how long the caller must wait before sending them.  Tokens refill at ``rate`` bytes
per second up to ``burst``; a take larger than the tokens on hand drives the balance negative
(a debt) and the wait is the time the refill needs to pay that debt back.  Reserving instead of
refusing means a request larger than ``burst`` (a 1 MiB chunk under a 256 KiB burst) still goes,
and many small takes in a row queue up behind each other fairly: the n-th waits for the sum.

``ResyncThrottle`` decides the bucket's rate so that resync yields to foreground I/O.  The
rule is AIMD on a foreground latency target, evaluated at most once per ``interval`` seconds:

* no foreground I/O since the last evaluation: the LUN is idle, jump to ``max_rate``;
* foreground latency (a percentile the caller measures, e.g. p99 over the interval) above
  ``target_latency``, or queue depth above ``target_queue_depth``: multiply the rate by
  ``decrease`` (0.5), never below ``min_rate``;
* otherwise (foreground I/O running and healthy): add ``increase`` (a tenth of ``max_rate``)
  per interval, never above ``max_rate``.

Halving backs off fast when resync hurts; the additive climb probes slowly for spare
bandwidth, so the rate settles just under the point where foreground latency degrades.
``min_rate`` keeps resync moving under a permanently busy LUN: a resync that never ends leaves
the mirror degraded, which is worse than slightly slower foreground I/O.  Evaluating once per
interval keeps a burst of reports from halving the rate many times over for one episode.

``MovingRate`` is the smoothed throughput behind the progress and ETA figures of resync and
verify.
"""

from __future__ import annotations

import math


class TokenBucket:
    """Bytes at ``rate`` per second, bursts up to ``burst`` bytes; time is passed in."""

    __slots__ = ("rate", "burst", "_tokens", "_last")

    def __init__(self, rate_bytes_per_s: float, burst: int, now: float = 0.0) -> None:
        if rate_bytes_per_s <= 0:
            raise ValueError(f"rate must be positive, not {rate_bytes_per_s}")
        if burst <= 0:
            raise ValueError(f"burst must be positive, not {burst}")
        self.rate = float(rate_bytes_per_s)
        self.burst = burst
        # Starts full: the first burst of a fresh resync goes without waiting.
        self._tokens = float(burst)
        self._last = now

    def _refill(self, now: float) -> None:
        # A clock that steps back (it should not: monotonic) must not mint tokens later on.
        if now > self._last:
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
            self._last = now

    def tokens(self, now: float) -> float:
        """Bytes that could go now without waiting (negative: the debt still to pay)."""
        self._refill(now)
        return self._tokens

    def take(self, n: int, now: float) -> float:
        """Reserve ``n`` bytes; seconds to wait before sending them (0.0: send now)."""
        if n < 0:
            raise ValueError(f"cannot take {n} bytes")
        self._refill(now)
        self._tokens -= n
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def set_rate(self, rate_bytes_per_s: float, now: float) -> None:
        """Change the rate from ``now`` on; the time before ``now`` refills at the old rate."""
        if rate_bytes_per_s <= 0:
            raise ValueError(f"rate must be positive, not {rate_bytes_per_s}")
        self._refill(now)
        self.rate = float(rate_bytes_per_s)


class ResyncThrottle:
    """An AIMD rate controller for resync traffic (rule: the module docstring) and the bucket
    that enforces the chosen rate."""

    __slots__ = ("max_rate", "min_rate", "target_latency", "target_queue_depth", "interval",
                 "decrease", "increase", "bucket", "_io", "_worst_latency", "_worst_depth",
                 "_last_eval", "decreases")

    def __init__(
        self,
        max_rate: float,
        min_rate: float,
        *,
        target_latency: float = 0.010,
        target_queue_depth: int | None = None,
        interval: float = 0.5,
        decrease: float = 0.5,
        increase: float | None = None,
        burst: int | None = None,
        now: float = 0.0,
    ) -> None:
        if not 0 < min_rate <= max_rate:
            raise ValueError(f"need 0 < min_rate <= max_rate, got {min_rate}, {max_rate}")
        if not 0 < decrease < 1:
            raise ValueError(f"decrease must be in (0, 1), not {decrease}")
        if interval <= 0 or target_latency <= 0:
            raise ValueError("interval and target_latency must be positive")
        self.max_rate = float(max_rate)
        self.min_rate = float(min_rate)
        self.target_latency = target_latency
        self.target_queue_depth = target_queue_depth
        self.interval = interval
        self.decrease = decrease
        self.increase = float(increase) if increase is not None else self.max_rate / 10
        # A tenth of a second at full rate keeps the traffic smooth; a chunk larger than the
        # burst still goes (the bucket reserves), it only waits for the debt it makes.
        self.bucket = TokenBucket(self.max_rate, burst or max(1, int(self.max_rate / 10)), now)
        # Foreground observations gathered since the last evaluation.
        self._io = 0
        self._worst_latency: float | None = None
        self._worst_depth: int | None = None
        self._last_eval = now
        self.decreases = 0  # how often resync backed off: a metric for the operator

    @property
    def rate(self) -> float:
        return self.bucket.rate

    def foreground(
        self,
        io_count_delta: int,
        latency_p: float | None,
        now: float,
        queue_depth: int | None = None,
    ) -> float:
        """Report foreground activity since the previous report; returns the resync rate.

        ``latency_p``: a foreground latency percentile in seconds over the period (None when
        not measured); ``queue_depth``: foreground commands outstanding now.  Observations are
        pooled (the worst of each) until ``interval`` has passed, then the rule is applied once.
        """
        if io_count_delta < 0:
            raise ValueError(f"negative io count {io_count_delta}")
        self._io += io_count_delta
        if latency_p is not None:
            self._worst_latency = max(latency_p, self._worst_latency or 0.0)
        if queue_depth is not None:
            self._worst_depth = max(queue_depth, self._worst_depth or 0)
        if now - self._last_eval >= self.interval:
            self._evaluate(now)
        return self.bucket.rate

    def _evaluate(self, now: float) -> None:
        rate = self.bucket.rate
        if self._io == 0:
            rate = self.max_rate
        elif self._congested():
            rate = max(self.min_rate, rate * self.decrease)
            self.decreases += 1
        else:
            rate = min(self.max_rate, rate + self.increase)
        self.bucket.set_rate(rate, now)
        self._io = 0
        self._worst_latency = None
        self._worst_depth = None
        self._last_eval = now

    def _congested(self) -> bool:
        if self._worst_latency is not None and self._worst_latency > self.target_latency:
            return True
        return (self.target_queue_depth is not None and self._worst_depth is not None
                and self._worst_depth > self.target_queue_depth)

    def take(self, n: int, now: float) -> float:
        """Seconds to wait before sending ``n`` resync bytes (see ``TokenBucket.take``)."""
        return self.bucket.take(n, now)


class MovingRate:
    """A rate (units per second) for progress and ETA: the count in each ``period``-second
    window, smoothed exponentially with time constant ``tau``.

    Whole windows rather than per-event samples keep the estimate independent of how the
    work is chunked; a window with nothing in it counts as zero, so a stalled copy shows a
    falling rate and a growing ETA instead of the last good figure forever.  The first window
    sets the rate outright (there is nothing to smooth against yet).
    """

    __slots__ = ("period", "tau", "_alpha", "_start", "_acc", "_rate")

    def __init__(self, period: float = 1.0, tau: float = 5.0) -> None:
        if period <= 0 or tau <= 0:
            raise ValueError("period and tau must be positive")
        self.period = period
        self.tau = tau
        self._alpha = 1.0 - math.exp(-period / tau)
        self._start: float | None = None
        self._acc = 0.0
        self._rate: float | None = None

    def start(self, now: float) -> None:
        """Open the first window at ``now`` (once; later calls do nothing)."""
        if self._start is None:
            self._start = now

    def add(self, n: float, now: float) -> None:
        self.start(now)
        self._roll(now)
        self._acc += n

    def value(self, now: float) -> float | None:
        """The smoothed rate, or None before the first window has closed."""
        if self._start is not None:
            self._roll(now)
        return self._rate

    def _roll(self, now: float) -> None:
        assert self._start is not None
        windows = int((now - self._start) // self.period)
        if windows <= 0:
            return
        sample = self._acc / self.period
        rate = sample if self._rate is None else self._rate + self._alpha * (sample - self._rate)
        # The windows after the first were empty: each pulls the rate toward zero.
        self._rate = rate * (1.0 - self._alpha) ** (windows - 1)
        self._start += windows * self.period
        self._acc = 0.0
