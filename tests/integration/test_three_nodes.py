"""Three vsand nodes mirroring one LUN: the views decided by their majority drive the
replication.  Real initiators (qemu-io) write through every node; after every test the three
backing files are compared byte for byte, after a clean stop."""

from __future__ import annotations

import filecmp
import json
import subprocess
import time
from pathlib import Path

from rig import LunSpec, VsandCluster
from rig.qemu import check_qemu_io, qemu_io_argv

MiB = 1 << 20
LUN = LunSpec(0, 64 * MiB, 512)
NODES = ("a", "b", "c")


def _identical(cluster: VsandCluster) -> None:
    a = cluster.backing_path("a")
    for n in NODES[1:]:
        assert filecmp.cmp(a, cluster.backing_path(n), shallow=False), f"a and {n} differ"


def _cluster(tmp_path: Path, **kw: object) -> VsandCluster:
    return VsandCluster(tmp_path, names=NODES, luns=(LUN,), peer_timeout=2.0,
                        heartbeat_interval=0.25, **kw)  # type: ignore[arg-type]


def _busy(url: str, pattern: int, count: int) -> subprocess.Popen[str]:
    """``count`` 64 KiB writes of ``pattern`` from the LUN's start, one after another."""
    return subprocess.Popen(
        qemu_io_argv(url, [f"write -P {pattern:#x} {i * 65536} 65536" for i in range(count)]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _view(c: VsandCluster, node: str) -> list[str]:
    (state,) = c.lun_states(node)
    return list(state["view"]["members"]) if state["view"] else []


def test_writes_through_every_node_are_on_every_replica(tmp_path: Path) -> None:
    with _cluster(tmp_path) as c:
        c.wait_in_sync()
        for i, n in enumerate(NODES):
            check_qemu_io(c.url(n), [f"write -P {0x11 + i} {i * 4}M 4M"])
        for i, n in enumerate(NODES):
            reader = NODES[(i + 1) % 3]
            check_qemu_io(c.url(reader), [f"read -P {0x11 + i} {i * 4}M 4M"])
        for n in NODES:
            (state,) = c.lun_states(n)
            assert state["role"] == "in-sync" and state["replicas"] == list(NODES), state
            assert c.admin(n, "cluster")["quorum"]["serving"]
    _identical(c)


def test_a_killed_node_is_left_out_and_resynced_when_it_returns(tmp_path: Path) -> None:
    """SIGKILL node c while writes run through a: they finish (held through the view change,
    not failed); a and b serve on as a view of two; c comes back by a resync of what it
    missed, then the view takes it in again."""
    with _cluster(tmp_path) as c:
        c.wait_in_sync()
        check_qemu_io(c.url("a"), ["write -P 0x11 0 4M"])
        busy = _busy(c.url("a"), 0x22, 256)
        time.sleep(0.1)
        c.nodes["c"].kill()
        out, err = busy.communicate(timeout=60)
        assert busy.returncode == 0 and "failed" not in out, (out[-2000:], err[-2000:])
        c.wait_roles({"a": "degraded", "b": "degraded"}, 30)
        c.wait_serving(30)
        assert _view(c, "a") == ["a", "b"]
        started = time.monotonic()
        for off, node in ((8 * MiB, "a"), (20 * MiB, "b"), (40 * MiB, "a")):
            check_qemu_io(c.url(node), [f"write -P 0x33 {off} 1M"])
        print(f"three 1 MiB writes through the survivors: {time.monotonic() - started:.2f} s")
        (state,) = c.lun_states("a")
        dirty = state["dirty_bytes"]["c"]
        assert dirty >= 3 * MiB, state
        c.nodes["c"].restart()
        c.wait_in_sync()
        assert _view(c, "c") == list(NODES)
        (state,) = c.lun_states("a")
        resynced = state["resync_bytes"]
        print(f"written while c was away: 3 MiB; dirty at a: {dirty} bytes; "
              f"copied: {resynced} bytes")
        # What a marked for c, and the activity log's regions of c's crash at most.
        assert dirty <= resynced <= dirty + 16 * MiB and resynced < LUN.size / 2, \
            (resynced, dirty)
        check_qemu_io(c.url("c"), ["read -P 0x33 20M 1M", "read -P 0x22 0 8M",
                                  "read -P 0x33 8M 1M", "read -P 0x22 9M 7M"])
    _identical(c)


def test_the_source_killed_while_another_node_writes(tmp_path: Path) -> None:
    """Node a orders every write (the lowest member); kill it while writes run through b:
    b and c decide a view without it, b's writes finish, and a returns by a resync."""
    with _cluster(tmp_path) as c:
        c.wait_in_sync()
        busy = _busy(c.url("b"), 0x44, 256)
        time.sleep(0.1)
        c.nodes["a"].kill()
        out, err = busy.communicate(timeout=60)
        assert busy.returncode == 0 and "failed" not in out, (out[-2000:], err[-2000:])
        c.wait_roles({"b": "degraded", "c": "degraded"}, 30)
        check_qemu_io(c.url("c"), ["write -P 0x55 32M 2M", "read -P 0x44 0 16M"])
        c.nodes["a"].restart()
        c.wait_in_sync()
        check_qemu_io(c.url("a"), ["read -P 0x55 32M 2M", "read -P 0x44 0 16M"])
    _identical(c)


def test_the_whole_cluster_killed_resumes_without_a_full_resync(tmp_path: Path) -> None:
    with _cluster(tmp_path) as c:
        c.wait_in_sync()
        check_qemu_io(c.url("b"), ["write -P 0x66 0 8M"])
        busy = _busy(c.url("c"), 0x77, 512)
        time.sleep(0.2)
        for n in NODES:
            c.nodes[n].kill()
        busy.kill()  # it would retry for ever: nothing is left to answer
        busy.communicate(timeout=60)
        for n in NODES:
            c.nodes[n].restart()
        c.wait_in_sync()
        copied = sum(c.lun_states(n)[0]["resync_bytes"] for n in NODES)
        print(f"copied after the restart of all three: {copied} bytes")
        # The activity logs' regions (what was being written) to the two other members:
        # a full resync would copy 2 x 64 MiB.
        assert copied <= 32 * MiB, copied
        check_qemu_io(c.url("a"), ["write -P 0x78 40M 1M"])
        check_qemu_io(c.url("c"), ["read -P 0x78 40M 1M"])
    _identical(c)


def test_vsanctl_drill_on_three_nodes(tmp_path: Path) -> None:
    """The drill freezes node c (the highest other node) while node a writes: the view drops
    c, a and b go on, c returns by a resync; the stall is measured and nothing is lost."""
    with _cluster(tmp_path) as c:
        c.wait_in_sync()
        serial = c.admin("a", "luns")[0]["serial"]
        out = c.vsanctl("a", "--json", "drill", serial, "--seconds", "4", "--yes")
        assert out.returncode == 0, out.stdout + out.stderr
        r = json.loads(out.stdout)
        print({k: r[k] for k in ("peer", "stall_s", "writes_acknowledged", "lost_writes")})
        assert r["peer"] == "c" and r["lost_writes"] == 0 and r["verify_after"]["differ"] == 0
        assert r["writes_acknowledged"] > 10
        # Detection (peer_timeout 2 s) and a round; the leases c held ran out meanwhile.
        assert r["stall_s"] < 4.0, r
        c.wait_in_sync()
    _identical(c)
