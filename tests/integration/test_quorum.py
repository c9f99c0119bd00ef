"""Two nodes and a witness: the node that loses its peer serves only with the witness's vote.

The quorum rules and their timing argument are in mirror/quorum.py; here they meet real
processes: a node killed, the witness killed, the witness's vote held by the other side.
"""

from __future__ import annotations

import filecmp
import struct
import threading
import time
from pathlib import Path

from mpclient import MultipathClient
from rawiscsi import RawInitiator
from rig import LunSpec, VsandCluster, wait_until
from rig.qemu import check_qemu_io, qemu_io

MiB = 1 << 20
LUN = LunSpec(0, 32 * MiB, 512)


def _quorum(c: VsandCluster, node: str) -> dict:
    return c.admin(node, "cluster")["quorum"]



def test_survivor_serves_with_the_witness_vote_and_fences_without_it(tmp_path: Path) -> None:
    c = VsandCluster(tmp_path, luns=(LUN,), witness=True, peer_timeout=2.0,
                     heartbeat_interval=0.25)
    with c:
        c.wait_in_sync()
        wait_until(lambda: _quorum(c, "a")["serving"] and _quorum(c, "b")["serving"],
              "both nodes hold quorum")
        check_qemu_io(c.url("a"), ["write -P 0x11 0 1M"])
        # (Both nodes dial each other at start; a link replaced by its duplicate counts as a
        # loss, so the epoch may already have moved.)
        e0 = _quorum(c, "a")["epoch"]
        # b dies: a asks the witness, gets the next epoch, and goes on alone.
        c.nodes["b"].kill()
        started = time.monotonic()
        check_qemu_io(c.url("a"), ["write -P 0x22 1M 1M"], timeout=60)
        stall = time.monotonic() - started
        q = _quorum(c, "a")
        assert q["serving"] and q["witness_vote"] and q["epoch"] == e0 + 1, q
        assert stall < 2.0 + 5.0, stall
        # b comes back behind: resync, then both share epoch 1 and the grant is spent.
        c.nodes["b"].restart()
        c.wait_in_sync()
        wait_until(lambda: not _quorum(c, "a")["witness_vote"]
              and _quorum(c, "b")["epoch"] == e0 + 1, "epoch shared after the rejoin")
        # Now the witness is gone too when b dies: a has one vote of three and fences.
        assert c.witness is not None
        c.witness.kill()
        c.nodes["b"].kill()
        # (Transitioning while it cannot know yet, unavailable once it found nobody to vote.)
        wait_until(lambda: c.admin("a", "alua")[0]["state"] == "unavailable",
              "a fenced without quorum", 15)
        assert not _quorum(c, "a")["serving"]
        r = qemu_io(c.url("a"), ["write -P 0x33 2M 4k"], timeout=60)
        assert r.returncode != 0 or r.problems(), r.explain()
        # The witness returns; b stays dead: a asks again, wins epoch 2 and serves.
        c.witness.start()
        wait_until(lambda: _quorum(c, "a")["serving"], "a serves with the witness back", 20)
        assert _quorum(c, "a")["epoch"] == e0 + 2
        check_qemu_io(c.url("a"), ["write -P 0x44 2M 4k", "read -P 0x22 1M 1M"])


def test_the_node_that_lost_the_vote_stays_fenced(tmp_path: Path) -> None:
    """b restarts alone after a won the witness's vote: b is behind and must not serve."""
    c = VsandCluster(tmp_path, luns=(LUN,), witness=True, peer_timeout=2.0,
                     heartbeat_interval=0.25, startup_wait=1.0)
    with c:
        c.wait_in_sync()
        e0 = _quorum(c, "a")["epoch"]
        c.nodes["b"].kill()
        wait_until(lambda: _quorum(c, "a")["serving"] and _quorum(c, "a")["epoch"] == e0 + 1,
              "a serves with the witness's vote")
        check_qemu_io(c.url("a"), ["write -P 0x55 0 64k"], timeout=60)
        c.nodes["a"].kill()  # a dies too, holding the newest data
        c.nodes["b"].restart()
        time.sleep(4.0)  # startup_wait, a vote request, a retry
        q = _quorum(c, "b")
        assert not q["serving"] and q["epoch"] <= e0, q
        r = qemu_io(c.url("b"), ["read 0 4k"], timeout=60)
        assert r.returncode != 0 or r.problems(), "a node behind served a read"
        # a returns: it wins its own epoch again, b resyncs from it, both serve.
        c.nodes["a"].restart()
        c.wait_in_sync()
        check_qemu_io(c.url("b"), ["read -P 0x55 0 64k"])
    assert filecmp.cmp(c.backing_path("a"), c.backing_path("b"), shallow=False)


def test_vsanctl_drill_measures_the_stall_and_loses_nothing(tmp_path: Path) -> None:
    c = VsandCluster(tmp_path, luns=(LUN,), witness=True, peer_timeout=2.0,
                     heartbeat_interval=0.25)
    with c:
        c.wait_in_sync()
        serial = c.admin("a", "luns")[0]["serial"]
        check_qemu_io(c.url("a"), ["write -P 0x66 31M 1M"])  # the region the drill borrows
        out = c.vsanctl("a", "--json", "drill", serial, "--seconds", "4", "--yes")
        assert out.returncode == 0, out.stdout + out.stderr
        import json
        r = json.loads(out.stdout)
        print(r)
        assert r["lost_writes"] == 0 and r["verify_after"]["differ"] == 0
        assert r["writes_acknowledged"] > 10
        assert 2.0 * 0.8 <= r["stall_s"] < 2.0 + 3.0, r  # at least the lease, under 5 s
        c.wait_in_sync()
        check_qemu_io(c.url("b"), ["read -P 0x66 31M 1M"])  # restored, and mirrored
    assert filecmp.cmp(c.backing_path("a"), c.backing_path("b"), shallow=False)


