"""A node whose storage fails a write: it steps aside, the other goes on, nothing acknowledged
is lost, and the replicas are equal again once the storage works.

The failure is real, not simulated inside the daemon: node b's LUN file lives on a tmpfs
smaller than the LUN, so a write to a part of it never written before fails with ENOSPC (the
file is sparse) until the tmpfs is made larger, as an admin freeing space would.  Node a's
storage is fine.  qemu-io writes through either node, as an initiator would.
"""

from __future__ import annotations

import filecmp
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rig import LunSpec, VsandCluster, wait_until
from rig.qemu import check_qemu_io, qemu_io

MiB = 1 << 20
LUN = LunSpec(0, 32 * MiB, 512)
TMPFS_MIB = 6  # of node b's LUN file: the first writes fit, later ones do not


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "b-storage"
    path.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MIB}m", "tmpfs",
                            str(path)], capture_output=True, text=True, timeout=10)
    # The suite runs as root (it also makes network namespaces): a tmpfs mount that fails
    # is a broken machine, not a reason to skip the test.
    assert mount.returncode == 0, f"cannot mount a tmpfs: {mount.stderr.strip()}"
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10)


def _grow(path: Path, mib: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={mib}m", str(path)], check=True,
                   capture_output=True, timeout=10)



def _cluster(tmp_path: Path, small_fs: Path) -> VsandCluster:
    c = VsandCluster(tmp_path / "cluster", luns=(LUN,), witness=True, peer_timeout=1.0,
                     heartbeat_interval=0.2)
    node = c.nodes["b"]
    node.backing_path = lambda number=0: small_fs / f"lun{number}.img"  # type: ignore[method-assign]
    return c


@pytest.mark.parametrize("through", ["a", "b"])
def test_a_node_out_of_space_steps_aside_and_catches_up_later(tmp_path: Path, small_fs: Path,
                                                               through: str) -> None:
    """Writes through ``through`` reach a region node b cannot store: through a (b is the
    replica), a goes on alone and the write succeeds; through b (b is the origin), that write
    fails, b leaves, and the same write through a succeeds.  Either way a serves with the
    witness's vote, b serves nothing until it has caught up."""
    with _cluster(tmp_path, small_fs) as c:
        c.wait_in_sync()
        check_qemu_io(c.url(through), ["write -P 0x11 0 4M"])  # fits on b's tmpfs
        started = time.monotonic()
        out = qemu_io(c.url(through), ["write -P 0x22 16M 4M"])
        took = time.monotonic() - started
        failed = bool(out.problems()) or out.returncode != 0 or not out.completed()
        if through == "a":
            assert not failed, out.stdout[-2000:] + out.stderr[-2000:]
        else:
            assert failed, "a write b could not store was acknowledged by b"
            check_qemu_io(c.url("a"), ["write -P 0x22 16M 4M"])
        print(f"write through {through} with b out of space: "
              f"{'failed' if failed else 'acknowledged'} after {took:.2f} s")
        wait_until(lambda: c.admin("a", "cluster")["quorum"]["serving"]
              and c.lun_states("a")[0]["role"] in ("degraded", "sync-source"), "a serves alone")
        wait_until(lambda: not c.admin("b", "cluster")["quorum"]["serving"]
              or c.lun_states("b")[0]["role"] != "in-sync", "b out of the in-sync set")
        # b cannot catch up while it has no space: its path serves nothing meanwhile.
        time.sleep(2.0)
        assert c.lun_states("b")[0]["role"] != "in-sync"
        assert c.admin("b", "alua")[0]["state"] in ("unavailable", "transitioning")
        assert c.nodes["b"].running(), "node b died"
        check_qemu_io(c.url("a"), ["read -P 0x11 0 4M", "read -P 0x22 16M 4M"])
        _grow(small_fs, 64)  # space is back
        c.wait_in_sync(60)
        check_qemu_io(c.url("b"), ["read -P 0x11 0 4M", "read -P 0x22 16M 4M"])
        for n in ("a", "b"):
            assert c.nodes[n].running(), f"node {n} died"
    assert filecmp.cmp(c.backing_path("a"), c.backing_path("b"), shallow=False), \
        "replicas differ"
