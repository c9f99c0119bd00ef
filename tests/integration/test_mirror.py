"""Two vsand nodes mirroring one LUN, driven by real initiators through both nodes.

After every test the two backing files are compared byte for byte (after a clean stop, so
nothing is left in flight): a mirror is only as good as replicas that are identical.
"""

from __future__ import annotations

import filecmp
import random
import struct
import subprocess
import threading
import time
from pathlib import Path

from rawiscsi import SCSI_RSP, RawInitiator
from rig import LunSpec, VsandCluster
from rig.qemu import check_qemu_io, qemu_io, qemu_io_argv

MiB = 1 << 20
LUN = LunSpec(0, 64 * MiB, 512)


def _identical(cluster: VsandCluster) -> None:
    a, b = (cluster.backing_path(n) for n in ("a", "b"))
    assert filecmp.cmp(a, b, shallow=False), "replicas differ"


def _cluster(tmp_path: Path, **kw: object) -> VsandCluster:
    return VsandCluster(tmp_path, luns=(LUN,), **kw)  # type: ignore[arg-type]


def _metrics(port: int) -> dict[str, float]:
    """Sample name with labels (as exposed) -> value."""
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_multipath_conformance_through_both_nodes(tmp_path: Path) -> None:
    """libiscsi's MultipathIO suite with one URL per node: writes, LU reset unit attentions
    and COMPARE AND WRITE races across paths; each node's metrics show the mirror."""
    with _cluster(tmp_path, metrics=True) as c:
        c.wait_in_sync()
        out = subprocess.run(
            ["iscsi-test-cu", "--dataloss", "--test=ALL.MultipathIO",
             "-i", "iqn.2026-11.org.vsand:mpio", c.url("a"), c.url("b")],
            capture_output=True, text=True, timeout=300)
        text = out.stdout + out.stderr
        assert "matching lu device identifier for all (2) paths" in text.lower(), text[-3000:]
        summary = [line for line in text.splitlines() if line.strip().startswith("tests")]
        assert summary and summary[0].split()[1:5] == ["4", "4", "4", "0"], text[-3000:]
        serial = c.admin("a", "luns")[0]["serial"]
        for name, peer in (("a", "b"), ("b", "a")):
            m = _metrics(c.metrics_ports[name])
            assert m[f'vsand_mirror_state{{lun="{serial}",state="in-sync"}}'] == 1
            assert m[f'vsand_mirror_in_sync_replicas{{lun="{serial}"}}'] == 2
            assert m[f'vsand_peer_up{{peer="{peer}"}}'] == 1
        # Requests of the suite arrived at both nodes, each acknowledged by both replicas.
        assert all(_metrics(c.metrics_ports[n])[f'vsand_mirror_ops_total{{lun="{serial}"}}'] > 0
                   for n in ("a", "b"))
    _identical(c)


