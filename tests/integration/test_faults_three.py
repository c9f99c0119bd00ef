"""Faults against three nodes that vote among themselves, checked by a client that writes
through all three.

Theory of operation
-------------------
The rig is the two-node one's (``test_faults.py`` tells how the checker, the probes and the
verdicts work; the shared code is ``faultcheck.py``) with three data nodes and no witness:
nodes ``a``, ``b`` and ``w``, node ``w`` in the namespace ``FaultNet`` names after the witness,
so every pair of nodes has a path of its own that can be cut, and the client in ``c`` reaches
all three portals.  A node serves only while it is a member of the newest view a majority
decided and holds the leases of a majority; writes go to every member of the view; the lowest
member (``a`` while it is in the view) is the source.  A node outside the view answers
NOT READY.

What must hold after every scenario (healed, the three in sync, serving and idle):

* no lost write: all three backing files hold every block at its latest acknowledged version
  or a later one (once more after a clean stop);
* no divergence: the three backing files identical, every block at a version that was written;
* no stale read, and no read of a version not yet written;
* no two sides at once: a fault splits the nodes into sides (a node cut off, killed, paused
  or isolated against the other two; ``a`` against ``b`` when only a|b is cut, ``w`` reaching
  both and taking no side); once a node of one side acknowledged a write issued in the window
  (the fault until its repair starts), no node of another side acknowledges a write of the
  window, nor anything issued after that acknowledgement; and a node the fault leaves alone
  (cut off, killed, paused, isolated) acknowledges no write issued more than
  ``ALONE_GRACE_S`` after the fault while it lasts.  A write issued after the fault cannot
  complete in the old view (a member is unreachable), so only a node serving in a view of its
  own could acknowledge one.

The majority side must go on: a write acknowledged while the fault lasts, when it lasts longer
than the takeover time (the peer timeout, the lease wait of up to 1.25 x 0.8 x the peer
timeout, a round and the checker's pace); a stall beyond ``STALL_LIMIT_S`` is reported as one.
Stalls of several seconds during a view change are expected: the report gives the longest per
fault type.  Killing all three and restarting them checks that every acknowledged write
survives.

Deterministic scenarios share one cluster (a new one after a scenario that failed); the clean
stop of the last one checks the files again.  ``test_random_faults_three_nodes`` draws
``VSAND_FAULT3_COUNT`` scenarios (24) from seeds (``VSAND_FAULT3_SEED`` is the first; each
prints ``seed=N``, and ``VSAND_FAULT3_SEED=N VSAND_FAULT3_COUNT=1`` replays that draw on a fresh
cluster); ``VSAND_FAULT3_BATCH`` scenarios share one cluster (12; a failed scenario ends its
cluster).  ``VSAND_FAULT_LOG=debug`` sets the daemons' log level; ``VSAND_FAULT3_REPORT`` names
a file for the report.  Each scenario's commands are written to ``history-<seed>.tsv`` in its
cluster's directory.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import faultcheck
from faultcheck import (  # sigterm_cleans_up: an autouse fixture
    NOT_READY, Outcome, Report, Timing, _op, sigterm_cleans_up,
)
from rig import wait_until

NODES = ("a", "b", "w")
SOURCE = "a"  # the lowest name: the source whenever it is in the view
PEER_TIMEOUT = 2.0
HEARTBEAT_INTERVAL = 0.25
LEASE_WAIT_S = 1.25 * 0.8 * PEER_TIMEOUT
# The lost member declared so, its lease waited out, a round decided, the new epoch started
# (its members brought level) and the checker's pace.
TAKEOVER_S = PEER_TIMEOUT + LEASE_WAIT_S + 2.5
STALL_LIMIT_S = TAKEOVER_S + 8.0
TIMING = Timing(PEER_TIMEOUT, HEARTBEAT_INTERVAL, TAKEOVER_S, STALL_LIMIT_S,
                after_sync_s=0.5, wake_reads_s=2.0)
OUTSIDE_VIEW_STATES = ("unavailable", "transitioning")


def _others(x: str) -> list[str]:
    return [n for n in NODES if n != x]


# --------------------------------------------------------------------- faults
@dataclass(frozen=True)
class Fault:
    """``cut-node`` x from both other nodes (both ways; the client still reaches it),
    ``cut-pair`` x|y only, ``one-way`` x->y (x's packets to y vanish), ``one-way-node``
    x->both others, ``isolate`` x from everything, the client included, ``kill``/``pause``
    node x (SIGKILL, then a restart; SIGSTOP, then SIGCONT), ``slow`` the pair x-y (``rate``
    bit/s each way), ``stutter`` x (stopped for a fraction of the peer timeout again and
    again), ``kill-all`` (the three SIGKILLed, then restarted)."""
    kind: str
    x: str = ""
    y: str = ""
    rate: int = 0

    @property
    def label(self) -> str:
        rest = ",".join(_others(self.x))
        return {"cut-node": f"cut {self.x}|{rest}", "cut-pair": f"cut {self.x}|{self.y}",
                "one-way": f"one-way {self.x}->{self.y}",
                "one-way-node": f"one-way {self.x}->{rest}", "isolate": f"isolate {self.x}",
                "kill": f"kill {self.x}", "pause": f"pause {self.x}",
                "slow": f"slow {self.x}-{self.y} {self.rate / 1e6:g} Mbit/s",
                "stutter": f"stutter {self.x}", "kill-all": "kill all three"}[self.kind]

    @property
    def type(self) -> str:
        """The label less the names, but whether the source is the one hit (for the stall
        table): losing the source means a new one orders the writes."""
        if self.kind == "kill-all":
            return self.kind
        hit = {self.x, self.y} - {""}
        return f"{self.kind} ({'source' if SOURCE in hit else 'not the source'})"

    @property
    def sides(self) -> list[frozenset[str]]:
        if self.kind in ("cut-node", "one-way-node", "isolate", "kill", "pause"):
            return [frozenset({self.x}), frozenset(_others(self.x))]
        if self.kind == "cut-pair":
            return [frozenset({self.x}), frozenset({self.y})]
        # One way between a pair keeps the old view working for some writes until a member
        # is dropped: x's writes still complete through the source and y's acknowledgements
        # to x (when neither is the source), and y serves them; nothing is "alone" there.
        # Lost writes, stale reads and divergence are checked as for every fault.
        return []

    @property
    def minority(self) -> frozenset[str]:
        """A node the two others no longer hear; with a pair cut, either may be left out."""
        if self.kind in ("cut-node", "one-way-node", "isolate", "kill", "pause"):
            return frozenset({self.x})
        return frozenset()

    @property
    def apart(self) -> bool:
        return bool(self.sides)

    @property
    def goes_on(self) -> bool:
        """Two nodes keep talking to each other in every fault but the killing of all."""
        return self.kind != "kill-all"

    def apply(self, rig: faultcheck.FaultRig) -> None:
        net, c = rig.net, rig.cluster
        if self.kind == "cut-node":
            for o in _others(self.x):
                net.cut(self.x, o)
        elif self.kind == "cut-pair":
            net.cut(self.x, self.y)
        elif self.kind == "one-way":
            net.cut_one_way(self.x, self.y)
        elif self.kind == "one-way-node":
            for o in _others(self.x):
                net.cut_one_way(self.x, o)
        elif self.kind == "isolate":
            for o in (*_others(self.x), "c"):
                net.cut(self.x, o)
        elif self.kind == "kill":
            c.nodes[self.x].kill()
        elif self.kind == "pause":
            pid = c.nodes[self.x].pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            rig.paused.add(self.x)
        elif self.kind == "slow":
            net.throttle(self.x, self.y, self.rate)
        elif self.kind == "stutter":
            rig.stutter(self.x)
        elif self.kind == "kill-all":
            for n in NODES:
                c.nodes[n].kill()
        else:
            raise ValueError(self.kind)

    def heal(self, rig: faultcheck.FaultRig) -> None:
        c = rig.cluster
        if self.kind in ("cut-node", "cut-pair", "one-way", "one-way-node", "isolate"):
            rig.net.heal()
        elif self.kind == "kill":
            c.nodes[self.x].restart()
        elif self.kind == "pause":
            pid = c.nodes[self.x].pid
            assert pid is not None
            os.kill(pid, signal.SIGCONT)
            rig.paused.discard(self.x)
        elif self.kind == "slow":
            rig.net.unthrottle()
        elif self.kind == "stutter":
            rig.stop_stutter()
        elif self.kind == "kill-all":
            for n in NODES:
                c.nodes[n].restart()


def draw(seed: int) -> tuple[Fault, float, float]:
    """A scenario from its seed: the fault, the delay before it, how long it lasts."""
    rng = random.Random(seed)
    kind = rng.choices(["cut-node", "cut-pair", "one-way", "one-way-node", "isolate", "kill",
                        "pause", "slow", "stutter", "kill-all"],
                       weights=[4, 4, 2, 2, 2, 3, 3, 2, 1, 1])[0]
    x = rng.choice(NODES)
    y = rng.choice(_others(x))
    if kind in ("cut-pair", "one-way"):
        fault = Fault(kind, x, y)
    elif kind == "slow":
        # Below what the checker writes (every write crosses every pair): replication queues.
        x, y = sorted((x, y))
        fault = Fault(kind, x, y, rate=rng.choice([500_000, 1_000_000, 2_000_000, 4_000_000]))
    elif kind == "kill-all":
        fault = Fault(kind)
    else:
        fault = Fault(kind, x)
    duration = (rng.uniform(0.2, 2.0) if kind == "kill-all" else
                rng.uniform(1.0, 6.0) if kind in ("kill", "pause") else rng.uniform(1.0, 8.0))
    return fault, rng.uniform(0.3, 1.0), duration


# --------------------------------------------------------------------- one cluster
class FaultRig(faultcheck.FaultRig):
    """``FaultNet`` + nodes a, b and w (in namespaces a, b and w) + the checker."""

    excerpt_keys = ("WARNING", "ERROR", "membership", "quorum", "view", "epoch", " -> ",
                    "lost", "start", "resync")

    def __init__(self, base: Path) -> None:
        super().__init__(base, NODES, TIMING, witness=False,
                         replay=lambda seed: f"VSAND_FAULT3_SEED={seed} VSAND_FAULT3_COUNT=1")

    def view(self, node: str) -> list[str]:
        (state,) = self.cluster.lun_states(node)
        return list(state["view"]["members"]) if state["view"] else []

    def wait_view(self, members: set[str], deadline: float) -> None:
        """Until exactly ``members`` serve, each in a view of exactly them (by monotonic
        ``deadline``)."""
        while True:
            s = self.serving()
            views = {n: self.view(n) for n in members}
            if s == members and all(set(v) == members for v in views.values()):
                return
            assert time.monotonic() < deadline, \
                f"serving: {sorted(s) or 'nobody'}, views {views}; wanted {sorted(members)}"
            time.sleep(0.1)

    def wait_two_serving(self, deadline: float) -> set[str]:
        """Until exactly two nodes serve, in a view of the two; the two."""
        while True:
            s = self.serving()
            if len(s) == 2 and all(set(self.view(n)) == s for n in s):
                return s
            assert time.monotonic() < deadline, f"serving: {sorted(s) or 'nobody'}, " \
                "wanted two nodes in a view of their own"
            time.sleep(0.1)

    def assert_fenced(self, node: str) -> None:
        """``node`` is outside the view: ALUA unavailable or transitioning, and a write and
        a read through it answered NOT READY."""
        assert not self.quorum(node)["serving"], self.quorum(node)
        assert self.alua(node) in OUTSIDE_VIEW_STATES, self.alua(node)
        w = self.checker.command(node, "write")
        r = self.checker.command(node, "read")
        assert w.outcome.startswith(f"check {NOT_READY:x}/"), f"write through {node}: {_op(w)}"
        assert r.outcome.startswith(f"check {NOT_READY:x}/"), f"read through {node}: {_op(r)}"


report = faultcheck.report_fixture("three-node fault injection", "VSAND_FAULT3_REPORT")


class _Shared:
    """One cluster for the deterministic scenarios, replaced after one that failed: a cluster
    start costs as much as a scenario."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.rig: FaultRig | None = None
        self.made = 0
        self.final: dict[str, list[str]] = {}

    def get(self) -> FaultRig:
        if self.rig is not None and not self.rig.closed:
            return self.rig
        self.rig = FaultRig(self.base / f"cluster{self.made}")
        self.made += 1
        return self.rig

    def discard(self) -> None:
        if self.rig is not None:
            self.rig.close()
            self.rig = None

    def finish(self) -> None:
        if self.rig is None:
            return
        try:
            self.final = self.rig.finish()
        finally:
            self.discard()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Shared]:
    s = _Shared(tmp_path_factory.mktemp("faults3"))
    try:
        yield s
        s.finish()
    finally:
        s.discard()
    bad = {k: v for k, v in s.final.items() if v}
    assert not bad, f"after the clean stop of the shared cluster: {bad}"


