"""Many sessions on two LUNs at once, each writing and verifying its own region: every
pattern reads back, no session stalls another."""

from __future__ import annotations

import subprocess
import time

from rig.procs import VsandTarget

CLIENTS = 8


def test_parallel_qemu_io_clients_on_two_luns(tmp_path) -> None:
    t = VsandTarget(tmp_path)
    t.start()
    try:
        procs = []
        t0 = time.monotonic()
        for i in range(CLIENTS):
            lun = i % 2
            base = (i // 2) * (4 << 20)
            pat = 0x10 + i
            cmds = []
            for k in range(16):
                off = base + k * (128 << 10)
                cmds += ["-c", f"aio_write -P {pat} {off} 128k"]
            cmds += ["-c", "aio_flush"]
            for k in range(16):
                off = base + k * (128 << 10)
                cmds += ["-c", f"read -P {pat} {off} 128k"]
            procs.append(subprocess.Popen(["qemu-io", "-f", "raw", *cmds, t.url(lun)],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            assert "verification failed" not in out and "error" not in out.lower(), out
        assert time.monotonic() - t0 < 60
    finally:
        t.stop()
