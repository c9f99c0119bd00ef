"""Prometheus metrics, collected at scrape time from plain counters.

The I/O path only increments ints on the ``Lun`` objects (no locks, no client-library calls);
this collector reads them when Prometheus scrapes.  It runs in prometheus_client's HTTP thread:
reading ints another thread writes is safe in CPython and a scrape may be a few I/Os stale.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (REGISTRY, CounterMetricFamily, GaugeMetricFamily,
                                   HistogramMetricFamily)
from prometheus_client.registry import Collector

from . import __version__
from .lun import HIST_BUCKETS
from .protocol.scsi import alua

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
        alua_state = GaugeMetricFamily("vsand_lun_alua_state", "ALUA access state of the LUN "
                                       "at this node (1 for the current one)",
                                       labels=labels + ["state"])
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
                for state_name, code in alua.STATES.items():
                    alua_state.add_metric(lv + [state_name],
                                          1 if lun.unit.alua_state == code else 0)
                for op, hist, total in (("read", lun.read_hist, lun.read_ns),
                                        ("write", lun.write_hist, lun.write_ns)):
                    latency.add_metric(lv + [op], _buckets(list(hist)), total / 1e9)
        yield ops
        yield nbytes
        yield secs
        yield errors
        yield size
        yield alua_state
        yield latency
        if d.cluster is not None:
            yield from _cluster_metrics(d.cluster.status(), d.cluster.luns.values())


_ROLES = ("connecting", "degraded", "sync-source", "sync-target", "in-sync", "split-brain")


def _cluster_metrics(status: dict[str, Any], mirrors: Iterable[Any]) -> Iterator[Any]:
    peer_up = GaugeMetricFamily("vsand_peer_up", "peer link up (1) or down (0)",
                                labels=["peer"])
    rtt = GaugeMetricFamily("vsand_peer_rtt_seconds", "smoothed peer link round trip",
                            labels=["peer"])
    drift = GaugeMetricFamily("vsand_peer_drift", "1 when a peer runs another vsand version "
                              "or another shared configuration", labels=["peer", "what"])
    link_up = GaugeMetricFamily("vsand_peer_link_up", "each network's link to a peer up (1) "
                                "or down (0)", labels=["peer", "link"])
    link_active = GaugeMetricFamily("vsand_peer_link_active", "1 for the link that carries "
                                    "the replication to a peer", labels=["peer", "link"])
    for name, p in status["peers"].items():
        peer_up.add_metric([name], 1 if p["state"] == "up" else 0)
        for each in p.get("links", ()):
            link_up.add_metric([name, str(each["link"])], 1 if each["state"] == "up" else 0)
            link_active.add_metric([name, str(each["link"])], 1 if each["active"] else 0)
        for what in ("version", "config"):
            drift.add_metric([name, what], 1 if what in p.get("drift", ()) else 0)
        if p["rtt_ms"] is not None:
            rtt.add_metric([name], p["rtt_ms"] / 1e3)
    yield peer_up
    yield link_up
    yield link_active
    yield rtt
    yield drift
    q = status.get("quorum")
    if q is not None:
        serving = GaugeMetricFamily("vsand_quorum_serving", "1 while this node holds quorum "
                                    "(two nodes: its peer's lease or the witness's vote; "
                                    "three: a majority's in the newest view) and may serve")
        serving.add_metric([], 1 if q["serving"] else 0)
        epoch = GaugeMetricFamily("vsand_quorum_epoch", "the cluster epoch this node knows")
        epoch.add_metric([], q["epoch"])
        witness = GaugeMetricFamily("vsand_witness_up", "1 while the link to the witness is "
                                    "up (absent without a witness)")
        if q["enabled"]:
            witness.add_metric([], 1 if q["witness"] == "up" else 0)
        yield from (serving, epoch, witness)
    role = GaugeMetricFamily("vsand_mirror_state", "replication role of this replica (1 for "
                             "the current one)", labels=["lun", "state"])
    replicas = GaugeMetricFamily("vsand_mirror_in_sync_replicas", "replicas a write reaches "
                                 "before it is acknowledged", labels=["lun"])
    dirty = GaugeMetricFamily("vsand_mirror_dirty_bytes", "bytes a peer lacks (dirty bitmap)",
                              labels=["lun", "peer"])
    resync = CounterMetricFamily("vsand_mirror_resync_bytes", "bytes copied to peers by "
                                 "resync", labels=["lun"])
    remaining = GaugeMetricFamily("vsand_mirror_resync_remaining_bytes", "bytes the running "
                                  "resync still has to copy", labels=["lun"])
    epoch = GaugeMetricFamily("vsand_mirror_epoch", "replication epoch", labels=["lun"])
    inflight = GaugeMetricFamily("vsand_mirror_in_flight", "replicated requests in flight",
                                 labels=["lun"])
    ops = CounterMetricFamily("vsand_mirror_ops", "data-changing requests completed on every "
                              "in-sync replica", labels=["lun"])
    errs = CounterMetricFamily("vsand_mirror_errors", "data-changing requests failed",
                               labels=["lun"])
    latency = HistogramMetricFamily("vsand_mirror_latency_seconds", "data-changing request "
                                    "latency until every in-sync replica applied it",
                                    labels=["lun"])
    verified = GaugeMetricFamily("vsand_mirror_verify_regions_checked", "regions compared by "
                                 "the last (or running) online verify", labels=["lun"])
    differ = GaugeMetricFamily("vsand_mirror_verify_mismatches", "regions that differ across "
                               "replicas, found by the last (or running) verify", labels=["lun"])
    verify_end = GaugeMetricFamily("vsand_mirror_verify_end_time_seconds", "when the last "
                                   "verify ended (Unix time)", labels=["lun"])
    repaired = GaugeMetricFamily("vsand_mirror_verify_repaired_regions", "regions the last "
                                 "verify copied from this node (vsanctl verify --repair)",
                                 labels=["lun"])
    for m in mirrors:
        st = m.status()
        v = st.get("verify")
        if v is not None:
            verified.add_metric([m.lun.unit.params.serial], v["regions_checked"])
            differ.add_metric([m.lun.unit.params.serial], v["mismatches"])
            repaired.add_metric([m.lun.unit.params.serial], v["repaired_regions"])
            if v.get("finished_unix"):
                verify_end.add_metric([m.lun.unit.params.serial], v["finished_unix"])
        label = m.lun.unit.params.serial
        for r in _ROLES:
            role.add_metric([label, r], 1 if st["role"] == r else 0)
        replicas.add_metric([label], len(st["in_sync"]))
        for peer, n in st["dirty_bytes"].items():
            dirty.add_metric([label, peer], n)
        resync.add_metric([label], st["resync_bytes"])
        remaining.add_metric([label], st["resync_remaining_bytes"])
        epoch.add_metric([label], st["epoch"])
        inflight.add_metric([label], st["in_flight"])
        ops.add_metric([label], m.ops)
        errs.add_metric([label], m.errors)
        latency.add_metric([label], _buckets(m.hist), m.ns / 1e9)
    yield from (role, replicas, dirty, resync, remaining, epoch, inflight, ops, errs, latency,
                verified, differ, verify_end, repaired)


def _buckets(hist: list[int]) -> list[tuple[str, int]]:
    out, acc = [], 0
    for bound, count in zip(_BOUNDS[:-1], hist):
        acc += count
        out.append((bound, acc))
    out.append(("+Inf", sum(hist)))
    return out


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