def test_whole_cluster_power_loss_resumes_without_full_resync(tmp_path: Path) -> None:
    """SIGKILL both nodes and the witness while writes run, start them all again: the nodes
    agree from their generation identifiers and activity logs, copy only the regions that
    were being written, and every acknowledged write is there."""
    import subprocess
    from rig.qemu import _DONE, qemu_io_argv
    big = LunSpec(0, 2048 * MiB, 512)  # sparse: the regions written are a small part of it
    c = VsandCluster(tmp_path, luns=(big,), witness=True, peer_timeout=2.0,
                     heartbeat_interval=0.25)
    with c:
        c.wait_in_sync()
        writer = subprocess.Popen(
            qemu_io_argv(c.url("a"), [f"write -P {1 + i % 200} {i * 65536} 64k"
                                      for i in range(400)]),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        time.sleep(0.4)
        assert c.witness is not None
        for proc in (c.nodes["a"], c.nodes["b"]):
            proc.kill()
        c.witness.kill()
        time.sleep(0.5)
        writer.kill()  # qemu's iSCSI driver would retry the dead portal forever
        out, _ = writer.communicate(timeout=30)
        acked = [(int(m[4]), int(m[2])) for m in _DONE.finditer(out)]
        assert acked, "no write was acknowledged before the power loss"
        c.witness.start()
        for name in ("a", "b"):
            c.nodes[name].restart()
        c.wait_in_sync()
        copied = sum(m["resync_bytes"] for n in ("a", "b") for m in c.lun_states(n))
        # The activity logs' regions (4 MiB each) around the 26 MiB written, nothing more.
        assert copied <= 32 * MiB, f"{copied} bytes resynced"
        for offset, length in acked:
            i = offset // 65536
            check_qemu_io(c.url("b"), [f"read -P {1 + i % 200} {offset} {length}"])
    assert filecmp.cmp(c.backing_path("a"), c.backing_path("b"), shallow=False)


def test_a_queueing_multipath_client_rides_through_a_node_kill(tmp_path: Path) -> None:
    """Default timeouts; a multipath client (one session per node, requests spread over
    both, a request that fails for a path reason sent again on the other path, queued
    while no path works) writes and reads back its blocks while the node it uses is
    SIGKILLed, restarted and resynced.  The application sees no error; the longest I/O is
    the stall."""
    c = VsandCluster(tmp_path, luns=(LUN,), witness=True)  # peer_timeout 3 s, heartbeat 0.5 s
    workers, blocks_each, bs = 4, 64, LUN.block_size
    with c:
        c.wait_in_sync()
        client = MultipathClient([(n, "127.0.0.1", c.nodes[n].port, c.nodes[n].iqn)
                                  for n in ("a", "b")])
        stop = threading.Event()
        latest: dict[int, int] = {}
        mismatches: list[str] = []

        def work(w: int) -> None:
            version = 0
            base = 1024 + w * blocks_each
            while not stop.is_set():
                version += 1
                lba = base + version % blocks_each
                data = struct.pack(">QQ", lba, version) * (bs // 16)
                if not client.write16(lba, data, bs):
                    return
                latest[lba] = version
                got = client.read16(lba, 1, bs)
                if got is None:
                    return
                if got != data:
                    mismatches.append(f"LBA {lba}: wrote version {version}, read "
                                      f"{struct.unpack_from('>QQ', got)}")
                    return

        threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
        for t in threads:
            t.start()
        try:
            time.sleep(3.0)
            done_before = len(client.latencies)
            c.nodes["a"].kill()
            killed = time.monotonic()
            time.sleep(8.0)
            assert len(client.latencies) > done_before, "no I/O completed after the kill"
            c.nodes["a"].restart()
            c.wait_in_sync()
            back = time.monotonic() - killed
            time.sleep(3.0)
        finally:
            stop.set()
            for t in threads:
                t.join(90)
            client.close()
        stall = max(client.latencies)
        print(f"multipath client, node a killed: {len(client.latencies)} I/Os, longest "
              f"{stall:.2f} s, {client.switches} sent again on the other path, "
              f"{len(client.errors)} errors; a back in sync after {back:.1f} s")
        assert not client.errors, client.errors[:5]
        assert not mismatches, mismatches[:5]
        assert stall < 10.0, f"an I/O took {stall:.2f} s"
        for n in ("a", "b"):  # every acknowledged version through each node alone
            conn = RawInitiator(c.nodes[n].port)
            conn.login(c.nodes[n].iqn)
            try:
                for lba, version in latest.items():
                    conn.command(struct.pack(">BBQIBB", 0x88, 0, lba, 1, 0, 0), edtl=bs,
                                 read=True)
                    _, got = conn.response()
                    assert struct.unpack_from(">QQ", got) == (lba, version), (n, lba)
            finally:
                conn.close()
    assert filecmp.cmp(c.backing_path("a"), c.backing_path("b"), shallow=False)
