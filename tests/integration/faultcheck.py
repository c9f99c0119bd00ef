"""The fault rig's machinery shared by two-node (``test_faults.py``) and three-node
(``test_faults_three.py``) clusters: the iSCSI client, the checker writing versioned blocks
through every node's path, the verdicts on its history and on the backing files, one cluster
in ``FaultNet`` running scenarios, and the report.  ``test_faults.py``'s docstring is the
theory of operation; here the node list, the timings and the faults are parameters.

A fault is any object with the attributes of ``FaultLike``: ``sides`` are the groups of nodes
it keeps apart (empty: nobody is kept apart), and a node of one group must not acknowledge
anything issued after a node of another group acknowledged a write issued in the window;
``minority``: nodes it leaves without a majority, which acknowledge no write issued in it.
``goes_on``: some node must go on serving while it lasts (a write acknowledged within the
takeover time, and no stall beyond the stall limit).
"""

from __future__ import annotations

import bisect
import contextlib
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
from typing import Any, Protocol

import pytest

from rawiscsi import DATA_IN, LOGIN_RSP, NOP_IN, SCSI_CMD, SCSI_RSP, RawInitiator, parse_keys
from rig import LunSpec, VsandCluster, wait_until
from rig.netns import NetnsUnavailable
from rig.netns3 import FaultNet

MiB = 1 << 20
BS = 4096
LUN = LunSpec(0, 16 * MiB, BS)
BLOCKS = 512  # the checker's blocks: the LUN's first 2 MiB
IQN = "iqn.2026-11.org.vsand:mirror"
QUEUE_DEPTH = 4
PACE_S = 0.004  # between commands of one path: a few hundred per second, not a CPU hog
FAIL_BACKOFF_S = 0.05
OP_TIMEOUT = 10.0
LOGIN_TIMEOUT = 5.0
SYNC_DEADLINE_S = 60.0
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
    """Writers and readers through every node's path (``portals``), and the record of what
    they saw."""

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
        for i, node in enumerate(self.portals):
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
# A write issued this long after the fault may no longer reach the nodes it cut off (a
# SIGSTOP takes a moment, a command sent just before the cut still arrives).
ALONE_GRACE_S = 0.5
# From the fault until its repair starts: its label, the groups of nodes it keeps apart, and
# the nodes it leaves without a majority.
Window = tuple[float, float, str, list[frozenset[str]], frozenset[str]]


def check_history(ops: list[Op], windows: list[Window]) -> dict[str, list[str]]:
    """Stale or impossible reads in the whole history; in a window, two sides serving, or a
    node without a majority acknowledging a write issued after ``ALONE_GRACE_S``."""
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
    for t0, t1, label, sides, minority in windows:
        side_of = {n: i for i, side in enumerate(sides) for n in side}
        inside = [op for op in ops if op.good and t0 <= op.t_issue and op.t_done <= t1]
        alone = [op for op in inside if op.kind == "write" and op.path in minority
                 and op.t_issue >= t0 + ALONE_GRACE_S]
        if alone:
            out["two sides"].append(
                f"{label}: node(s) {','.join(sorted(minority))} without a majority acknowledged "
                f"{len(alone)} write(s) issued in the window, first {_op(alone[0])}")
        # A node in no group (reaching both, e.g. w while only a|b is cut) may go either way.
        writes = [op for op in inside if op.kind == "write" and op.path in side_of]
        writers = {side_of[op.path] for op in writes}
        if len(writers) > 1:
            out["two sides"].append(f"{label}: writes issued in the window acknowledged on "
                                    f"{len(writers)} sides: " + "; ".join(
                                        _op(min((o for o in writes if side_of[o.path] == i),
                                                key=lambda o: o.t_done))
                                        for i in sorted(writers)))
        for i, side in enumerate(sides):
            theirs = [op for op in writes if side_of[op.path] != i]
            if not theirs:
                continue
            first = min(theirs, key=lambda o: o.t_done)
            late = [op for op in inside if op.path in side and op.t_issue > first.t_done]
            if late:
                out["two sides"].append(
                    f"{label}: node(s) {','.join(sorted(side))} acknowledged {len(late)} "
                    f"command(s) issued after node {first.path} of another side acknowledged "
                    f"a write alone ({_at(first.t_done)}), first {_op(late[0])}")
    return out


def check_files(files: dict[str, bytes], checker: Checker) -> dict[str, list[str]]:
    """Lost writes, impossible versions and divergence in the replicas' backing files."""
    out: dict[str, list[str]] = {"lost writes": [], "divergences": [], "impossible blocks": []}
    datas = list(files.values())
    if any(d != datas[0] for d in datas[1:]):
        size = max(len(d) for d in datas)
        diff = [i // BS for i in range(0, size, BS)
                if any(d[i:i + BS] != datas[0][i:i + BS] for d in datas[1:])]
        for k in diff[:20]:
            out["divergences"].append(f"block {k}: " + ", ".join(
                f"{n} {version_of(k, d[k * BS:(k + 1) * BS])}" for n, d in files.items()))
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


