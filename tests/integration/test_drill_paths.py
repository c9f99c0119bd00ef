"""``vsanctl drill --portals``: the failover drill through every node's portal, as a
multipath initiator sees it; and the initiator it uses, against vsand and against tgt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rig import LunSpec, VsandCluster, VsandTarget
from rig.qemu import check_qemu_io
from vsand.initiator import IoFailed, Multipath, PathError, PathSession

MiB = 1 << 20
INITIATOR = "iqn.2026-11.org.vsand:drill-test"


@pytest.mark.parametrize("kind", ["vsand", "tgt"])
@pytest.mark.parametrize("block_size", [512, 4096])
def test_the_initiator_writes_and_reads_through_any_target(request: pytest.FixtureRequest,
                                                           kind: str, block_size: int) -> None:
    t = request.getfixturevalue(f"{kind}_factory")(luns=(LunSpec(0, 32 * MiB, block_size),))
    session = PathSession("127.0.0.1", t.port, t.iqn, getattr(t, "lun_offset", 0),
                          initiator=INITIATOR, timeout=10)
    mp = Multipath([session], queue_s=5)
    small, big = os.urandom(4096), os.urandom(300 * 1024)  # big: immediate data, then R2Ts
    mp.write(64, small, block_size)
    mp.write(4096, big, block_size)
    assert mp.read(64, 4096 // block_size, block_size) == small
    assert mp.read(4096, len(big) // block_size, block_size) == big
    with pytest.raises(IoFailed, match="sense key 0x5"):  # beyond the end: ILLEGAL REQUEST
        session.command(bytes([0x88, 0]) + (1 << 40).to_bytes(8, "big")
                        + (1).to_bytes(4, "big") + b"\0\0", read_length=block_size)
    mp.close()


def test_the_initiator_logs_in_with_chap_and_is_refused_without(tmp_path: Path) -> None:
    secret = tmp_path / "chap.secret"
    secret.write_text("drill-secret-0123\n")
    secret.chmod(0o600)
    iqn = "iqn.2026-11.org.vsand:drill-chap"
    t = VsandTarget(tmp_path, iqn=iqn, extra_config={"targets": [{
        "iqn": iqn, "luns": [{"number": 0, "path": str(tmp_path / "lun0.img"),
                              "size": "8MiB"}],
        "auth": {"method": "chap", "user": "drill", "secret_file": str(secret)}}]})
    with t:
        good = PathSession("127.0.0.1", t.port, iqn, 0, initiator=INITIATOR,
                           chap=("drill", b"drill-secret-0123"))
        Multipath([good]).write(0, b"\1" * 4096, 512)
        good.logout()
        for chap in (None, ("drill", b"wrong-secret-01234")):
            bad = PathSession("127.0.0.1", t.port, iqn, 0, initiator=INITIATOR, chap=chap)
            with pytest.raises(PathError):
                bad.connect()


def test_path_drill_fails_over_between_portals_and_loses_nothing(tmp_path: Path) -> None:
    c = VsandCluster(tmp_path, luns=(LunSpec(0, 32 * MiB, 512),), witness=True,
                     peer_timeout=2.0, heartbeat_interval=0.25)
    with c:
        c.wait_in_sync()
        serial = c.admin("a", "luns")[0]["serial"]
        check_qemu_io(c.url("a"), ["write -P 0x5a 31M 1M"])  # the region the drill borrows
        out = subprocess.run([sys.executable, "-m", "vsand.ctl", "-s",
                              str(c.nodes["a"].workdir / "admin.sock"), "--json", "drill",
                              serial, "--seconds", "4", "--yes", "--portals",
                              "--initiator-name", INITIATOR],
                             capture_output=True, text=True, timeout=300)
        print(out.stderr)
        assert out.returncode == 0, out.stdout + out.stderr
        r = json.loads(out.stdout)
        print(r)
        assert len(r["paths"]) == 2 and r["peer"] == "b"
        assert r["lost_writes"] == 0 and set(r["lost_by_path"].values()) == {0}
        assert r["write_errors"] == 0, r["errors"]
        assert r["verify_before"]["differ"] == 0 and r["verify_after"]["differ"] == 0
        assert r["writes_acknowledged"] > 50
        # Node b's path failed (its lease ran out: ALUA states, then a fenced node) and the
        # writes went on through a: a path switch, then the takeover, under 5 s.
        assert r["retried_on_another_path"] >= 1, r
        assert r["stall_s"] < 5.0, r
        c.wait_in_sync()
        check_qemu_io(c.url("b"), ["read -P 0x5a 31M 1M"])  # restored, and mirrored
