"""Faults against two nodes and their witness, checked by a client that writes through both.

Theory of operation
-------------------
Topology (``rig/netns3.py``): nodes ``a`` and ``b``, the witness ``w`` and the client ``c``
each in a network namespace of their own, on one bridge; any path between two members can be
cut, one way or both, without touching the others.  The client reaches both portals all along.
With a second network (a veth pair straight between the nodes), a cut between the nodes
cuts both networks unless the fault names one.

The checker: one writer per node path (an iSCSI session from the client's namespace to that
node's portal, commands pipelined up to ``QUEUE_DEPTH``) writes and reads 4 KiB blocks
``0..BLOCKS-1``.  Block ``k`` at version ``v`` holds ``(k, v)`` packed and repeated; versions
of a block only grow, and a block has at most one write outstanding anywhere.  Every command's
issue time, completion time, path and outcome are recorded: GOOD (acknowledged), CHECK
CONDITION or another status (failed: the block's next write may go anywhere), or unknown (no
answer within ``OP_TIMEOUT``, or the connection broke: the block is not written again until
the scenario ends, since that write may still land).

Probes aim at the moment a separated node comes back.  Once one node acknowledged writes
alone, the test notes their blocks; right after the repair it reads them back to back through
the other node for ``WAKE_READS_S``.  A paused node (SIGSTOP) also gets such reads and a write
queued on a session opened before the pause: they wait in its socket until it wakes up.

What must hold, after every scenario:

* no lost write: each replica holds every block at its latest acknowledged version or a later
  one (read from the backing files with both nodes in sync and idle, the state unchanged while
  they are read; once more after a clean stop);
* no divergence: the two backing files are identical, and every block decodes to a version
  that was written;
* no stale read: a read never returns an older version than one acknowledged before the read
  was issued (nor a version not yet written);
* no two sides at once: while a fault keeps the nodes apart (the window from the fault until
  its repair starts), writes issued in it are acknowledged by one node only, and once a node
  acknowledged a write issued in it, the other node acknowledges nothing issued after that.

Writes issued after the fault cannot be completed by the mirror (the peer never acknowledges
them), so any acknowledgement of one comes from a node serving alone; reads at both nodes in
the first second are allowed (both hold a lease, and no write completes anywhere meanwhile).
After the repair, a node serving its old data while the other one holds newer acknowledged
writes shows as stale reads.

Deterministic scenarios are one test each; ``test_random_faults`` draws ``VSAND_FAULT_COUNT``
scenarios from seeds (``VSAND_FAULT_SEED`` is the first; each scenario prints ``seed=N``, and
``VSAND_FAULT_SEED=N VSAND_FAULT_COUNT=1`` replays that draw on a fresh cluster);
``VSAND_FAULT_SOAK=1`` runs many more; ``VSAND_FAULT_BATCH`` scenarios share one cluster
(25; a failed scenario ends its cluster).  Every other cluster has a second network between
the nodes (``VSAND_FAULT_NETWORKS=1`` or ``2`` sets it for all), where a fault may cut one
network only, and every other cut cuts both.  ``VSAND_FAULT_LOG=debug`` sets the daemons' log
level.
Each scenario's commands are written to ``history-<seed>.tsv`` in its cluster's directory.
"""

from __future__ import annotations

import bisect
import itertools
import os
import queue
import random
import signal
import socket
import struct
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from rawiscsi import DATA_IN, LOGIN_RSP, NOP_IN, SCSI_CMD, SCSI_RSP, RawInitiator, parse_keys
from rig import LunSpec, VsandCluster, wait_until
from rig.netns import NetnsUnavailable
from rig.netns3 import FaultNet

MiB = 1 << 20
BS = 4096
LUN = LunSpec(0, 16 * MiB, BS)
BLOCKS = 512  # the checker's blocks: the LUN's first 2 MiB
NODES = ("a", "b")
IQN = "iqn.2026-11.org.vsand:mirror"
# Two profiles.  CI's (the default) keeps faults and timeouts short so that 200 scenarios fit
# in the suite; the soak (VSAND_FAULT_SOAK=1) runs the timings of a real deployment.  A seed
# replays with the profile it ran under.
SOAK = os.environ.get("VSAND_FAULT_SOAK") == "1"
PEER_TIMEOUT = 2.0 if SOAK else 1.0
HEARTBEAT_INTERVAL = 0.25 if SOAK else 0.2
SCALE = PEER_TIMEOUT / 2.0  # of the fault delays and durations drawn
QUEUE_DEPTH = 4
PACE_S = 0.004  # between commands of one path: a few hundred per second, not a CPU hog
FAIL_BACKOFF_S = 0.05
OP_TIMEOUT = 10.0
LOGIN_TIMEOUT = 5.0
SYNC_DEADLINE_S = 60.0
# A node separated from its peer but not from the witness serves alone within this (the
# peer timeout, the witness's answer, the lost peer's lease, and the checker's pace).
TAKEOVER_S = 2 * PEER_TIMEOUT + 1.0
# Writes stop for longer than this only when nobody may serve (all three apart): anything
# else is a node stuck on something it should have given up.
STALL_LIMIT_S = TAKEOVER_S + 5.0
AFTER_SYNC_S = 1.0 if SOAK else 0.5  # traffic once both are in sync again, before stopping
WAKE_READS_S = 2.5 if SOAK else 1.5  # reads through the node that was apart, after the repair
WAKE_PACE_S = 0.001
GOOD, CHECK = 0x00, 0x02
NOT_READY, UNIT_ATTENTION = 0x2, 0x6

_STAMP = struct.Struct("<QQ")


