"""Prometheus metrics, collected at scrape time from plain counters.

The I/O path only increments ints on the ``Lun`` objects (no locks, no client-library calls);
this collector reads them when Prometheus scrapes.  It runs in prometheus_client's HTTP thread:
reading ints another thread writes is safe in CPython and a scrape may be a few I/Os stale.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import (REGISTRY, CounterMetricFamily, GaugeMetricFamily,
                                   HistogramMetricFamily)
from prometheus_client.registry import Collector

from . import __version__
from .lun import HIST_BUCKETS

# Upper bounds of the latency buckets, in seconds: bucket i holds requests under 2**i * 1024 ns.
_BOUNDS = [f"{(1 << i) * 1024e-9:.9g}" for i in range(HIST_BUCKETS - 1)] + ["+Inf"]

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger("vsand.metrics")


class VsandCollector(Collector):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.started = time.time()

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        d = self.daemon
        info = GaugeMetricFamily("vsand_info", "vsand build and node", labels=["version", "node"])
        info.add_metric([__version__, d.config.node_name], 1)
        yield info
        up = GaugeMetricFamily("vsand_start_time_seconds", "Unix time the daemon started")
        up.add_metric([], self.started)
        yield up
        reg = d.registry
        if reg is None:
            return
        sessions = GaugeMetricFamily("vsand_iscsi_sessions", "iSCSI sessions in full feature "
                                     "phase", labels=["target"])
        counts: dict[str, int] = {}
        for s in reg.sessions:
            key = s.target_name or "(discovery)"
            counts[key] = counts.get(key, 0) + 1
        for t in list(reg.targets) + ["(discovery)"]:
            sessions.add_metric([t], counts.get(t, 0))
        yield sessions
        conns = GaugeMetricFamily("vsand_iscsi_connections", "open iSCSI TCP connections")
        conns.add_metric([], len(reg.connections))
        yield conns
        labels = ["target", "lun"]
        ops = CounterMetricFamily("vsand_lun_ops", "block requests completed", labels=labels + ["op"])
        nbytes = CounterMetricFamily("vsand_lun_bytes", "bytes moved", labels=labels + ["op"])
        secs = CounterMetricFamily("vsand_lun_busy_seconds", "summed request latency",
                                   labels=labels + ["op"])
        errors = CounterMetricFamily("vsand_lun_errors", "block requests failed", labels=labels)
        size = GaugeMetricFamily("vsand_lun_size_bytes", "LUN capacity", labels=labels)
        latency = HistogramMetricFamily("vsand_lun_latency_seconds",
                                        "block request latency at the backend (and, for "
                                        "mirrored LUNs, the replicas)", labels=labels + ["op"])
        for t in reg.targets.values():
            for n, lun in t.luns.items():
                lv = [t.name, str(n)]
                ops.add_metric(lv + ["read"], lun.read_ops)
                ops.add_metric(lv + ["write"], lun.write_ops)
                ops.add_metric(lv + ["other"], lun.other_ops)
                nbytes.add_metric(lv + ["read"], lun.read_bytes)
                nbytes.add_metric(lv + ["write"], lun.write_bytes)
                secs.add_metric(lv + ["read"], lun.read_ns / 1e9)
                secs.add_metric(lv + ["write"], lun.write_ns / 1e9)
                secs.add_metric(lv + ["other"], lun.other_ns / 1e9)
                errors.add_metric(lv, lun.errors)
                size.add_metric(lv, lun.unit.params.blocks * lun.unit.params.block_size)
                for op, hist, total in (("read", lun.read_hist, lun.read_ns),
                                        ("write", lun.write_hist, lun.write_ns)):
                    counts = list(hist)
                    buckets, acc = [], 0
                    for bound, count in zip(_BOUNDS[:-1], counts):
                        acc += count
                        buckets.append((bound, acc))
                    buckets.append(("+Inf", sum(counts)))
                    latency.add_metric(lv + [op], buckets, total / 1e9)
        yield ops
        yield nbytes
        yield secs
        yield errors
        yield size
        yield latency


def start_metrics(daemon: Daemon, listen: str) -> None:
    """Serve /metrics on ``listen`` ("host:port"); empty means off."""
    if not listen:
        return
    from prometheus_client import start_http_server

    from .config_schema import parse_address
    host, port = parse_address(listen, None)
    REGISTRY.register(VsandCollector(daemon))
    start_http_server(port, addr=host)
    log.info("metrics on http://%s:%d/metrics", host, port)