def _scenario(shared: _Shared, report: Report, fault: Fault, seed: int, delay: float,
              duration: float, during: Callable[[FaultRig, float], None] | None = None
              ) -> tuple[FaultRig, Outcome]:
    """One deterministic scenario on the shared cluster; it fails the test if it went wrong
    (and the cluster is not used again)."""
    rig = shared.get()
    out = report.add(rig.run(fault, seed, delay, duration,
                             None if during is None else lambda t0: during(rig, t0)))
    if not out.ok:
        if not out.logs:
            rig.tell(out)
        shared.discard()
    assert out.ok, out.explain()
    return rig, out


def _acked_writes(rig: FaultRig, path: str, t0: float, t1: float) -> int:
    return sum(op.good and op.kind == "write" and op.path == path and t0 <= op.t_issue
               and op.t_done <= t1 for op in rig.checker.snapshot())


# --------------------------------------------------------------------- deterministic
def test_source_killed_while_the_others_write(shared: _Shared, report: Report) -> None:
    """SIGKILL the source a while the checker writes through all three: b and w decide a view
    of the two within the takeover time, their writes go on, b orders them; a returns by a
    resync."""
    marks: list[float] = []

    def during(rig: FaultRig, t0: float) -> None:
        rig.wait_view({"b", "w"}, t0 + TAKEOVER_S)
        marks.append(time.monotonic())
        want = {"b": ["degraded"], "w": ["degraded"]}
        wait_until(lambda: rig.cluster.roles() == want, f"roles {want}",
                   t0 + TAKEOVER_S - time.monotonic())
        (state,) = rig.cluster.lun_states("w")
        assert state["source"] == "b", state
        rig.hold(1.5, "b and w serve", lambda: rig.serving() == {"b", "w"})
        marks.append(time.monotonic())

    rig, out = _scenario(shared, report, Fault("kill", "a"), 0, 1.0, 6.0, during)
    for n in ("b", "w"):
        assert _acked_writes(rig, n, marks[0], marks[1]), f"no write acknowledged through {n}"
    print(f"  view of b and w serving {marks[0] - out.window[0]:.2f} s after the kill")


