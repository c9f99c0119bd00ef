"""SIGKILL the target mid-write; after a restart every acknowledged write must read back.

A qemu-io writer issues sequential 64 KiB writes, each to its own region with its own
pattern, paced so the run lasts several seconds. qemu-io prints ``wrote ... at offset X`` only
after the target answered GOOD; those lines (line-buffered) are the set of acknowledged
writes. After ~1.5 s the daemon gets SIGKILL, the writer is killed, the daemon restarts on the
same backing files, and each acknowledged region is read back with ``read -P``. Regions the
writer never reached must still read as zeros (nothing is written where it was not asked).

Scope: a process SIGKILL does not drop the kernel page cache, so with write_cache=writeback
data that reached ``pwrite`` survives. It does not test power loss: that needs FUA / SYNCHRONIZE
CACHE before GOOD and a VM or dm-flakey/dm-log-writes style device underneath.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time

import pytest

from rig import Target
from rig.qemu import QemuIoResult, check_qemu_io, qemu_io_argv

pytestmark = pytest.mark.integration

REGION = 64 * 1024
N_REGIONS = 2048  # 128 MiB of the 256 MiB LUN
BATCH = 32  # writes between pauses
PAUSE_MS = 100  # => ~6.4 s of pauses alone, so the kill lands mid-run
KILL_AFTER_S = 1.5


def pattern(i: int) -> int:
    return 1 + i % 255  # never 0: zero means "not written"


def test_sigkill_mid_write_keeps_acknowledged_writes(target: Target) -> None:
    url = target.url(0)
    cmds: list[str] = []
    for i in range(N_REGIONS):
        cmds.append(f"write -P {pattern(i)} {i * REGION} {REGION}")
        if i % BATCH == BATCH - 1:
            cmds.append(f"sleep {PAUSE_MS}")
    argv = qemu_io_argv(url, cmds)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        writer = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                  start_new_session=True)
        try:
            # Wait until the writer has acknowledged writes, then let it run a bit.
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and writer.poll() is None:
                out.seek(0)
                if out.read().count(b"\nwrote ") + 1 >= BATCH:
                    break
                time.sleep(0.05)
            time.sleep(KILL_AFTER_S)
            writer_alive_at_kill = writer.poll() is None
            target.kill()
            time.sleep(0.3)  # let qemu-io print any completion it already received
        finally:
            if writer.poll() is None:
                os.kill(writer.pid, signal.SIGKILL)
            writer.wait(timeout=10)
        out.seek(0)
        err.seek(0)
        result = QemuIoResult(argv, writer.returncode, out.read().decode(), err.read().decode())

    done = sorted(off for kind, off, n in result.completed() if kind == "wrote" and n == REGION)
    assert done, "no write completed before the kill\n" + result.explain()
    assert writer_alive_at_kill and len(done) < N_REGIONS, (
        "the writer finished before the kill; the test did not exercise a crash"
    )
    indices = [off // REGION for off in done]
    assert indices == list(range(len(indices))), "sequential writer reported out-of-order offsets"
    last = indices[-1]

    target.restart()
    verify = [f"read -P {pattern(i)} {i * REGION} {REGION}" for i in indices]
    # Region last+1 may or may not have been written (in flight at the kill); beyond it, zeros.
    untouched = range(last + 2, min(last + 2 + 64, N_REGIONS))
    verify += [f"read -P 0 {i * REGION} {REGION}" for i in untouched]
    check_qemu_io(url, verify, timeout=300)
    print(f"crash: {len(done)} acknowledged writes verified after SIGKILL + restart, "
          f"{len(untouched)} untouched regions read as zeros")