def test_overlapping_writes_through_both_nodes_leave_identical_replicas(tmp_path: Path) -> None:
    """Two qemu-io clients, one per node, write 2000 requests each into the same 1 MiB,
    overlapping at random; then the replicas are compared."""
    rng = random.Random(4242)
    with _cluster(tmp_path) as c:
        c.wait_in_sync()
        procs = []
        for node, seed in (("a", 1), ("b", 2)):
            rng = random.Random(seed)
            cmds = []
            for i in range(2000):
                off = rng.randrange(0, 256) * 4096
                length = rng.choice((512, 4096, 8192, 65536))
                length = min(length, MiB - off)
                cmds.append(f"aio_write -P {(seed * 64 + i) % 256} {off} {length}")
                if i % 64 == 63:
                    cmds.append("aio_flush")
            cmds.append("aio_flush")
            procs.append(subprocess.Popen(qemu_io_argv(c.url(node), cmds),
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0 and "failed" not in out + err, (out[-2000:], err[-2000:])
    _identical(c)


def _write16(c: RawInitiator, lba: int, data: bytes) -> int:
    c.command(struct.pack(">BBQIBB", 0x8A, 0, lba, len(data) // 512, 0, 0), edtl=len(data),
              write=True, data=data)
    p, _ = c.response()
    assert p.opcode == SCSI_RSP
    return p.bhs[3]


def _read16(c: RawInitiator, lba: int, blocks: int) -> bytes:
    c.command(struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0), edtl=blocks * 512,
              read=True)
    _, data = c.response()
    return data


def test_a_write_acknowledged_at_one_node_is_read_at_the_other(tmp_path: Path) -> None:
    """Read-after-write across nodes, 1000 rounds per writer, while qemu-io hammers a
    neighbouring region through both nodes: the read through the other node returns the
    write just acknowledged (nobody else writes those blocks), never an older version."""
    with _cluster(tmp_path) as c:
        c.wait_in_sync()
        hammer = [subprocess.Popen(
            qemu_io_argv(c.url(n), [f"aio_write -P {i % 256} {(i * 7919) % 1024 * 4096} 4096"
                                    for i in range(3000)] + ["aio_flush"]),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for n in ("a", "b")]
        errors: list[str] = []

        def writer(me: str, other: str, base_lba: int, isid: int) -> None:
            w, r = RawInitiator(c.nodes[me].port), RawInitiator(c.nodes[other].port)
            w.isid += isid
            r.isid += isid + 1
            for conn, n in ((w, me), (r, other)):
                conn.login(c.nodes[n].iqn, initiator=f"iqn.2026-11.org.vsand:raw-{me}")
            try:
                for version in range(1000):
                    lba = base_lba + version % 16
                    data = struct.pack(">8sQ", me.encode().ljust(8), version) * 32
                    if _write16(w, lba, data) != 0:
                        errors.append(f"{me}: write {version} failed")
                        return
                    got = _read16(r, lba, 1)
                    if got != data:
                        errors.append(f"{me}: version {version} at LBA {lba} read back through "
                                      f"node {other} as {got[:16]!r}")
                        return
            finally:
                w.close()
                r.close()

        threads = [threading.Thread(target=writer, args=("a", "b", 50000, 10)),
                   threading.Thread(target=writer, args=("b", "a", 60000, 20))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(240)
        for p in hammer:
            _, err = p.communicate(timeout=240)
            assert p.returncode == 0, err[-2000:]
        assert not errors, errors
    _identical(c)


def test_sigkill_a_node_survivor_serves_and_resync_copies_only_dirty(tmp_path: Path) -> None:
    with _cluster(tmp_path, peer_timeout=2.0) as c:
        c.wait_in_sync()
        check_qemu_io(c.url("a"), ["write -P 0x11 0 4M"])
        # Writes in flight through node a while node b dies.
        busy = subprocess.Popen(
            qemu_io_argv(c.url("a"), [f"write -P 0x22 {i * 65536} 65536" for i in range(64)]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.05)
        c.nodes["b"].kill()
        out, err = busy.communicate(timeout=60)
        assert busy.returncode == 0 and "failed" not in out, (out[-2000:], err[-2000:])
        c.wait_roles({"a": "degraded"}, 30)
        # While b is away: three separate 1 MiB regions change.
        started = time.monotonic()
        for off in (8 * MiB, 20 * MiB, 40 * MiB):
            check_qemu_io(c.url("a"), [f"write -P 0x33 {off} 1M"])
        stall = time.monotonic() - started
        assert stall < 10, f"writes through the survivor took {stall:.1f} s"
        (state,) = c.lun_states("a")
        dirty = state["dirty_bytes"]["b"]
        assert dirty >= 3 * MiB
        c.nodes["b"].restart()
        c.wait_in_sync()
        (state,) = c.lun_states("a")
        resynced = state["resync_bytes"]
        # The dirty regions, plus at most the activity log's regions of the first 4 MiB.
        print(f"written while away: 3 MiB; dirty at a: {dirty} bytes; resynced: {resynced} bytes")
        assert 3 * MiB <= resynced <= dirty + 8 * MiB, (resynced, dirty)
        assert resynced < LUN.size / 4
        check_qemu_io(c.url("b"), ["read -P 0x33 20M 1M", "read -P 0x22 0 4M"])
    _identical(c)


def test_writes_through_a_node_that_is_not_serving_are_refused(tmp_path: Path) -> None:
    """A node that waits for its peer at start-up serves nothing: its path is transitioning,
    so a multipath initiator uses the other one."""
    c = _cluster(tmp_path, startup_wait=60.0, names=("a", "b"))
    node = c.nodes["a"]
    node.write_config()
    node._spawn(node.argv())
    try:
        node._await_ready()
        r = qemu_io(c.url("a"), ["write -P 1 0 4096"], timeout=60)
        assert r.returncode != 0 or r.problems(), r.explain()
        assert c.roles()["a"] == ["connecting"]
    finally:
        node.stop()


def test_online_verify_while_writing_then_a_corrupted_replica(tmp_path: Path) -> None:
    with _cluster(tmp_path) as c:
        c.wait_in_sync()
        serial = c.admin("a", "luns")[0]["serial"]
        busy = subprocess.Popen(
            qemu_io_argv(c.url("b"), [f"aio_write -P {i % 200} {(i * 7919 % 8000) * 8192} 8k"
                                      for i in range(4000)] + ["aio_flush"]),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        out = c.vsanctl("a", "verify", serial, "--wait")
        assert busy.wait(120) == 0
        assert out.returncode == 0 and "64 regions compared, 0 skipped, 0 differ" in out.stdout, \
            out.stdout + out.stderr
        table = c.vsanctl("a", "cluster").stdout
        assert "in-sync" in table and "verify done: 64/64 regions, 0 differ" in table, table
        # One block of b's file changed behind the mirror's back: region 9 differs.
        with open(c.backing_path("b"), "r+b") as f:
            f.seek(9 * MiB + 4096)
            f.write(b"\xee" * 512)
        out = c.vsanctl("b", "verify", serial, "--wait")
        assert out.returncode == 3 and "1 differ (regions [9])" in out.stdout, \
            out.stdout + out.stderr
        # The operator trusts a: a repair from a, while b's initiator writes (other regions
        # than 9, and region 9 itself: what lands there after the repair must stay).
        busy = subprocess.Popen(
            qemu_io_argv(c.url("b"), [f"aio_write -P {i % 200} {(i * 7919 % 8000) * 8192} 8k"
                                      for i in range(3000)] + ["aio_flush"]),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        out = c.vsanctl("a", "verify", serial, "--wait", "--repair")
        assert busy.wait(120) == 0, busy.stderr
        assert out.returncode == 0 and "1 differ (regions [9]), 1 repaired from this node" \
            in out.stdout, out.stdout + out.stderr
        table = c.vsanctl("a", "cluster").stdout
        assert "verify done: 64/64 regions, 1 differ, 1 repaired" in table, table
        out = c.vsanctl("b", "verify", serial, "--wait")
        assert out.returncode == 0 and "0 differ" in out.stdout, out.stdout + out.stderr
    _identical(c)
    # Every write acknowledged during the repair is there: the last pattern at each offset.
    last = {(i * 7919 % 8000) * 8192: i % 200 for i in range(3000)}
    with open(c.backing_path("b"), "rb") as f:
        for offset, pattern in last.items():
            f.seek(offset)
            assert f.read(8192) == bytes([pattern]) * 8192, offset


def test_configuration_drift_between_nodes_is_flagged(tmp_path: Path) -> None:
    c = _cluster(tmp_path, metrics=True)
    c.nodes["b"].extra_config["iscsi"] = {"queue_depth": 64}  # shared: must match
    with c:
        c.wait_in_sync()
        a, b = c.admin("a", "cluster"), c.admin("b", "cluster")
        assert a["peers"]["b"]["drift"] == ["config"] and b["peers"]["a"]["drift"] == ["config"]
        assert a["peers"]["b"]["version"] == a["version"]
        assert _metrics(c.metrics_ports["a"])['vsand_peer_drift{peer="b",what="config"}'] == 1
        assert "config" in c.vsanctl("a", "cluster").stdout.split("DRIFT")[1]
    # Node-specific settings (paths, portals, metrics) are not drift.
    c2 = _cluster(tmp_path / "same")
    with c2:
        c2.wait_in_sync()
        assert c2.admin("a", "cluster")["peers"]["b"]["drift"] == []