def test_pair_cut_drops_one_of_the_two(shared: _Shared, report: Report) -> None:
    """a|b while both still reach w: the view drops one of a and b, the two that remain
    linked go on, the one left out answers NOT READY."""
    seen: list[str] = []

    def during(rig: FaultRig, t0: float) -> None:
        two = rig.wait_two_serving(t0 + TAKEOVER_S)
        assert "w" in two and len(two & {"a", "b"}) == 1, two
        (loser,) = {"a", "b"} - two
        seen.append(loser)
        rig.hold(1.5, f"{sorted(two)} serve", lambda: rig.serving() == two)
        rig.assert_fenced(loser)

    _scenario(shared, report, Fault("cut-pair", "a", "b"), 1, 1.0, 6.0, during)
    print(f"  left out of the view: {seen[0]}")


def test_isolated_node_is_left_out(shared: _Shared, report: Report) -> None:
    """w cut from a, b and the client: a and b go on as a view of two; w stops serving (its
    admin socket still answers)."""
    def during(rig: FaultRig, t0: float) -> None:
        rig.wait_view({"a", "b"}, t0 + TAKEOVER_S)
        wait_until(lambda: not rig.quorum("w")["serving"], "w stops serving",
                   t0 + TAKEOVER_S - time.monotonic())
        rig.hold(1.5, "a and b serve, w not",
                 lambda: rig.serving() == {"a", "b"} and not rig.quorum("w")["serving"])
        assert rig.alua("w") in OUTSIDE_VIEW_STATES, rig.alua("w")

    _scenario(shared, report, Fault("isolate", "w"), 2, 1.0, 6.0, during)


