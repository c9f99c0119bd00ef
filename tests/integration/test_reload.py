"""Reload while an initiator works: adding a LUN, growing one and changing an ACL touch no
unaffected session; an invalid file is refused and the running config stays."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import yaml

from rawiscsi import RawInitiator
from rig.procs import VsandTarget

A = "iqn.2026-11.org.vsand:reload-a"
B = "iqn.2026-11.org.vsand:reload-b"
ALLOWED = "iqn.2026-11.org.vsand:allowed"
EVICTED = "iqn.2026-11.org.vsand:evicted"


def _ctl(sock: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vsand.ctl", "-s", sock, *args],
                          capture_output=True, text=True, timeout=60)


def _targets(data: str, a_luns: list[dict], b_acl: list[dict] | None) -> list[dict]:
    b: dict = {"iqn": B, "luns": [{"number": 0, "path": f"{data}/b0.img", "size": "16MiB"}]}
    if b_acl is not None:
        b["acl"] = b_acl
    return [{"iqn": A, "luns": a_luns}, b]


def _session(port: int, iqn: str, initiator: str, isid: int) -> RawInitiator:
    c = RawInitiator(port)
    c.isid = isid
    reply = c.login(iqn, initiator=initiator)
    assert reply.bhs[36:38] == b"\0\0", reply.bhs[36:38]
    return c


def test_reload_adds_lun_and_changes_acl_while_io_runs(tmp_path) -> None:
    data = str(tmp_path / "data")
    sock = str(tmp_path / "admin.sock")
    lun0 = {"number": 0, "path": f"{data}/a0.img", "size": "64MiB"}
    t = VsandTarget(tmp_path, iqn=A, extra_config={
        "admin_socket": sock, "targets": _targets(data, [lun0], None)})
    t.start()
    try:
        keep = _session(t.port, B, ALLOWED, 0x800000000011)
        gone = _session(t.port, B, EVICTED, 0x800000000012)
        cmds: list[str] = []
        for i in range(300):
            off = (i % 64) * 65536
            cmds += ["-c", f"write -P {i % 250 + 1} {off} 64k", "-c",
                     f"read -P {i % 250 + 1} {off} 64k"]
        io = subprocess.Popen(["qemu-io", "-f", "raw", *cmds, t.url(0)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.3)
        lun1 = {"number": 1, "path": f"{data}/a1.img", "size": "32MiB"}
        t.extra_config["targets"] = _targets(data, [lun0, lun1], [{"initiator": ALLOWED}])
        t.write_config()
        out = _ctl(sock, "--json", "reload")
        assert out.returncode == 0, out.stderr
        changes = json.loads(out.stdout)["changes"]
        assert f"{A} LUN 1 added ({data}/a1.img)" in changes
        assert any(c.startswith(f"{B} access list; 1 session(s) ended") for c in changes)
        stdout, stderr = io.communicate(timeout=120)
        assert io.returncode == 0, stderr
        assert "verification failed" not in stdout and "error" not in stdout.lower()
        ls = subprocess.run(["iscsi-ls", "-s", f"iscsi://127.0.0.1:{t.port}"],
                            capture_output=True, text=True, timeout=30)
        assert f"Target:{A}" in ls.stdout and "Lun:1" in ls.stdout, ls.stdout
        # The evicted initiator's connection was closed; the allowed one still works.
        gone.sock.settimeout(5)
        assert gone.recv_or_eof() is None
        keep.command(bytes(6))
        p, _ = keep.response()
        assert p.bhs[3] in (0, 2)  # GOOD, or a unit attention about the change
        # An invalid file is refused, with its errors; the daemon keeps the old config.
        before = json.loads(_ctl(sock, "--json", "status").stdout)["config_digest"]
        good = t.config_path.read_text()
        for change, word in ((lambda c: c["targets"][0]["luns"][1].update(block_size=1000),
                              "block_size: 1000 is not allowed"),
                             (lambda c: c["targets"][0]["luns"][1].update(size="16MiB"),
                              "shrinking a LUN")):
            cfg = yaml.safe_load(good)
            change(cfg)
            t.config_path.write_text(yaml.safe_dump(cfg))
            bad = _ctl(sock, "reload")
            assert bad.returncode == 1 and word in bad.stderr, bad.stderr
            assert json.loads(_ctl(sock, "--json", "status").stdout)["config_digest"] == before
        # SIGHUP does the same as vsanctl reload: grow LUN 0 online.
        cfg = yaml.safe_load(good)
        cfg["targets"][0]["luns"][0]["size"] = "128MiB"
        t.config_path.write_text(yaml.safe_dump(cfg))
        assert t.pid is not None
        os.kill(t.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            cap = subprocess.run(["iscsi-readcapacity16", t.url(0)], capture_output=True,
                                 text=True, timeout=30)
            if f"Total size:{128 << 20}" in cap.stdout:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"LUN 0 did not grow: {cap.stdout}")
        keep.close()
        gone.close()
    finally:
        t.stop()