# --------------------------------------------------------------------- one cluster
@dataclass(frozen=True)
class Timing:
    """A cluster's timeouts and the rig's bounds derived from them."""
    peer_timeout: float
    heartbeat_interval: float
    # A side that keeps a majority acknowledges writes alone within this.
    takeover_s: float
    # Writes stop for longer than this only when nobody may serve: anything else is a node
    # stuck on something it should have given up.
    stall_limit_s: float
    after_sync_s: float  # traffic once all are in sync again, before stopping
    wake_reads_s: float  # reads through the node that was apart, after the repair


class FaultLike(Protocol):
    @property
    def kind(self) -> str: ...

    @property
    def x(self) -> str: ...

    @property
    def label(self) -> str: ...

    @property
    def type(self) -> str: ...

    @property
    def apart(self) -> bool: ...

    @property
    def sides(self) -> list[frozenset[str]]: ...

    @property
    def minority(self) -> frozenset[str]: ...

    @property
    def goes_on(self) -> bool: ...

    def apply(self, rig: Any) -> None: ...

    def heal(self, rig: Any) -> None: ...


@dataclass
class Outcome:
    seed: int
    label: str
    type: str
    replay: str = ""  # the environment that draws this scenario again
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
        lines = [f"seed={self.seed} scenario={self.label}: (replay: {self.replay})"]
        for what, items in self.problems.items():
            lines += [f"  {what}: {item}" for item in items[:12]]
            if len(items) > 12:
                lines.append(f"  {what}: ... {len(items)} in all")
        return "\n".join(lines) + "\n" + self.logs


