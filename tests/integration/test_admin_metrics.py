"""The admin socket (vsanctl) and the Prometheus endpoint of a running daemon."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request

from rawiscsi import RawInitiator
from rig.procs import VsandTarget, free_port


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r'(vsand_\w+)(\{[^}]*\})? ([0-9.e+-]+)$', line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def _ctl(sock: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vsand.ctl", "-s", sock, *args],
                          capture_output=True, text=True, timeout=20)


def test_metrics_move_and_vsanctl_reports(tmp_path) -> None:
    mport = free_port()
    sock = str(tmp_path / "admin.sock")
    t = VsandTarget(tmp_path, extra_config={"metrics": {"listen": f"127.0.0.1:{mport}"},
                                            "admin_socket": sock})
    t.start()
    try:
        before = _scrape(mport)
        key = f'vsand_lun_ops_total{{lun="0",op="write",target="{t.iqn}"}}'
        assert before[key] == 0
        out = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x33 0 1M",
                              "-c", "read -P 0x33 0 1M", t.url(0)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "verification failed" not in out.stdout
        after = _scrape(mport)
        assert after[key] >= 1
        assert after[f'vsand_lun_bytes_total{{lun="0",op="write",target="{t.iqn}"}}'] >= 1 << 20
        # A live session shows up in both views.
        c = RawInitiator(t.port)
        assert c.login(t.iqn).bhs[36:38] == b"\0\0"
        assert _scrape(mport)[f'vsand_iscsi_sessions{{target="{t.iqn}"}}'] == 1
        sessions = json.loads(_ctl(sock, "--json", "sessions").stdout)
        assert [s["target"] for s in sessions] == [t.iqn]
        table = _ctl(sock, "sessions").stdout
        assert "iqn.2026-11.org.vsand:rawtest" in table
        c.close()
        status = json.loads(_ctl(sock, "--json", "status").stdout)
        assert status["node"] == "test-a" and len(status["config_digest"]) == 16
        luns = json.loads(_ctl(sock, "--json", "luns").stdout)
        assert luns[0]["write_ops"] >= 1
        bad = _ctl(str(tmp_path / "nope.sock"), "status")
        assert bad.returncode == 1 and "nope.sock" in bad.stderr
    finally:
        t.stop()