def stamp(block: int, version: int) -> bytes:
    return _STAMP.pack(block, version) * (BS // _STAMP.size)


def version_of(block: int, data: bytes) -> int | None:
    """The version a block holds: 0 when never written, None when it is no stamp of it."""
    if not any(data):
        return 0
    k, v = _STAMP.unpack_from(data)
    return v if k == block and data == stamp(block, v) else None


# --------------------------------------------------------------------- the iSCSI client
@dataclass(eq=False)
class Op:
    kind: str  # "write" | "read"
    path: str  # the node it went through
    block: int
    version: int = 0  # a write's version; a read's answer (-1: not a stamp of the block)
    t_issue: float = 0.0
    t_done: float = 0.0
    outcome: str = ""  # "good" | "check ..." | "status ..." | "unknown"
    probe: bool = False

    @property
    def good(self) -> bool:
        return self.outcome == "good"


class SessionError(RuntimeError):
    pass


class _Initiator(RawInitiator):
    """``RawInitiator`` on a socket made elsewhere; sends serialized (two threads send)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.cmdsn, self.itt, self.statsn = 1, 1, 0
        self.isid = 0x800000001234
        self.send_lock = threading.RLock()

    def send(self, *args: Any, **kw: Any) -> None:
        with self.send_lock:
            super().send(*args, **kw)


class Session:
    """One iSCSI session from the client namespace to one node's portal.  ``submit`` sends a
    command at once; a receiver thread matches answers to commands and queues the finished
    ``Op`` on ``done``.  A broken connection sets ``broken``; what is still ``pending`` then
    has an unknown outcome (``abandon``)."""

    def __init__(self, net: FaultNet, host: str, port: int, initiator: str) -> None:
        sock = net.connect("c", host, port, LOGIN_TIMEOUT)
        try:
            sock.settimeout(LOGIN_TIMEOUT)
            self.ini = _Initiator(sock)
            reply = self.ini.login(IQN, initiator=initiator)
            if reply.opcode != LOGIN_RSP or reply.bhs[36] != 0:
                raise SessionError(f"login to {host}:{port} refused: class {reply.bhs[36]}")
            keys = parse_keys(reply.data)
            if keys.get("ImmediateData") != "Yes" or keys.get("InitialR2T") != "No":
                raise SessionError(f"writes would need R2T: {keys}")
            sock.settimeout(None)  # the receiver blocks; close() ends it
        except BaseException:
            sock.close()
            raise
        self.lock = threading.Lock()
        self.pending: dict[int, Op] = {}
        self.done: queue.Queue[Op] = queue.Queue()
        self.broken: str | None = None
        self._data: dict[int, bytearray] = {}
        self._rx = threading.Thread(target=self._receive, daemon=True, name=f"rx-{host}")
        self._rx.start()

    def submit(self, op: Op, data: bytes = b"") -> None:
        write = op.kind == "write"
        cdb = struct.pack(">BBIBHB", 0x2A if write else 0x28, 0, op.block, 0, 1, 0)
        ini = self.ini
        with self.lock:
            if self.broken:
                raise SessionError(self.broken)
            itt = ini.next_itt()
            self.pending[itt] = op
            op.t_issue = time.monotonic()
            b1 = 0x80 | (0x20 if write else 0x40) | 1  # final, W or R, simple task
            try:
                ini.send(SCSI_CMD, b1, lunf=0, itt=itt, words=(BS, ini.cmdsn, ini.statsn),
                         data=data, cdb=cdb)
            except OSError as e:
                self.broken = f"send: {e}"
                raise SessionError(self.broken) from None
            ini.cmdsn += 1

    def _finish(self, itt: int, outcome: str, data: bytes) -> None:
        with self.lock:
            op = self.pending.pop(itt, None)
        if op is None:
            return
        op.t_done = time.monotonic()
        op.outcome = outcome
        if op.kind == "read" and outcome == "good":
            v = version_of(op.block, data) if len(data) == BS else None
            op.version = -1 if v is None else v
        self.done.put(op)

    def _receive(self) -> None:
        try:
            while True:
                p = self.ini.recv()  # answers the target's pings
                if p.opcode == DATA_IN:
                    buf = self._data.setdefault(p.itt, bytearray())
                    buf += p.data
                    if p.bhs[1] & 0x01:  # S: the status came with the data
                        self._finish(p.itt, _outcome(p.bhs[3], b""), bytes(self._data.pop(p.itt)))
                elif p.opcode == SCSI_RSP:
                    status = p.bhs[3] if p.bhs[2] == 0 else 0x100 | p.bhs[2]
                    self._finish(p.itt, _outcome(status, p.data),
                                 bytes(self._data.pop(p.itt, b"")))
                elif p.opcode != NOP_IN:
                    self._finish(p.itt, f"pdu 0x{p.opcode:02x}", b"")
        except Exception as e:  # whatever ends the connection: its commands are unknown
            with self.lock:
                self.broken = self.broken or f"receive: {e!r}"

    def abandon(self) -> list[Op]:
        """Close; every command without an answer gets outcome unknown."""
        self.close()
        with self.lock:
            self.broken = self.broken or "abandoned"
            ops, self.pending = list(self.pending.values()), {}
        now = time.monotonic()
        for op in ops:
            op.outcome, op.t_done = "unknown", now
        return ops

    def oldest(self) -> float | None:
        with self.lock:
            return min((op.t_issue for op in self.pending.values()), default=None)

    def outstanding(self) -> int:
        return len(self.pending)

    def close(self) -> None:
        try:
            self.ini.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.ini.sock.close()
        self._rx.join(5)


def _outcome(status: int, segment: bytes) -> str:
    if status == GOOD:
        return "good"
    if status == CHECK and len(segment) >= 16:
        sense = segment[2:]
        return f"check {sense[2] & 0xF:x}/{sense[12]:02x}/{sense[13]:02x}"
    return f"status 0x{status:x}"


# --------------------------------------------------------------------- the checker
class Checker:
    """Writers and readers through both nodes' paths, and the record of what they saw."""

    def __init__(self, net: FaultNet, portals: dict[str, tuple[str, int]]) -> None:
        self.net = net
        self.portals = portals
        self.lock = threading.Lock()
        self.issued = [0] * BLOCKS
        self.acked = [0] * BLOCKS
        self.busy: set[int] = set()
        self.poisoned: set[int] = set()  # a write of unknown outcome: not written again
        self.ops: list[Op] = []
        self.recent: deque[int] = deque(maxlen=64)  # blocks of recent acknowledged writes
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._probes = 0
        self.errors: list[str] = []  # the checker's own failures (not the daemon's)

    # --- the writers ------------------------------------------------------------------
    def start(self, seed: int) -> None:
        self._stop.clear()
        for i, node in enumerate(NODES):
            t = threading.Thread(target=self._run, args=(node, random.Random(seed * 7 + i)),
                                 name=f"checker-{node}", daemon=True)
            self._threads.append(t)
            t.start()

    def stop(self) -> None:
        """Stop issuing; wait for answers (up to ``OP_TIMEOUT``); close the sessions."""
        self._stop.set()
        for t in self._threads:
            t.join(OP_TIMEOUT + 15)
            if t.is_alive():
                self.errors.append(f"{t.name} did not stop")
        self._threads = []
        self.poisoned.clear()

    def session(self, node: str, name: str) -> Session:
        host, port = self.portals[node]
        return Session(self.net, host, port, f"iqn.2026-11.org.vsand:{name}")

    def _run(self, node: str, rng: random.Random) -> None:
        try:
            self._loop(node, rng)
        except Exception as e:  # a checker bug must fail the test, not vanish with the thread
            self.errors.append(f"checker thread {node}: {e!r}")
            raise

    def _loop(self, node: str, rng: random.Random) -> None:
        sess: Session | None = None
        pause_until = 0.0
        while True:
            stopping = self._stop.is_set()
            if sess is not None and (sess.broken or stopping and not sess.outstanding()):
                self._settle_all(sess, sess.abandon())
                sess = None
            if stopping and sess is None:
                return
            if sess is None:
                try:
                    sess = self.session(node, f"fault-{node}")
                except (OSError, SessionError, TimeoutError, EOFError):
                    time.sleep(0.2)
                continue
            self._drain(sess)
            oldest = sess.oldest()
            if oldest is not None and time.monotonic() - oldest > OP_TIMEOUT:
                self._settle_all(sess, sess.abandon())
                sess = None
                continue
            now = time.monotonic()
            if not stopping and now >= pause_until and sess.outstanding() < QUEUE_DEPTH:
                pause_until = now + PACE_S
                op, data = self._next(node, rng)
                if op is not None:
                    try:
                        sess.submit(op, data)
                    except SessionError:
                        op.outcome, op.t_done = "unknown", time.monotonic()
                        self._settle(op)
            try:
                op = sess.done.get(timeout=max(0.0, pause_until - time.monotonic()) or PACE_S)
            except queue.Empty:
                continue
            self._settle(op)
            if not op.good:
                pause_until = time.monotonic() + FAIL_BACKOFF_S

    def _next(self, node: str, rng: random.Random) -> tuple[Op | None, bytes]:
        with self.lock:
            if rng.random() < 0.3:
                recent = list(self.recent)
                k = rng.choice(recent) if recent and rng.random() < 0.5 else rng.randrange(BLOCKS)
                return Op("read", node, k), b""
            for _ in range(8):
                k = rng.randrange(BLOCKS)
                if k not in self.busy and k not in self.poisoned:
                    break
            else:
                return None, b""
            self.busy.add(k)
            self.issued[k] += 1
            v = self.issued[k]
        return Op("write", node, k, v), stamp(k, v)

    def _drain(self, sess: Session) -> None:
        while True:
            try:
                self._settle(sess.done.get_nowait())
            except queue.Empty:
                return

    def _settle_all(self, sess: Session, unknown: list[Op]) -> None:
        self._drain(sess)
        for op in unknown:
            self._settle(op)

    def _settle(self, op: Op) -> None:
        with self.lock:
            self.ops.append(op)
            if op.kind != "write":
                return
            self.busy.discard(op.block)
            if op.good:
                self.acked[op.block] = max(self.acked[op.block], op.version)
                self.recent.append(op.block)
            elif op.outcome == "unknown":
                self.poisoned.add(op.block)

    # --- probes: single commands on a session of their own -----------------------------
    def probe_write(self, sess: Session, node: str) -> Op | None:
        """Submit a write of a free block through ``sess``; None if none is free."""
        with self.lock:
            free = [k for k in range(BLOCKS) if k not in self.busy and k not in self.poisoned]
            if not free:
                return None
            k = free[self._probes % len(free)]
            self._probes += 1
            self.busy.add(k)
            self.issued[k] += 1
            op = Op("write", node, k, self.issued[k], probe=True)
        try:
            sess.submit(op, stamp(op.block, op.version))
        except SessionError:
            op.outcome, op.t_done = "unknown", time.monotonic()
            self._settle(op)
        return op

    def probe_read(self, sess: Session, node: str, block: int) -> Op:
        op = Op("read", node, block, probe=True)
        sess.submit(op)
        return op

    def collect(self, sess: Session, ops: list[Op], deadline_s: float,
                close: bool = True) -> None:
        """Wait for ``ops`` (submitted on ``sess``) to finish; with ``close``, end the session
        (what did not finish is unknown)."""
        want = {id(op) for op in ops if not op.outcome}  # the rest were settled already
        end = time.monotonic() + deadline_s
        while want and time.monotonic() < end:
            try:
                op = sess.done.get(timeout=0.05)
            except queue.Empty:
                if sess.broken:
                    break
                continue
            want.discard(id(op))
            self._settle(op)
        self._drain(sess)  # and whatever else finished on it
        if close:
            for op in sess.abandon():
                self._settle(op)

    def command(self, node: str, kind: str, tries: int = 4) -> Op:
        """One command through a session of its own, again after a unit attention; recorded."""
        sess = self.session(node, f"probe-{node}")
        try:
            for _ in range(tries):
                got = self.probe_write(sess, node) if kind == "write" else \
                    self.probe_read(sess, node, 0)
                assert got is not None, "no free block"
                op = got
                self.collect(sess, [op], OP_TIMEOUT, close=False)
                if not op.outcome.startswith(f"check {UNIT_ATTENTION:x}/"):
                    break
            return op
        finally:
            for left in sess.abandon():
                self._settle(left)

    def snapshot(self) -> list[Op]:
        with self.lock:
            return list(self.ops)


# --------------------------------------------------------------------- the verdicts
def check_history(ops: list[Op], windows: list[tuple[float, float, str]]) -> dict[str, list[str]]:
    """Stale or impossible reads in the whole history; two sides serving in a window."""
    out: dict[str, list[str]] = {"stale reads": [], "impossible reads": [], "two sides": []}
    acked: dict[int, list[tuple[float, int]]] = defaultdict(list)
    issued_at: dict[tuple[int, int], float] = {}
    for op in ops:
        if op.kind == "write":
            issued_at[op.block, op.version] = op.t_issue
            if op.good:
                acked[op.block].append((op.t_done, op.version))
    prefix: dict[int, tuple[list[float], list[int]]] = {}
    for k, acks in acked.items():
        acks.sort()
        best, times, maxes = 0, [], []
        for t, v in acks:
            best = max(best, v)
            times.append(t)
            maxes.append(best)
        prefix[k] = (times, maxes)
    for op in ops:
        if op.kind != "read" or not op.good:
            continue
        v = op.version
        if v < 0:
            out["impossible reads"].append(f"{_op(op)}: not a stamp of block {op.block}")
            continue
        if v and ((op.block, v) not in issued_at or issued_at[op.block, v] > op.t_done):
            out["impossible reads"].append(f"{_op(op)}: version {v} was not written yet")
            continue
        times, maxes = prefix.get(op.block, ([], []))
        i = bisect.bisect_left(times, op.t_issue)
        if i and maxes[i - 1] > v:
            out["stale reads"].append(f"{_op(op)} returned version {v}, but version "
                                      f"{maxes[i - 1]} was acknowledged before it was issued")
    for t0, t1, label in windows:
        inside = [op for op in ops if op.good and t0 <= op.t_issue and op.t_done <= t1]
        writers = {op.path for op in inside if op.kind == "write"}
        if len(writers) > 1:
            out["two sides"].append(f"{label}: writes issued in the window acknowledged by "
                                    f"both nodes: " + "; ".join(
                                        _op(min((o for o in inside if o.kind == "write"
                                                 and o.path == n), key=lambda o: o.t_done))
                                        for n in sorted(writers)))
        for node in NODES:
            theirs = [op.t_done for op in inside if op.kind == "write" and op.path != node]
            if not theirs:
                continue
            first = min(theirs)
            late = [op for op in inside if op.path == node and op.t_issue > first]
            if late:
                out["two sides"].append(
                    f"{label}: node {node} acknowledged {len(late)} command(s) issued after "
                    f"the other node acknowledged a write alone ({_at(first)}), first "
                    f"{_op(late[0])}")
    return out


def check_files(files: dict[str, bytes], checker: Checker) -> dict[str, list[str]]:
    """Lost writes, impossible versions and divergence in the replicas' backing files."""
    out: dict[str, list[str]] = {"lost writes": [], "divergences": [], "impossible blocks": []}
    a, b = files["a"], files["b"]
    if a != b:
        diff = [i // BS for i in range(0, max(len(a), len(b)), BS) if a[i:i + BS] != b[i:i + BS]]
        for k in diff[:20]:
            out["divergences"].append(
                f"block {k}: a {version_of(k, a[k * BS:(k + 1) * BS])}, "
                f"b {version_of(k, b[k * BS:(k + 1) * BS])}")
        if len(diff) > 20:
            out["divergences"].append(f"... {len(diff)} blocks differ")
    with checker.lock:
        acked, issued = list(checker.acked), list(checker.issued)
    acks = {(op.block, op.version): op for op in checker.snapshot()
            if op.kind == "write" and op.good}
    for node, data in files.items():
        for k in range(BLOCKS):
            v = version_of(k, data[k * BS:(k + 1) * BS])
            if v is None or v > issued[k]:
                out["impossible blocks"].append(f"node {node} block {k}: version {v}, "
                                                f"{issued[k]} issued")
            elif v < acked[k]:
                out["lost writes"].append(f"node {node} block {k}: version {v}, but "
                                          f"{_op(acks[k, acked[k]])}")
    return out


_WALL = time.time() - time.monotonic()  # log lines carry the time of day: print both


def _at(t: float) -> str:
    wall = time.strftime("%H:%M:%S", time.localtime(t + _WALL))
    return f"{wall},{int((t + _WALL) % 1 * 1000):03d}"


def _op(op: Op) -> str:
    return (f"{op.kind} of block {op.block}" + (f" v{op.version}" if op.kind == "write" else "")
            + f" via {op.path} issued {_at(op.t_issue)} done {_at(op.t_done)} "
            f"({op.outcome}{', probe' if op.probe else ''})")


# --------------------------------------------------------------------- faults
@dataclass(frozen=True)
class Fault:
    """``cut`` x|y, ``one-way`` x->y, ``isolate`` (all three apart), ``kill``/``pause`` a
    node (SIGKILL, then a restart; SIGSTOP, then SIGCONT), ``kill-witness`` (then a restart),
    ``slow`` (the nodes' path limited to ``rate`` bit/s each way), ``stutter`` a node (stopped
    for a fraction of the peer timeout, again and again: a starved or swapping host);
    with two networks between the nodes, ``cut-net`` (``network`` cut between them, one way
    x->y or both: the nodes still talk over the other) and every other cut acts on both."""
    kind: str
    x: str = ""
    y: str = ""
    rate: int = 0
    network: int = 0
    one_way: bool = False

    @property
    def label(self) -> str:
        arrow = "->" if self.one_way else "|"
        return {"cut": f"cut {self.x}|{self.y}", "one-way": f"one-way {self.x}->{self.y}",
                "kill": f"kill {self.x}", "pause": f"pause {self.x}",
                "slow": f"slow a-b {self.rate / 1e6:g} Mbit/s",
                "stutter": f"stutter {self.x}",
                "cut-net": f"cut network {self.network} {self.x}{arrow}{self.y}",
                }.get(self.kind, self.kind)

    @property
    def type(self) -> str:
        """The label less the node names that are interchangeable (for the stall table)."""
        if self.kind in ("cut", "one-way"):
            apart = {self.x, self.y} == set(NODES)
            return f"{self.kind} {'a-b' if apart else 'node-witness'}"
        if self.kind == "cut-net":
            return "cut one network" + (" one-way" if self.one_way else "")
        return "slow a-b" if self.kind == "slow" else self.kind

    @property
    def apart(self) -> bool:
        """Whether the nodes cannot talk while it lasts."""
        if self.kind in ("cut", "one-way"):
            return {self.x, self.y} == set(NODES)
        return self.kind in ("isolate", "kill", "pause")

    def apply(self, rig: FaultRig) -> None:
        net, c = rig.net, rig.cluster
        if self.kind == "cut":
            net.cut(self.x, self.y)
        elif self.kind == "one-way":
            net.cut_one_way(self.x, self.y)
        elif self.kind == "isolate":
            for x, y in (("a", "b"), ("a", "w"), ("b", "w")):
                net.cut(x, y)
        elif self.kind == "kill":
            c.nodes[self.x].kill()
        elif self.kind == "pause":
            pid = c.nodes[self.x].pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            rig.paused.add(self.x)
        elif self.kind == "kill-witness":
            assert c.witness is not None
            c.witness.kill()
        elif self.kind == "slow":
            net.throttle("a", "b", self.rate)
        elif self.kind == "stutter":
            rig.stutter(self.x)
        elif self.kind == "cut-net":
            if self.one_way:
                net.cut_one_way(self.x, self.y, self.network)
            else:
                net.cut(self.x, self.y, self.network)
        else:
            raise ValueError(self.kind)

    def heal(self, rig: FaultRig) -> None:
        c = rig.cluster
        if self.kind in ("cut", "one-way", "isolate", "cut-net"):
            rig.net.heal()
        elif self.kind == "kill":
            c.nodes[self.x].restart()
        elif self.kind == "pause":
            pid = c.nodes[self.x].pid
            assert pid is not None
            os.kill(pid, signal.SIGCONT)
            rig.paused.discard(self.x)
        elif self.kind == "kill-witness":
            assert c.witness is not None
            c.witness.start()
        elif self.kind == "slow":
            rig.net.unthrottle()
        elif self.kind == "stutter":
            rig.stop_stutter()


def draw(seed: int, networks: int = 1) -> tuple[Fault, float, float]:
    """A scenario from its seed (and the number of networks between the nodes): the fault,
    the delay before it, how long it lasts."""
    rng = random.Random(seed)
    kind = rng.choices(["cut", "one-way", "kill", "pause", "kill-witness", "isolate", "slow",
                        "stutter", "cut-net"],
                       weights=[4, 4, 2, 3, 1, 1, 2, 2, 5 if networks > 1 else 0])[0]
    if kind == "cut-net":
        x, y = rng.choice([("a", "b"), ("b", "a")])
        fault = Fault(kind, x, y, network=rng.randrange(networks), one_way=rng.random() < 0.3)
    elif kind == "cut":
        fault = Fault(kind, *rng.choice([("a", "b"), ("a", "b"), ("a", "w"), ("b", "w")]))
    elif kind == "one-way":
        fault = Fault(kind, *rng.choice([("a", "b"), ("b", "a"), ("a", "b"), ("b", "a"),
                                         ("a", "w"), ("w", "a"), ("b", "w"), ("w", "b")]))
    elif kind in ("kill", "pause", "stutter"):
        fault = Fault(kind, rng.choice(NODES))
    elif kind == "slow":
        # Below what the checker writes (about 1 MB/s each way): replication queues up.
        fault = Fault(kind, rate=rng.choice([500_000, 1_000_000, 2_000_000, 4_000_000]))
    else:
        fault = Fault(kind)
    duration = rng.uniform(1.0, 6.0) if kind in ("kill", "pause") else rng.uniform(1.0, 8.0)
    return fault, rng.uniform(0.3, 2.0) * SCALE, duration * SCALE


# --------------------------------------------------------------------- one cluster
@dataclass
class Outcome:
    seed: int
    label: str
    type: str
    networks: int = 1
    writes: int = 0
    reads: int = 0
    probe_reads: int = 0  # acknowledged reads of blocks written alone, through the other node
    failed: int = 0
    unknown: int = 0
    stall_s: float = 0.0
    resync_s: float = 0.0
    problems: dict[str, list[str]] = field(default_factory=dict)
    logs: str = ""
    probes: list[Op] = field(default_factory=list)  # queued at a paused node
    window: tuple[float, float] = (0.0, 0.0)  # the fault, from applied to repair
    marks: dict[Path, int] = field(default_factory=dict)  # log sizes when it started
    unknown_ops: list[Op] = field(default_factory=list)
    history: Path | None = None  # every command of the scenario, written when it failed

    @property
    def ok(self) -> bool:
        return not any(self.problems.values())

    def explain(self) -> str:
        replay = (f"VSAND_FAULT_SEED={self.seed} VSAND_FAULT_COUNT=1 "
                  f"VSAND_FAULT_NETWORKS={self.networks}" + (" VSAND_FAULT_SOAK=1" if SOAK
                                                               else ""))
        lines = [f"seed={self.seed} scenario={self.label}: (replay: {replay})"]
        for what, items in self.problems.items():
            lines += [f"  {what}: {item}" for item in items[:12]]
            if len(items) > 12:
                lines.append(f"  {what}: ... {len(items)} in all")
        return "\n".join(lines) + "\n" + self.logs


class FaultRig:
    """``FaultNet`` + a two-node cluster with its witness + the checker; ``networks`` 2: a
    second network between the nodes (each node's ``address`` lists both)."""

    def __init__(self, base: Path, networks: int = 1) -> None:
        self.networks = networks
        try:
            self.net = FaultNet(second_subnet="10.233.0.0/24" if networks > 1 else None)
        except NetnsUnavailable as e:
            pytest.skip(str(e))
        self.paused: set[str] = set()
        self._stutter: tuple[threading.Thread, threading.Event] | None = None
        self.late_blocks: list[int] = []  # written alone by one node while the nodes were apart
        self.healthy_at = 0.0  # when both were last seen in sync and serving
        self.closed = False
        try:
            addr = self.net.addresses
            self.cluster = VsandCluster(
                base, luns=(LUN,), witness=True, witness_host=addr["w"],
                witness_netns=self.net.witness_netns, hosts={n: addr[n] for n in NODES},
                target_factory=self.net.vsand_target, peer_timeout=PEER_TIMEOUT,
                heartbeat_interval=HEARTBEAT_INTERVAL, more_hosts=self.net.addresses2 or None,
                extra_config={"log_level": os.environ.get("VSAND_FAULT_LOG", "info")})
            self.cluster.start()
            self.checker = Checker(self.net, {n: (addr[n], self.cluster.nodes[n].port)
                                              for n in NODES})
            self.wait_healthy()
        except BaseException:
            self.close()
            raise

    # --- state ------------------------------------------------------------------------
    def quorum(self, node: str) -> dict[str, Any]:
        return self.cluster.admin(node, "cluster")["quorum"]  # type: ignore[no-any-return]

    def alua(self, node: str) -> str:
        return self.cluster.admin(node, "alua")[0]["state"]  # type: ignore[no-any-return]

    def serving(self) -> set[str]:
        return {n for n in NODES if self.cluster.nodes[n].running() and n not in self.paused
                and self.quorum(n)["serving"]}

    def wait_healthy(self, deadline_s: float = SYNC_DEADLINE_S) -> None:
        self.cluster.wait_in_sync(deadline_s)
        wait_until(lambda: self.serving() == set(NODES), "both nodes serve", deadline_s)

    def state(self) -> tuple[Any, ...]:
        """What must hold still while the replicas are compared: roles, epochs, votes."""
        return tuple((n, tuple((m["role"], m["epoch"]) for m in self.cluster.lun_states(n)),
                      self.quorum(n)["epoch"]) for n in NODES)

    def settle(self, deadline_s: float = SYNC_DEADLINE_S) -> tuple[Any, ...]:
        """Until both nodes are in sync and serving, and stay so for ``AFTER_SYNC_S`` (the
        checker writing meanwhile): a link that comes up twice may undo the first sync."""
        end = time.monotonic() + deadline_s
        while True:
            self.wait_healthy(max(1.0, end - time.monotonic()))
            self.healthy_at = time.monotonic()
            before = self.state()
            time.sleep(AFTER_SYNC_S)
            now = self.state()
            if now == before and self.serving() == set(NODES):
                return now
            assert time.monotonic() < end, f"state kept changing: {before} -> {now}"

    def compare(self, settled: tuple[Any, ...], tries: int = 3) -> dict[str, list[str]]:
        """The backing files checked, both nodes in sync and idle (``settled``) while they
        are read; if the state moved meanwhile, settle again and read again."""
        for _ in range(tries):
            files = {n: self.cluster.backing_path(n).read_bytes() for n in NODES}
            if self.state() == settled:
                return check_files(files, self.checker)
            settled = self.settle()
        return {"stuck": [f"no stable state to compare the replicas in: {settled}"]}

    def wait_one_serving(self, deadline: float) -> str:
        """Until exactly one node serves, with the witness's vote (by monotonic ``deadline``;
        a node whose lease still runs serves without it, for a while); its name."""
        while True:
            s = self.serving()
            if len(s) == 1 and self.quorum(next(iter(s)))["witness_vote"]:
                return s.pop()
            assert time.monotonic() < deadline, f"serving: {s or 'nobody'}, wanted one node " \
                "with the witness's vote"
            time.sleep(0.1)

    def hold(self, seconds: float, what: str, cond: Callable[[], bool]) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            assert cond(), f"no longer true: {what}"
            time.sleep(0.2)

    def log_marks(self) -> dict[Path, int]:
        paths = [n.stderr_path for n in self.cluster.nodes.values()]
        if self.cluster.witness is not None:
            paths.append(self.cluster.witness.log)
        return {p: p.stat().st_size if p.exists() else 0 for p in paths}

    # --- a scenario ---------------------------------------------------------------------
    def run(self, fault: Fault, seed: int, delay: float, duration: float,
            during: Callable[[float], None] | None = None) -> Outcome:
        print(f"seed={seed} scenario={fault.label} delay={delay:.2f}s duration={duration:.2f}s",
              flush=True)
        out = Outcome(seed, fault.label, fault.type, self.networks)
        ck = self.checker
        marks = self.log_marks()
        start = time.monotonic()
        probe: Session | None = None
        probes: list[Op] = []
        waker: threading.Thread | None = None
        ck.start(seed)
        try:
            time.sleep(delay)
            self.late_blocks, loser = [], ""
            if fault.kind == "pause":  # opened now: the paused node cannot log it in later
                probe = ck.session(fault.x, f"late-{fault.x}")
            fault.apply(self)
            t0 = time.monotonic()
            try:
                if during is not None:
                    during(t0)
            except AssertionError as e:
                out.problems["expectations"] = [str(e)]
            if fault.apart:
                loser = self._written_alone(t0, t0 + duration - 0.2)
                if probe is not None and loser == fault.x:
                    probes = self._queue_probes(probe, loser)
                if not loser and fault.kind != "isolate" and duration > TAKEOVER_S:
                    # The witness hears one side at least: that side must go on.
                    out.problems["no takeover"] = [
                        f"{fault.label}: nobody acknowledged a write alone within "
                        f"{duration - 0.2:.1f} s, the witness reachable"]
            time.sleep(max(0.0, t0 + duration - time.monotonic()))
            t1 = time.monotonic()
            fault.heal(self)
            healed = time.monotonic()
            if loser and probe is None:
                try:
                    probe = ck.session(loser, f"late-{loser}")
                except (OSError, SessionError, EOFError):
                    pass
            if probe is not None:  # the reads run while the nodes find each other again
                waker = threading.Thread(target=self._wake, args=(probe, loser, probes),
                                         name="wake-reads", daemon=True)
                waker.start()
            try:
                settled = self.settle()
                out.resync_s = self.healthy_at - healed
            except AssertionError as e:
                out.problems["stuck"] = [
                    f"not in sync and serving for good {SYNC_DEADLINE_S:g} s after the repair: {e}"]
        finally:
            quiet = time.monotonic()
            if waker is not None:
                waker.join(WAKE_READS_S + OP_TIMEOUT + 5)
            elif probe is not None:
                probe.close()
            ck.stop()
        if ck.errors:
            out.problems["checker"], ck.errors = ck.errors, []
        ops = ck.snapshot()
        mine = [op for op in ops if op.t_issue >= start]
        out.writes = sum(op.good and op.kind == "write" for op in mine)
        out.reads = sum(op.good and op.kind == "read" and not op.probe for op in mine)
        out.probe_reads = sum(op.good and op.kind == "read" and op.probe for op in mine)
        out.failed = sum(not op.good and op.outcome != "unknown" and not op.probe for op in mine)
        out.unknown = sum(op.outcome == "unknown" for op in mine)
        dones = sorted(op.t_done for op in mine if op.good and op.kind == "write"
                       and t0 <= op.t_done <= quiet)
        points = [t0, *dones, quiet]
        out.stall_s = max(b - a for a, b in itertools.pairwise(points))
        if fault.kind != "isolate" and out.stall_s > STALL_LIMIT_S:
            out.problems["long stalls"] = [f"{fault.label}: no write acknowledged for "
                                           f"{out.stall_s:.1f} s"]
        history = check_history([op for op in ops if op.kind == "write" or op.t_issue >= start],
                                [(t0, t1, fault.label)] if fault.apart else [])
        out.problems.update(history)
        if "stuck" not in out.problems:
            out.problems.update(self.compare(settled))
        out.probes, out.window, out.marks = probes, (t0, t1), marks
        out.unknown_ops = [op for op in mine if op.outcome == "unknown"]
        out.history = self.cluster.workdir / f"history-{seed}.tsv"
        self.write_history(out.history, start)
        if not out.ok:
            self.tell(out)
        print(f"  {out.writes} writes and {out.reads} reads acknowledged (+{out.probe_reads} probe "
              f"reads), {out.failed} failed, {out.unknown} unknown; longest write stall "
              f"{out.stall_s:.2f} s; in sync {out.resync_s:.2f} s after the repair; "
              + ("ok" if out.ok else "PROBLEMS: " + "; ".join(
                  f"{k} {len(v)}" for k, v in out.problems.items() if v)), flush=True)
        return out

    def _written_alone(self, t0: float, until: float) -> str:
        """Once a node acknowledged writes alone (issued well after ``t0``: one issued at once
        may still have reached the other node, SIGSTOP takes a moment), note their blocks in
        ``late_blocks``; the node that did not write them, or "" if none did by ``until``."""
        while time.monotonic() < until:
            alone = [op for op in self.checker.snapshot() if op.good and op.kind == "write"
                     and op.t_issue >= t0 + 0.5]
            if alone:
                time.sleep(0.2)  # a few more
                alone = [op for op in self.checker.snapshot() if op.good and op.kind == "write"
                         and op.t_issue >= t0 + 0.5]
                self.late_blocks = list(dict.fromkeys(op.block for op in reversed(alone)))[:32]
                return "b" if alone[-1].path == "a" else "a"
            time.sleep(0.05)
        return ""

    def _queue_probes(self, sess: Session, node: str) -> list[Op]:
        """Reads of ``late_blocks`` and a write, queued at ``node`` while it is paused."""
        try:
            ops = [self.checker.probe_read(sess, node, k)
                   for k in self.late_blocks[:QUEUE_DEPTH]]
        except SessionError:
            return []
        w = self.checker.probe_write(sess, node)
        return ops + ([w] if w is not None else [])

    def _wake(self, sess: Session, node: str, queued: list[Op]) -> None:
        try:
            self._wake_reads(sess, node, WAKE_READS_S)
        except Exception as e:  # a checker bug must fail the test, not vanish with the thread
            self.checker.errors.append(f"wake-up reads: {e!r}")
        finally:
            self.checker.collect(sess, queued, OP_TIMEOUT)

    def _wake_reads(self, sess: Session, node: str, seconds: float) -> None:
        """Right after the repair: read ``late_blocks`` through the node that did not write
        them, back to back, for ``seconds`` (what was queued there finishes meanwhile).  A
        node serving its old data while the other one wrote alone shows as stale reads."""
        blocks, i = self.late_blocks, 0
        end = time.monotonic() + seconds
        try:
            while blocks and time.monotonic() < end and not sess.broken:
                while sess.outstanding() < QUEUE_DEPTH + 1:
                    self.checker.probe_read(sess, node, blocks[i % len(blocks)])
                    i += 1
                try:
                    self.checker._settle(sess.done.get(timeout=0.02))
                except queue.Empty:
                    pass
                self.checker._drain(sess)
                time.sleep(WAKE_PACE_S)
        except SessionError:
            pass

    def tell(self, out: Outcome) -> None:
        """Put the story of a failed scenario into ``out.logs``."""
        t0, t1 = out.window
        out.logs = (f"fault at {_at(t0)}, repaired at {_at(t1)}; commands in {out.history}\n"
                    + "".join(f"unknown outcome: {_op(op)}\n" for op in out.unknown_ops[:8])
                    + self.excerpt(out.marks))

    def write_history(self, path: Path, since: float) -> None:
        """Every command finished after ``since``, one line each, times of day as in the logs."""
        with open(path, "w") as f:
            f.write("issued\tdone\tpath\tkind\tblock\tversion\toutcome\n")
            for op in self.checker.snapshot():
                if op.t_done >= since:
                    f.write(f"{_at(op.t_issue)}\t{_at(op.t_done)}\t{op.path}\t{op.kind}\t"
                            f"{op.block}\t{op.version}\t{op.outcome}"
                            f"{chr(9) + 'probe' if op.probe else ''}\n")

    def excerpt(self, marks: dict[Path, int], lines: int = 60) -> str:
        """What each process logged since ``marks``, the lines that tell the story."""
        keys = ("WARNING", "ERROR", "quorum", " -> ", "vote", "node ", "lost", "start")
        out = []
        for path, offset in marks.items():
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    text = f.read().decode(errors="replace")
            except OSError:
                continue
            picked = [ln for ln in text.splitlines() if any(k in ln for k in keys)]
            out.append(f"--- {path} ({len(picked)} lines picked) ---")
            out += picked[-lines:]
        return "\n".join(out)

    # --- a stuttering node ---------------------------------------------------------------
    def stutter(self, node: str) -> None:
        """Stop ``node`` for 0.1-0.5 of the peer timeout, let it run as long, again and
        again, until ``stop_stutter``: slow, never silent long enough to be declared lost."""
        pid = self.cluster.nodes[node].pid
        assert pid is not None
        done = threading.Event()
        rng = random.Random(pid)

        def cycle() -> None:
            while not done.is_set():
                os.kill(pid, signal.SIGSTOP)
                try:
                    done.wait(rng.uniform(0.1, 0.5) * PEER_TIMEOUT)
                finally:
                    os.kill(pid, signal.SIGCONT)
                done.wait(rng.uniform(0.1, 0.5) * PEER_TIMEOUT)

        thread = threading.Thread(target=cycle, name=f"stutter-{node}", daemon=True)
        self._stutter = (thread, done)
        thread.start()

    def stop_stutter(self) -> None:
        if self._stutter is not None:
            thread, done = self._stutter
            done.set()
            thread.join(PEER_TIMEOUT + 5)
            self._stutter = None

    # --- the end ------------------------------------------------------------------------
    def finish(self) -> dict[str, list[str]]:
        """Stop cleanly (every node must exit 0), then check the backing files once more."""
        self.checker.stop()
        self.cluster.stop()
        files = {n: self.cluster.backing_path(n).read_bytes() for n in NODES}
        return check_files(files, self.checker)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        cluster = getattr(self, "cluster", None)
        self.stop_stutter()
        try:
            if getattr(self, "checker", None) is not None:
                self.checker.stop()
        finally:
            if cluster is not None:
                for node in cluster.nodes.values():
                    if node.running():
                        node.kill()  # SIGKILL ends a stopped process too
                if cluster.witness is not None:
                    cluster.witness.kill()
            self.net.close()
        assert not self.net.leftovers(), f"left behind: {self.net.leftovers()}"



# --------------------------------------------------------------------- the report
class Report:
    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []
        self.final: list[str] = []

    def add(self, out: Outcome) -> Outcome:
        self.outcomes.append(out)
        return out

    def text(self) -> str:
        o = self.outcomes
        if not o:
            return "fault scenarios: none run"
        total: dict[str, int] = defaultdict(int)
        for out in o:
            for what, items in out.problems.items():
                total[what] += len(items)
        stalls: dict[str, float] = defaultdict(float)
        for out in o:
            stalls[out.type] = max(stalls[out.type], out.stall_s)
        lines = [
            f"fault scenarios run: {len(o)} (seeds {', '.join(str(x.seed) for x in o)})",
            (f"acknowledged writes {sum(x.writes for x in o)}, reads {sum(x.reads for x in o)} "
             f"(+{sum(x.probe_reads for x in o)} probe reads); failed commands "
             f"{sum(x.failed for x in o)}, unknown {sum(x.unknown for x in o)}"),
            (f"lost writes {total['lost writes']}, divergences {total['divergences']}, stale "
             f"reads {total['stale reads']}, impossible reads/blocks "
             f"{total['impossible reads'] + total['impossible blocks']}, two sides at once "
             f"{total['two sides']}, stuck {total['stuck']}, no takeover "
             f"{total['no takeover']}, long stalls {total['long stalls']}, unmet expectations "
             f"{total['expectations']}"),
            "longest write stall per scenario type: " + ", ".join(
                f"{t} {s:.2f} s" for t, s in sorted(stalls.items())),
            "failed scenarios: " + (", ".join(f"seed={x.seed} {x.label}" for x in o if not x.ok)
                                    or "none"),
        ]
        return "\n".join(lines + self.final)


_REPORT = Report()


@pytest.fixture(autouse=True)
def _sigterm_cleans_up() -> Iterator[None]:
    """A SIGTERM (a CI timeout) becomes KeyboardInterrupt: the rig's ``finally`` blocks
    still end the processes and remove the namespaces.  Only in this process: a forked child
    (pyroute2 forks helpers and ends them with SIGTERM) must not unwind a copy of the test
    and tear down the rig it shares."""
    owner = os.getpid()

    def interrupt(signum: int, frame: Any) -> None:
        if os.getpid() != owner:
            os._exit(128 + signum)
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@pytest.fixture(scope="module")
def report(request: pytest.FixtureRequest) -> Iterator[Report]:
    """The scenarios run, their seeds and what they found: in pytest's closing summary (the
    conftest prints ``config.vsand_reports``) and in ``VSAND_FAULT_REPORT`` if set."""
    yield _REPORT
    text = _REPORT.text()
    reports = getattr(request.config, "vsand_reports", [])
    reports.append(("fault injection", text))
    request.config.vsand_reports = reports  # type: ignore[attr-defined]
    path = os.environ.get("VSAND_FAULT_REPORT")
    if path:
        Path(path).write_text(text + "\n")


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[FaultRig]:
    r = FaultRig(tmp_path / "cluster")
    try:
        yield r
    finally:
        r.close()


def _finish(rig: FaultRig, out: Outcome) -> None:
    """Clean stop, the last file check, and the verdict of one deterministic scenario."""
    final = rig.finish()
    for what, items in final.items():
        out.problems.setdefault(what, []).extend(f"after the clean stop: {i}" for i in items)
    if not out.ok and not out.logs:
        rig.tell(out)
    assert out.ok, out.explain()


# --------------------------------------------------------------------- deterministic
def test_partition_between_nodes(rig: FaultRig, report: Report) -> None:
    """a|b with the witness reachable by both: the vote's winner serves, the other fences."""
    seen: dict[str, str] = {}

    def during(t0: float) -> None:
        winner = rig.wait_one_serving(t0 + PEER_TIMEOUT + 3.0)
        loser = "b" if winner == "a" else "a"
        seen["winner"] = winner
        rig.hold(1.5, f"only {winner} serves", lambda: rig.serving() == {winner})
        assert rig.quorum(winner)["witness_vote"], rig.quorum(winner)
        assert rig.alua(loser) == "unavailable", rig.alua(loser)
        assert rig.alua(winner) == "active-optimized", rig.alua(winner)
        w = rig.checker.command(loser, "write")
        r = rig.checker.command(loser, "read")
        assert w.outcome.startswith(f"check {NOT_READY:x}/"), f"write through {loser}: {_op(w)}"
        assert r.outcome.startswith(f"check {NOT_READY:x}/"), f"read through {loser}: {_op(r)}"

    out = report.add(rig.run(Fault("cut", "a", "b"), 0, 1.0, 6.0, during))
    if "winner" in seen:
        t0, t1 = out.window
        print(f"  vote won by node {seen['winner']}")
        assert any(op.good and op.kind == "write" and op.path == seen["winner"]
                   and t0 <= op.t_issue and op.t_done <= t1 for op in rig.checker.snapshot()), \
            "the winner acknowledged no write during the partition"
    _finish(rig, out)


def test_partition_from_witness_changes_nothing(rig: FaultRig, report: Report) -> None:
    """a|w only: a and b still talk, and both keep serving."""
    window: list[float] = []

    def during(t0: float) -> None:
        window.append(t0)
        wait_until(lambda: rig.quorum("a")["witness"] == "down", "a sees the witness gone", 10)
        rig.hold(2.0, "both serve, in sync", lambda: rig.serving() == set(NODES)
                 and rig.cluster.roles() == {"a": ["in-sync"], "b": ["in-sync"]})
        window.append(time.monotonic())

    out = report.add(rig.run(Fault("cut", "a", "w"), 1, 1.0, 5.0, during))
    if len(window) == 2:
        inside = [op for op in rig.checker.snapshot() if window[0] <= op.t_issue
                  and op.t_done <= window[1]]
        bad = [op for op in inside if not op.good]
        assert not bad, f"{len(bad)} commands failed with only the witness cut off: {_op(bad[0])}"
        assert {op.path for op in inside if op.kind == "write"} == set(NODES), \
            "writes through both nodes while the witness was cut off"
    _finish(rig, out)


def test_all_three_apart_nobody_serves(rig: FaultRig, report: Report) -> None:
    """a, b and the witness all apart: nobody serves after peer_timeout + 1 s at most."""
    marks: list[float] = []

    def during(t0: float) -> None:
        limit = t0 + PEER_TIMEOUT + 1.0
        wait_until(lambda: not rig.serving(), "nobody serves", limit - time.monotonic())
        marks.append(limit)
        rig.hold(2.0, "nobody serves", lambda: not rig.serving())
        for n in NODES:
            assert rig.alua(n) == "unavailable", (n, rig.alua(n))
            w = rig.checker.command(n, "write")
            assert not w.good, f"write through {n} while all are apart: {_op(w)}"
        marks.append(time.monotonic())

    out = report.add(rig.run(Fault("isolate"), 2, 1.0, 6.0, during))
    if len(marks) == 2:
        late = [op for op in rig.checker.snapshot()
                if op.good and marks[0] < op.t_done <= marks[1]]
        assert not late, f"served {PEER_TIMEOUT + 1:g} s after all three parted: {_op(late[0])}"
    _finish(rig, out)


def test_one_way_loss_between_nodes(rig: FaultRig, report: Report) -> None:
    """Packets from a to b vanish, b's reach a: exactly one side serves, never both."""
    def during(t0: float) -> None:
        winner = rig.wait_one_serving(t0 + PEER_TIMEOUT + 4.0)
        loser = "b" if winner == "a" else "a"
        print(f"  one-way a->b: node {winner} serves")
        rig.hold(2.0, f"only {winner} serves", lambda: rig.serving() == {winner})
        assert rig.alua(loser) == "unavailable", rig.alua(loser)
        w = rig.checker.command(loser, "write")
        assert not w.good, f"write through {loser}: {_op(w)}"

    out = report.add(rig.run(Fault("one-way", "a", "b"), 3, 1.0, 7.0, during))
    _finish(rig, out)


def test_paused_node_wakes_up_fenced(rig: FaultRig, report: Report) -> None:
    """a is stopped (SIGSTOP) long enough for b to take over, then continued: reads of blocks
    b wrote alone, queued at a while it was stopped and sent right after it woke up, must
    not be answered from a's old data, nor the write queued with them acknowledged."""
    out = report.add(rig.run(Fault("pause", "a"), 4, 1.0, 6.0))
    print("  commands queued at the paused node: " + "; ".join(_op(p) for p in out.probes))
    assert out.probes, "b never acknowledged a write alone while a was paused"
    _finish(rig, out)


# --------------------------------------------------------------------- randomized
def _count() -> int:
    soak = os.environ.get("VSAND_FAULT_SOAK") == "1"
    return int(os.environ.get("VSAND_FAULT_COUNT", "1000" if soak else "200"))


def test_random_faults(tmp_path: Path, report: Report) -> None:
    count = _count()
    first = int(os.environ.get("VSAND_FAULT_SEED", str(random.randrange(1, 1 << 30))))
    batch = int(os.environ.get("VSAND_FAULT_BATCH", "25"))
    # One network between the nodes, then two (every other cluster), unless set.
    forced = int(os.environ.get("VSAND_FAULT_NETWORKS", "0"))
    print(f"\nrandom faults: {count} scenarios from seed {first}, up to {batch} per cluster")
    failures: list[str] = []
    seeds = list(range(first, first + count))
    n = 0
    while seeds:
        networks = forced or 1 + n % 2
        rig = FaultRig(tmp_path / f"cluster{n}", networks)
        n += 1
        try:
            for _ in range(batch):
                if not seeds:
                    break
                seed = seeds.pop(0)
                fault, delay, duration = draw(seed, networks)
                out = report.add(rig.run(fault, seed, delay, duration))
                if not out.ok:
                    failures.append(out.explain())
                    break  # this cluster may be beyond repair: the next seeds get a new one
            if rig.cluster.roles() == {node: ["in-sync"] for node in NODES}:
                final = rig.finish()
                if any(final.values()):
                    failures.append(f"after the clean stop of cluster{n - 1}: " + "; ".join(
                        f"{k}: {v[:5]}" for k, v in final.items() if v))
        finally:
            rig.close()
    report.final.append(f"random: {count} scenarios from seed {first} on {n} cluster(s)")
    assert not failures, "\n\n".join(failures)
