"""Two vsand nodes in separate network namespaces, and the link between them cut mid-write.

Node ``a`` and node ``b`` each run in their own namespace, joined by one veth pair; a qemu-io
client in ``a``'s namespace writes distinct 64 KiB blocks one after another through node
``a``.  The link goes down while it writes: node ``a`` must notice within the peer timeout,
go on alone (degraded) and acknowledge every write, stalling no longer than that timeout.
When the link comes back, ``a`` (the only node written) resyncs ``b``; after a clean stop
every acknowledged block is in both backing files, and the files are identical.
"""

from __future__ import annotations

import filecmp
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from rig import LunSpec, VsandCluster, wait_until
from rig.netns import NetnsPair, NetnsUnavailable
from rig.qemu import _DONE, qemu_io_argv

MiB = 1 << 20
BLOCK = 64 * 1024
LUN = LunSpec(0, 64 * MiB, 512)
PEER_TIMEOUT = 2.0
HEARTBEAT_INTERVAL = 0.25
STALL_MARGIN = 1.5
WRITES = 200
CUT_AFTER = 20  # acknowledged writes before the cut: it lands mid-sequence
CLIENT_DEADLINE_S = 120.0


def _pattern(i: int) -> int:
    return i % 250 + 1


def _pair_or_skip() -> NetnsPair:
    try:
        return NetnsPair("10.231.0.0/24")
    except NetnsUnavailable as e:
        pytest.skip(str(e))


