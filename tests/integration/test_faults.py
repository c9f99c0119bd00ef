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

The client, the checker, the verdicts and the rig are ``faultcheck.py``, shared with the
three-node scenarios (``test_faults_three.py``); here are the two-node faults and timings.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import faultcheck
from faultcheck import (  # sigterm_cleans_up: an autouse fixture
    NOT_READY, Outcome, Report, Timing, _op, sigterm_cleans_up,
)
from rig import wait_until

NODES = ("a", "b")
# Two profiles.  CI's (the default) keeps faults and timeouts short so that 200 scenarios fit
# in the suite; the soak (VSAND_FAULT_SOAK=1) runs the timings of a real deployment.  A seed
# replays with the profile it ran under.
SOAK = os.environ.get("VSAND_FAULT_SOAK") == "1"
PEER_TIMEOUT = 2.0 if SOAK else 1.0
HEARTBEAT_INTERVAL = 0.25 if SOAK else 0.2
SCALE = PEER_TIMEOUT / 2.0  # of the fault delays and durations drawn
# A node separated from its peer but not from the witness serves alone within this (the
# peer timeout, the witness's answer, the lost peer's lease, and the checker's pace).
TAKEOVER_S = 2 * PEER_TIMEOUT + 1.0
# Writes stop for longer than this only when nobody may serve (all three apart): anything
# else is a node stuck on something it should have given up.
STALL_LIMIT_S = TAKEOVER_S + 5.0
AFTER_SYNC_S = 1.0 if SOAK else 0.5  # traffic once both are in sync again, before stopping
WAKE_READS_S = 2.5 if SOAK else 1.5  # reads through the node that was apart, after the repair
TIMING = Timing(PEER_TIMEOUT, HEARTBEAT_INTERVAL, TAKEOVER_S, STALL_LIMIT_S, AFTER_SYNC_S,
                WAKE_READS_S)


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

    @property
    def sides(self) -> list[frozenset[str]]:
        """While the nodes are apart, each one is a side of its own (the witness takes none)."""
        return [frozenset({n}) for n in NODES] if self.apart else []

    @property
    def minority(self) -> frozenset[str]:
        """None known in advance: which node the witness backs is the vote's outcome."""
        return frozenset()

    @property
    def goes_on(self) -> bool:
        """Whether a node keeps what it needs to serve: the witness hears one side at least."""
        return self.kind != "isolate"

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
class FaultRig(faultcheck.FaultRig):
    """``FaultNet`` + a two-node cluster with its witness + the checker; ``networks`` 2: a
    second network between the nodes (each node's ``address`` lists both)."""

    def __init__(self, base: Path, networks: int = 1) -> None:
        super().__init__(base, NODES, TIMING, witness=True, networks=networks,
                         replay=lambda seed: _replay(seed, networks))

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


def _replay(seed: int, networks: int) -> str:
    return (f"VSAND_FAULT_SEED={seed} VSAND_FAULT_COUNT=1 VSAND_FAULT_NETWORKS={networks}"
            + (" VSAND_FAULT_SOAK=1" if SOAK else ""))


report = faultcheck.report_fixture("fault injection", "VSAND_FAULT_REPORT")


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