class FaultRig:
    """``FaultNet`` + a cluster of ``nodes`` (each in the ``FaultNet`` namespace of its name)
    + the checker.  ``witness``: a witness process in namespace ``w`` (two nodes); three
    nodes vote among themselves.  ``networks`` 2: a second network between nodes a and b
    (each one's ``address`` lists both).  ``replay(seed)`` names the environment that draws
    a scenario again."""

    excerpt_keys: tuple[str, ...] = ("WARNING", "ERROR", "quorum", " -> ", "vote", "node ",
                                     "lost", "start")

    def __init__(self, base: Path, nodes: tuple[str, ...], timing: Timing, *,
                 witness: bool, networks: int = 1,
                 replay: Callable[[int], str] = lambda seed: "") -> None:
        self.nodes = nodes
        self.timing = timing
        self.networks = networks
        self.replay = replay
        try:
            self.net = FaultNet(second_subnet="10.233.0.0/24" if networks > 1 else None)
        except NetnsUnavailable as e:
            pytest.skip(str(e))
        self.paused: set[str] = set()
        self._stutter: tuple[threading.Thread, threading.Event] | None = None
        self.late_blocks: list[int] = []  # written alone by one side while nodes were apart
        self.healthy_at = 0.0  # when all were last seen in sync and serving
        self.closed = False
        try:
            addr = self.net.addresses
            self.cluster = VsandCluster(
                base, names=nodes, luns=(LUN,), witness=witness, witness_host=addr["w"],
                witness_netns=self.net.witness_netns if witness else None,
                hosts={n: addr[n] for n in nodes}, target_factory=self.net.vsand_target,
                peer_timeout=timing.peer_timeout, heartbeat_interval=timing.heartbeat_interval,
                more_hosts=self.net.addresses2 or None,
                extra_config={"log_level": os.environ.get("VSAND_FAULT_LOG", "info")})
            self.cluster.start()
            self.checker = Checker(self.net, {n: (addr[n], self.cluster.nodes[n].port)
                                              for n in nodes})
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
        return {n for n in self.nodes if self.cluster.nodes[n].running()
                and n not in self.paused and self.quorum(n)["serving"]}

    def wait_healthy(self, deadline_s: float = SYNC_DEADLINE_S) -> None:
        self.cluster.wait_in_sync(deadline_s)
        wait_until(lambda: self.serving() == set(self.nodes), "every node serves", deadline_s)

    def state(self) -> tuple[Any, ...]:
        """What must hold still while the replicas are compared: roles, epochs, votes."""
        return tuple((n, tuple((m["role"], m["epoch"]) for m in self.cluster.lun_states(n)),
                      self.quorum(n)["epoch"]) for n in self.nodes)

    def settle(self, deadline_s: float = SYNC_DEADLINE_S) -> tuple[Any, ...]:
        """Until every node is in sync and serving, and stays so for ``after_sync_s`` (the
        checker writing meanwhile): a link that comes up twice may undo the first sync."""
        end = time.monotonic() + deadline_s
        while True:
            self.wait_healthy(max(1.0, end - time.monotonic()))
            self.healthy_at = time.monotonic()
            before = self.state()
            time.sleep(self.timing.after_sync_s)
            now = self.state()
            if now == before and self.serving() == set(self.nodes):
                return now
            assert time.monotonic() < end, f"state kept changing: {before} -> {now}"

    def compare(self, settled: tuple[Any, ...], tries: int = 3) -> dict[str, list[str]]:
        """The backing files checked, every node in sync and idle (``settled``) while they
        are read; if the state moved meanwhile, settle again and read again."""
        for _ in range(tries):
            files = {n: self.cluster.backing_path(n).read_bytes() for n in self.nodes}
            if self.state() == settled:
                return check_files(files, self.checker)
            settled = self.settle()
        return {"stuck": [f"no stable state to compare the replicas in: {settled}"]}

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
    def run(self, fault: FaultLike, seed: int, delay: float, duration: float,
            during: Callable[[float], None] | None = None) -> Outcome:
        print(f"seed={seed} scenario={fault.label} delay={delay:.2f}s duration={duration:.2f}s",
              flush=True)
        out = Outcome(seed, fault.label, fault.type, self.replay(seed))
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
                loser = self._written_alone(t0, t0 + duration - 0.2, fault.sides)
                if probe is not None and loser == fault.x:
                    probes = self._queue_probes(probe, loser)
                if not loser and fault.goes_on and duration > self.timing.takeover_s:
                    out.problems["no takeover"] = [
                        f"{fault.label}: nobody acknowledged a write alone within "
                        f"{duration - 0.2:.1f} s, though one side keeps the votes it needs"]
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
                waker.join(self.timing.wake_reads_s + OP_TIMEOUT + 5)
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
        if fault.goes_on and out.stall_s > self.timing.stall_limit_s:
            out.problems["long stalls"] = [f"{fault.label}: no write acknowledged for "
                                           f"{out.stall_s:.1f} s"]
        history = check_history([op for op in ops if op.kind == "write" or op.t_issue >= start],
                                [(t0, t1, fault.label, fault.sides, fault.minority)]
                                if fault.apart else [])
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

    def _written_alone(self, t0: float, until: float, sides: list[frozenset[str]]) -> str:
        """Once a node of one of ``sides`` acknowledged writes alone (issued well after ``t0``:
        one issued at once may still have reached the others, SIGSTOP takes a moment), note
        the blocks written in ``late_blocks``; a node of another side (the first by name),
        which did not write them, or "" if none did by ``until``."""
        def alone() -> list[Op]:
            return [op for op in self.checker.snapshot() if op.good and op.kind == "write"
                    and op.t_issue >= t0 + ALONE_GRACE_S]

        while time.monotonic() < until:
            if any(op.path in side for op in alone() for side in sides):
                time.sleep(0.2)  # a few more
                ops = alone()
                self.late_blocks = list(dict.fromkeys(op.block for op in reversed(ops)))[:32]
                writer = next(op.path for op in reversed(ops)
                              if any(op.path in side for side in sides))
                return min(n for side in sides if writer not in side for n in side)
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
            self._wake_reads(sess, node, self.timing.wake_reads_s)
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
        keys = self.excerpt_keys
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
                    done.wait(rng.uniform(0.1, 0.5) * self.timing.peer_timeout)
                finally:
                    os.kill(pid, signal.SIGCONT)
                done.wait(rng.uniform(0.1, 0.5) * self.timing.peer_timeout)

        thread = threading.Thread(target=cycle, name=f"stutter-{node}", daemon=True)
        self._stutter = (thread, done)
        thread.start()

    def stop_stutter(self) -> None:
        if self._stutter is not None:
            thread, done = self._stutter
            done.set()
            thread.join(self.timing.peer_timeout + 5)
            self._stutter = None

    # --- the end ------------------------------------------------------------------------
    def finish(self) -> dict[str, list[str]]:
        """Stop cleanly (every node must exit 0), then check the backing files once more."""
        self.checker.stop()
        self.cluster.stop()
        files = {n: self.cluster.backing_path(n).read_bytes() for n in self.nodes}
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


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
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


@pytest.fixture(autouse=True)
def sigterm_cleans_up() -> Iterator[None]:
    """Every fault test under ``sigterm_as_interrupt`` (import it into the test module)."""
    with sigterm_as_interrupt():
        yield


def report_fixture(title: str, env: str) -> Any:
    """A module's ``report`` fixture: the scenarios run, their seeds and what they found, in
    pytest's closing summary under ``title`` and in the file named by ``env`` if set."""
    collected = Report()

    @pytest.fixture(scope="module")
    def report(request: pytest.FixtureRequest) -> Iterator[Report]:
        yield collected
        publish(request.config, title, collected, env)
    return report


def publish(config: pytest.Config, title: str, report: Report, env: str) -> None:
    """A module's scenarios, their seeds and what they found: in pytest's closing summary (the
    conftest prints ``config.vsand_reports``) and in the file named by ``env`` if set."""
    text = report.text()
    reports = getattr(config, "vsand_reports", [])
    reports.append((title, text))
    config.vsand_reports = reports  # type: ignore[attr-defined]
    path = os.environ.get(env)
    if path:
        Path(path).write_text(text + "\n")