class _Client:
    """A process whose stdout lines are kept with the time each arrived."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.lines: list[tuple[float, str]] = []
        self.stderr = ""
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1,
                                     start_new_session=True)
        self._threads = [threading.Thread(target=self._read_out, daemon=True),
                         threading.Thread(target=self._read_err, daemon=True)]
        for t in self._threads:
            t.start()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()

    def acks(self) -> list[tuple[float, int, int]]:
        """(time, offset, length) of every write qemu-io reported done, in order."""
        out = []
        for t, line in list(self.lines):
            m = _DONE.match(line)
            if m and m[1] == "wrote" and m[2] == m[3]:
                out.append((t, int(m[4]), int(m[2])))
        return out

    def wait(self, deadline_s: float) -> int:
        try:
            rc = self.proc.wait(timeout=deadline_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"qemu-io still running after {deadline_s:g} s\n"
                                 + self.explain()) from None
        for t in self._threads:
            t.join(10)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def explain(self) -> str:
        out = "\n".join(line for _, line in self.lines[-15:])
        return f"--- stdout (tail) ---\n{out}\n--- stderr ---\n{self.stderr[-2000:]}"


def test_cut_link_between_namespaced_nodes(tmp_path: Path) -> None:
    pair = _pair_or_skip()
    cluster: VsandCluster | None = None
    client: _Client | None = None
    try:
        cluster = VsandCluster(tmp_path, luns=(LUN,), peer_timeout=PEER_TIMEOUT,
                               heartbeat_interval=HEARTBEAT_INTERVAL, hosts=pair.addresses,
                               target_factory=pair.vsand_target)
        with cluster as c:
            c.wait_in_sync()
            cmds = [f"write -P {_pattern(i)} {i * BLOCK} {BLOCK}" for i in range(WRITES)]
            client = _Client(pair.run_argv("a", qemu_io_argv(c.url("a"), cmds)))
            end = time.monotonic() + CLIENT_DEADLINE_S
            while len(client.acks()) < CUT_AFTER:
                assert client.proc.poll() is None, "qemu-io ended before the cut\n" + \
                    client.explain()
                assert time.monotonic() < end, "no writes acknowledged\n" + client.explain()
                time.sleep(0.005)
            pair.link_down()
            cut_at = time.monotonic()  # both ends report the link down
            rc = client.wait(CLIENT_DEADLINE_S)
            acks = client.acks()
            gaps = [(acks[i][0] - acks[i - 1][0], i) for i in range(1, len(acks))]
            stall, at = max(gaps, default=(0.0, 0))
            after_cut = sum(1 for t, _, _ in acks if t > cut_at)
            print(f"\nlink cut after {len(acks) - after_cut} acknowledged writes; {after_cut} "
                  f"acknowledged after the cut; longest gap between acknowledged writes: "
                  f"{stall:.3f} s (before write {at}, acknowledged "
                  f"{acks[at][0] - cut_at if acks else 0:.3f} s after the cut); peer_timeout "
                  f"{PEER_TIMEOUT:g} s, heartbeat {HEARTBEAT_INTERVAL:g} s")
            assert rc == 0 and len(acks) == WRITES and "failed" not in client.stderr, (
                f"qemu-io exit {rc}, {len(acks)}/{WRITES} writes acknowledged\n"
                + client.explain())
            assert [off for _, off, _ in acks] == [i * BLOCK for i in range(WRITES)]
            assert after_cut >= WRITES // 2, f"only {after_cut} writes after the cut"
            assert stall <= PEER_TIMEOUT + STALL_MARGIN, (
                f"writes stalled {stall:.3f} s, more than peer_timeout {PEER_TIMEOUT:g} s "
                f"+ {STALL_MARGIN:g} s")
            c.wait_roles({"a": "degraded"}, 30)
            print(f"roles while cut: {c.roles()}")
            pair.link_up()
            healed = time.monotonic()
            c.wait_in_sync()
            (state,) = c.lun_states("a")
            print(f"in sync {time.monotonic() - healed:.2f} s after the link came back; "
                  f"node a: {state.get('last_decision', state)}")
        _check_replicas(c, acks)  # both nodes stopped cleanly: compare what is on disk
    finally:
        _clean_up(pair, cluster, client)


def _check_replicas(c: VsandCluster, acks: list[tuple[float, int, int]]) -> None:
    files = {n: c.backing_path(n) for n in ("a", "b")}
    for name, path in files.items():
        with open(path, "rb") as f:
            for i, (_, off, length) in enumerate(acks):
                f.seek(off)
                data = f.read(length)
                assert data == bytes([_pattern(i)]) * length, (
                    f"node {name}: acknowledged write {i} (pattern {_pattern(i)}) missing "
                    f"at offset {off}: found {data[:8].hex()}...")
    assert filecmp.cmp(files["a"], files["b"], shallow=False), "replicas differ"


def _clean_up(pair: NetnsPair, cluster: VsandCluster | None, client: _Client | None) -> None:
    if client is not None:
        client.kill()
    if cluster is not None:
        for node in cluster.nodes.values():
            if node.running():
                node.kill()
    pair.close()
    assert not pair.leftovers(), f"left behind: {pair.leftovers()}"


def test_a_second_network_carries_the_mirror_when_the_first_is_cut(tmp_path: Path) -> None:
    """Two networks between the nodes: cut the one that carries the replication and leave it
    cut.  The writes stall for a peer timeout at most, then the nodes link again over the
    other network and the resync brings b back in sync, without waiting for a repair."""
    pair = _two_networks_or_skip()
    cluster: VsandCluster | None = None
    client: _Client | None = None
    try:
        cluster = _two_network_cluster(tmp_path, pair)
        with cluster as c:
            active = _linked_twice(c)
            cmds = [f"write -P {_pattern(i)} {i * BLOCK} {BLOCK}" for i in range(WRITES)]
            client = _Client(pair.run_argv("a", qemu_io_argv(c.url("a"), cmds)))
            end = time.monotonic() + CLIENT_DEADLINE_S
            while len(client.acks()) < CUT_AFTER:
                assert client.proc.poll() is None, client.explain()
                assert time.monotonic() < end, "no writes acknowledged\n" + client.explain()
                time.sleep(0.005)
            pair.link_down(active)
            cut_at = time.monotonic()
            wait_until(lambda: [x["link"] for x in _links(c, "a") if x["active"]] not in
                       ([active], []), "the replication on the other network", 30)
            c.wait_in_sync(30)  # the cut network stays down
            back = time.monotonic() - cut_at
            now = _links(c, "a")
            assert [x["active"] for x in now] == [x["link"] != active for x in now], now
            assert [x["state"] for x in now] == ["down" if x["link"] == active else "up"
                                                 for x in now], now
            rc = client.wait(CLIENT_DEADLINE_S)
            acks = client.acks()
            stall = max((acks[i][0] - acks[i - 1][0] for i in range(1, len(acks))),
                        default=0.0)
            print(f"\nnetwork {active} cut: in sync again over the other one after {back:.2f}"
                  f" s; longest gap between acknowledged writes {stall:.3f} s")
            assert rc == 0 and len(acks) == WRITES, client.explain()
            assert stall <= PEER_TIMEOUT + STALL_MARGIN, f"writes stalled {stall:.3f} s"
            pair.link_up(active)
            wait_until(lambda: all(x["state"] == "up" for n in "ab" for x in _links(c, n)),
                       "the repaired network linked again, as a standby")
            assert [x["link"] for x in _links(c, "a") if x["active"]] != [active]
        _check_replicas(c, acks)
    finally:
        _clean_up(pair, cluster, client)


def test_without_a_witness_a_failed_network_does_not_split_the_brain(tmp_path: Path) -> None:
    """Two networks, no witness, writes through both nodes: the network carrying the
    replication fails.  Both nodes lose the link; a (the lower name) goes on alone, b waits
    for a over the other network, finds it and stands aside until it has caught up, instead
    of going on alone too (which would be a split brain at the reconnection)."""
    pair = _two_networks_or_skip()
    cluster: VsandCluster | None = None
    clients: dict[str, _Client] = {}
    try:
        cluster = _two_network_cluster(tmp_path, pair)
        with cluster as c:
            active = _linked_twice(c)
            half = LUN.size // 2
            for node, base in (("a", 0), ("b", half)):
                cmds = [f"write -P {_pattern(i)} {base + i * BLOCK} {BLOCK}"
                        for i in range(WRITES)]
                clients[node] = _Client(pair.run_argv(node, qemu_io_argv(c.url(node), cmds)))
            end = time.monotonic() + CLIENT_DEADLINE_S
            while min(len(cl.acks()) for cl in clients.values()) < CUT_AFTER:
                assert time.monotonic() < end, "no writes acknowledged"
                time.sleep(0.005)
            pair.link_down(active)
            roles: list[dict] = []
            wait_until(lambda: roles.append(c.roles()) or [
                x["link"] for x in _links(c, "a") if x["active"]] not in ([active], []),
                "the replication on the other network", 30)
            c.wait_in_sync(30)
            for cl in clients.values():
                cl.wait(CLIENT_DEADLINE_S)
            assert all("split-brain" not in states for seen in roles
                       for states in seen.values()), roles
            assert len(clients["a"].acks()) == WRITES, clients["a"].explain()
            acked = {n: cl.acks() for n, cl in clients.items()}
            print(f"\nwrites acknowledged: a {len(acked['a'])}, b {len(acked['b'])} of "
                  f"{WRITES} each (b's failed while it stood aside)")
        files = {n: c.backing_path(n).read_bytes() for n in ("a", "b")}
        assert files["a"] == files["b"], "replicas differ"
        for node, done in acked.items():
            base = 0 if node == "a" else LUN.size // 2
            for t, off, length in done:
                i = (off - base) // BLOCK
                assert files["a"][off:off + length] == bytes([_pattern(i)]) * length, (node, i)
    finally:
        for cl in clients.values():
            cl.kill()
        _clean_up(pair, cluster, None)


def _two_networks_or_skip() -> NetnsPair:
    try:
        return NetnsPair("10.231.0.0/24", second_subnet="10.232.0.0/24")
    except NetnsUnavailable as e:
        pytest.skip(str(e))


def _two_network_cluster(tmp_path: Path, pair: NetnsPair) -> VsandCluster:
    """Nodes a and b in the pair's namespaces, each with an address on both networks."""
    return VsandCluster(tmp_path, luns=(LUN,), peer_timeout=PEER_TIMEOUT,
                        heartbeat_interval=HEARTBEAT_INTERVAL, hosts=pair.addresses,
                        more_hosts=pair.addresses2, target_factory=pair.vsand_target)


def _links(c: VsandCluster, node: str) -> list[dict]:
    return c.admin(node, "cluster")["peers"]["b" if node == "a" else "a"]["links"]  # type: ignore[no-any-return]


def _linked_twice(c: VsandCluster) -> int:
    """Once both nodes are in sync and linked over both networks: the active link."""
    c.wait_in_sync()
    wait_until(lambda: all(x["state"] == "up" for n in "ab" for x in _links(c, n)),
               "both networks linked at both nodes")
    (active,) = [x["link"] for x in _links(c, "a") if x["active"]]
    return active  # type: ignore[no-any-return]
