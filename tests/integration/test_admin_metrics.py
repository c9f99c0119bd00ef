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


def test_alua_state_set_with_vsanctl_reaches_initiators(tmp_path) -> None:
    """Through the whole stack, fast path included: a read and a write get exactly the
    state's CHECK CONDITION, after one ASYMMETRIC ACCESS STATE CHANGED unit attention."""
    import struct

    sock = str(tmp_path / "admin.sock")
    t = VsandTarget(tmp_path, extra_config={"admin_socket": sock})
    t.start()
    try:
        c = RawInitiator(t.port)
        assert c.login(t.iqn).bhs[36:38] == b"\0\0"
        read10 = struct.pack(">BBIBHB", 0x28, 0, 0, 0, 1, 0)
        write10 = struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 1, 0)

        def answer(cdb: bytes, write: bool = False) -> tuple[int, int, int, int]:
            c.command(cdb, edtl=512, read=not write, write=write,
                      data=b"x" * 512 if write else b"")
            p, _ = c.response()
            st = p.bhs[3]
            if st != 2:
                return (st, 0, 0, 0)
            return (st, p.data[2 + 2] & 0x0F, p.data[2 + 12], p.data[2 + 13])

        assert answer(read10)[0] == 0
        for state, ascq in (("standby", 0x0B), ("unavailable", 0x0C), ("transitioning", 0x0A)):
            out = _ctl(sock, "alua", "--target", t.iqn, "--lun", "0", state)
            assert out.returncode == 0 and state in out.stdout, out.stderr
            assert answer(read10) == (2, 0x6, 0x2A, 0x06)
            assert answer(read10) == (2, 0x2, 0x04, ascq)
            assert answer(write10, write=True) == (2, 0x2, 0x04, ascq)
        _ctl(sock, "alua", "active-optimized")
        assert answer(read10) == (2, 0x6, 0x2A, 0x06)
        assert answer(read10)[0] == 0 and answer(write10, write=True)[0] == 0
        bad = _ctl(sock, "alua", "sideways")
        assert bad.returncode == 1 and "not one of" in bad.stderr
        c.close()
    finally:
        t.stop()


def test_latency_histograms_are_cumulative_and_count_every_io(tmp_path) -> None:
    mport = free_port()
    t = VsandTarget(tmp_path, extra_config={"metrics": {"listen": f"127.0.0.1:{mport}"}})
    t.start()
    try:
        out = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 64k", "-c", "read 0 64k",
                              "-c", "read 64k 4k", t.url(0)], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        m = _scrape(mport)
        lab = f'lun="0",op="read",target="{t.iqn}"'
        buckets = sorted(((float(k.split('le="')[1].split('"')[0]), v) for k, v in m.items()
                          if k.startswith("vsand_lun_latency_seconds_bucket") and lab in k
                          and "+Inf" not in k))
        counts = [v for _, v in buckets]
        assert counts == sorted(counts)  # cumulative
        inf = m[f'vsand_lun_latency_seconds_bucket{{le="+Inf",{lab}}}']
        ops = m[f'vsand_lun_ops_total{{{lab}}}']
        assert inf == ops >= 2
        assert m[f'vsand_lun_latency_seconds_count{{{lab}}}'] == ops
    finally:
        t.stop()
