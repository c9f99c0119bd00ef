"""``vsanctl drill --portals``: the failover drill as an initiator sees it.

vsanctl logs in to the LUN through every node's portal (one session per path,
``vsand.initiator.Multipath``: round robin, a command that fails for a path reason goes to the
next path, I/O queues while no path works) and writes versioned 4 KiB blocks into the LUN's
last 256 KiB, one after another, recording when each was acknowledged.  Meanwhile the daemon
runs the failure (vsand/drill.py with ``own_writer=False``: verify, the peer hangs, fences
itself and resyncs).  Then vsanctl reads the region back through each path on its own, so
that every replica is checked as the initiator reaches it; restores the region; and has the
daemon verify the replicas again.

What it reports is what an application on a multipath initiator would have seen: the longest
gap between two acknowledged writes (path failure detection, ALUA state change, the retry on
the other path, the survivor's takeover), the errors that reached it (0 with a queueing
multipath set-up), how often a command was sent again on another path, and the acknowledged
writes that did not read back on each path.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from .admin import request
from .config import ISCSI_PORT
from .config_schema import parse_address
from .initiator import IoFailed, Multipath, PathSession

REGION = 256 * 1024
WRITE = 4096
STAMP = struct.Struct(">QQ")  # slot, version: repeated over the 4 KiB
READ_BACK_S = 30.0  # a path that still fails this long after the rejoin is reported
VERIFY_DEADLINE_S = 600.0

Ack = tuple[float, int, int]  # (monotonic time acknowledged, slot, version)


def stamped(version: int) -> tuple[int, bytes]:
    """The slot of the region that write number ``version`` goes to, and its 4 KiB."""
    slot = version % (REGION // WRITE)
    return slot, STAMP.pack(slot, version) * (WRITE // STAMP.size)


def longest_stall(acks: list[Ack], failed_at: float) -> float:
    """The longest gap between acknowledgements from just before the failure on."""
    times = [t for t, _, _ in acks if t >= failed_at - 0.5]
    return round(max((b - a for a, b in zip(times, times[1:])), default=0.0), 3)


def lost_writes(acks: list[Ack], region: bytes) -> int:
    """Acknowledged writes whose latest version of their slot is not what ``region`` holds."""
    latest: dict[int, int] = {}
    for _, slot, version in acks:
        latest[slot] = version
    return sum(1 for slot, version in latest.items()
               if region[slot * WRITE:slot * WRITE + STAMP.size] != STAMP.pack(slot, version))


def default_paths(cluster: dict[str, Any]) -> list[str]:
    """This node's first portal and each peer's (as their INFO told them)."""
    paths: list[str] = [str(p) for p in cluster.get("portals", [])[:1]]
    for name, peer in sorted(cluster.get("peers", {}).items()):
        if not peer.get("portals"):
            raise ValueError(f"node {name} has not told its portals (is its link up?); "
                             "name the paths with --path HOST:PORT")
        paths.append(str(peer["portals"][0]))
    return paths


def run_path_drill(socket_path: str, lun: str, seconds: float, *, paths: list[str],
                   initiator: str, chap: tuple[str, bytes] | None = None,
                   io_timeout: float = 5.0,
                   progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    entry = next((e for e in request(socket_path, "luns") if e["serial"] == lun), None)
    if entry is None:
        raise ValueError(f"no LUN with serial {lun!r} on this node")
    cluster = request(socket_path, "cluster")
    if not cluster:
        raise ValueError("this node is not part of a cluster")
    paths = paths or default_paths(cluster)
    if len(paths) < 2:
        raise ValueError(f"a multipath drill needs two paths or more, not {paths}")
    bs, target, number = int(entry["block_size"]), str(entry["target"]), int(entry["lun"])
    lba0 = int(entry["blocks"]) - REGION // bs
    sessions = []
    for text in paths:
        host, port = parse_address(text, ISCSI_PORT)
        sessions.append(PathSession(host, port, target, number, initiator=initiator,
                                    chap=chap, timeout=io_timeout))
    mp = Multipath(sessions, queue_s=max(60.0, 4 * seconds), probe_s=1.0)
    for s in sessions:
        s.connect()  # every path works at the start, or this is no drill
    progress(f"logged in through {', '.join(s.name for s in sessions)}")
    saved = mp.read(lba0, REGION // bs, bs)
    acks: list[Ack] = []
    errors: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        version = 0
        while not stop.is_set():
            slot, data = stamped(version)
            try:
                mp.write(lba0 + slot * WRITE // bs, data, bs)
            except IoFailed as e:
                errors.append(str(e))
            else:
                acks.append((time.monotonic(), slot, version))
            version += 1

    thread = threading.Thread(target=writer, name="drill-writer", daemon=True)
    thread.start()
    try:
        progress(f"verify, then node {', '.join(cluster['peers'])} hangs for {seconds:g} s")
        failure = request(socket_path, "drill", timeout=seconds * 4 + 600, lun=lun,
                          seconds=seconds, consent=True, external_writer=True)
    finally:
        stop.set()
        thread.join(max(30.0, 2 * io_timeout + mp.queue_s))
    progress(f"{len(acks)} writes acknowledged; reading them back through every path")
    lost_by_path = {s.name: lost_writes(acks, _read_back(s, lba0, bs)) for s in sessions}
    mp.write(lba0, saved, bs)
    mp.close()
    verify_after = _verify(socket_path, lun)
    failed_at = float(failure["failed_at"])
    return {
        "lun": lun, "peer": failure["peer"], "freeze_s": seconds,
        "paths": [s.name for s in sessions],
        "verify_before": failure["verify_before"],
        "writes_acknowledged": len(acks), "write_errors": len(errors),
        "errors": errors[:5],
        "stall_s": longest_stall(acks, failed_at),
        "retried_on_another_path": mp.retries,
        "path_errors": mp.path_errors[:5],
        "lost_writes": max(lost_by_path.values()), "lost_by_path": lost_by_path,
        "rejoin_s": failure["rejoin_s"], "quorum_epoch": failure["quorum_epoch"],
        "verify_after": verify_after,
    }


def _read_back(session: PathSession, lba0: int, bs: int) -> bytes:
    """The region through this one path (the replica behind it), once the path works: a
    one-path Multipath queues through path errors for READ_BACK_S."""
    return Multipath([session], queue_s=READ_BACK_S, probe_s=0.5).read(lba0, REGION // bs, bs)


def _verify(socket_path: str, lun: str) -> dict[str, int]:
    st = request(socket_path, "verify", lun=lun)
    deadline = time.monotonic() + VERIFY_DEADLINE_S
    while st.get("running") and time.monotonic() < deadline:
        time.sleep(0.2)
        st = request(socket_path, "verify", lun=lun, progress=True)
    return {"regions": st.get("regions_checked", 0), "differ": st.get("mismatches", 0)}