def test_paused_source_wakes_up_fenced(shared: _Shared, report: Report) -> None:
    """a stopped (SIGSTOP) long enough for b and w to go on without it, then continued: reads
    of blocks they wrote, queued at a while it was stopped, must not be answered from a's old
    data, nor the write queued with them acknowledged out of the view."""
    _, out = _scenario(shared, report, Fault("pause", "a"), 3, 1.0, 6.0)
    print("  commands queued at the paused node: " + "; ".join(_op(p) for p in out.probes))
    assert out.probes, "b and w never acknowledged a write while a was paused"


def test_whole_cluster_killed(shared: _Shared, report: Report) -> None:
    """All three SIGKILLed while writes run through all three, then restarted: every
    acknowledged write is on all three replicas."""
    _, out = _scenario(shared, report, Fault("kill-all"), 4, 1.5, 1.0)
    assert out.writes, "nothing acknowledged before the kill"


# --------------------------------------------------------------------- randomized
def test_random_faults_three_nodes(tmp_path: Path, report: Report) -> None:
    count = int(os.environ.get("VSAND_FAULT3_COUNT", "24"))
    first = int(os.environ.get("VSAND_FAULT3_SEED", str(random.randrange(1, 1 << 30))))
    batch = int(os.environ.get("VSAND_FAULT3_BATCH", "12"))
    print(f"\nrandom three-node faults: {count} scenarios from seed {first}, up to {batch} "
          "per cluster")
    failures: list[str] = []
    seeds = list(range(first, first + count))
    n = 0
    while seeds:
        rig = FaultRig(tmp_path / f"cluster{n}")
        n += 1
        try:
            for _ in range(batch):
                if not seeds:
                    break
                seed = seeds.pop(0)
                fault, delay, duration = draw(seed)
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
