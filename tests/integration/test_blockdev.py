"""A LUN on a block device (a loop device over a file made here): capacity from the device,
data through QEMU's iSCSI driver down to the device.  Block-device LUNs are reported fully
provisioned (no LBPME), so a discard from the initiator is only a hint and changes nothing."""

from __future__ import annotations

import os
import subprocess

import pytest

from rig.procs import VsandTarget

SIZE = 64 << 20


@pytest.fixture
def loopdev(tmp_path):
    backing = tmp_path / "loop.img"
    with open(backing, "wb") as f:
        f.truncate(SIZE)
    out = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, f"losetup failed: {out.stderr}"
    dev = out.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], timeout=30)


def test_block_device_lun(tmp_path, loopdev: str) -> None:
    iqn = "iqn.2026-11.org.vsand:blockdev"
    t = VsandTarget(tmp_path / "d", iqn=iqn, extra_config={"targets": [{
        "iqn": iqn, "luns": [{"number": 0, "path": loopdev, "block_size": 512}]}]})
    t.start()
    try:
        cap = subprocess.run(["iscsi-readcapacity16", t.url(0)], capture_output=True,
                             text=True, timeout=30)
        assert f"Total size:{SIZE}" in cap.stdout, cap.stdout + cap.stderr
        cmds = ["write -P 0x5c 0 1M", "write -P 0x7e 3M 512", "read -P 0x5c 0 1M",
                "read -P 0x7e 3M 512", "discard 0 64k", "read -P 0x5c 0 1M"]
        args = ["qemu-io", "-f", "raw"]
        for c in cmds:
            args += ["-c", c]
        out = subprocess.run(args + [t.url(0)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "verification failed" not in out.stdout and "error" not in out.stdout.lower(), \
            out.stdout
    finally:
        t.stop()
    with open(loopdev, "rb") as f:
        f.seek(3 << 20)
        assert f.read(512) == b"\x7e" * 512  # the bytes reached the device itself
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
