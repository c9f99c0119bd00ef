"""qemu as the initiator: bulk copies with qemu-img and patterned I/O with qemu-io.

LUN 0 has 512-byte blocks (256 MiB), LUN 1 has 4096-byte blocks (64 MiB). Every check reads
data back through the target and compares it; a target that drops, misplaces or mixes up
data fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rig import Target
from rig.qemu import MiB, check_qemu_io, qemu_img, write_random_file

pytestmark = pytest.mark.integration

KiB = 1024


def fresh_reads(block_size: int, extents: list[tuple[int, int, int]]) -> list[str]:
    """``read -P`` commands for a *new* qemu-io process.

    qemu 7.2 aborts (``iscsi_co_block_status: Assertion `QEMU_IS_ALIGNED(offset | bytes,
    iscsilun->block_size)'``) on a read of >= 32 KiB of a region it has not written itself
    when the LUN has 4096-byte blocks and reports LBPME (thin provisioning): iscsi_co_readv
    asks for the block status of BDRV_REQUEST_MAX_BYTES (0x7ffffe00) bytes, which is not a
    multiple of 4096. That is a qemu bug, not a target one, so on such LUNs read in 16 KiB
    pieces, below the ISCSI_CHECKALLOC_THRES that triggers the check.
    """
    step = 16 * KiB if block_size > 512 else 1 << 62
    cmds = []
    for pat, off, length in extents:
        for o in range(off, off + length, step):
            cmds.append(f"read -P {pat:#x} {o} {min(step, off + length - o)}")
    return cmds


@pytest.mark.parametrize("lun", [0, 1])
def test_convert_roundtrip(session_target: Target, tmp_path: Path, lun: int) -> None:
    """Random image → LUN → file: identical; and the image compares equal to the LUN itself."""
    size = session_target.lun(lun).size
    url = session_target.url(lun)
    src = tmp_path / "src.img"
    back = tmp_path / "back.img"
    write_random_file(src, size)
    qemu_img("convert", "-n", "-f", "raw", "-O", "raw", "-t", "none", str(src), url)
    qemu_img("convert", "-f", "raw", "-O", "raw", url, str(back))
    assert back.stat().st_size == size
    qemu_img("compare", "-f", "raw", "-F", "raw", str(src), str(back))
    qemu_img("compare", "-f", "raw", "-F", "raw", str(src), url)
    # And qemu-img compare itself can fail: flip one byte in the copy.
    with open(back, "r+b") as f:
        f.seek(size // 2 + 1234)
        b = f.read(1)
        f.seek(size // 2 + 1234)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(AssertionError, match="Content mismatch"):
        qemu_img("compare", "-f", "raw", "-F", "raw", str(src), str(back))


def _extents(lun_size: int, block: int) -> list[tuple[int, int]]:
    """(offset, length) pairs: aligned, 512-aligned-but-not-4k, large, and at the end."""
    ext = [
        (0, 1 * MiB),
        (3 * MiB, 4 * KiB),
        (5 * MiB + 4 * KiB, 128 * KiB),
        (7 * MiB, 8 * MiB),  # spans many R2T / Data-Out bursts
        (lun_size - 2 * MiB, 1 * MiB),  # near the end
        (lun_size - MiB + block, MiB - 2 * block),  # up to the last block
        (lun_size - block, block),  # the last block
    ]
    if block == 512:
        ext += [
            (20 * MiB + 512, 512),
            (21 * MiB + 1536, 3584),  # ends on a 4k boundary, starts off it
            (22 * MiB + 3584, 4 * KiB + 1024),  # straddles two 4k pages
            (23 * MiB + 512, 1 * MiB - 1024),
        ]
    return ext


@pytest.mark.parametrize("lun", [0, 1])
def test_qemu_io_patterns(session_target: Target, lun: int) -> None:
    spec = session_target.lun(lun)
    url = session_target.url(lun)
    extents = _extents(spec.size, spec.block_size)
    cmds: list[str] = []
    for i, (off, length) in enumerate(extents):
        cmds.append(f"write -P {0x21 + i:#x} {off} {length}")
    cmds.append("flush")
    for i, (off, length) in enumerate(extents):
        cmds.append(f"read -P {0x21 + i:#x} {off} {length}")
    check_qemu_io(url, cmds)
    # A fresh connection sees the same data.
    check_qemu_io(url, fresh_reads(spec.block_size,
                                   [(0x21 + i, o, n) for i, (o, n) in enumerate(extents)]))


@pytest.mark.parametrize("lun", [0, 1])
def test_qemu_io_overlapping_writes(session_target: Target, lun: int) -> None:
    """Later writes win over earlier ones, exactly on their byte range."""
    block = session_target.lun(lun).block_size
    base = 40 * MiB
    cmds = [
        f"write -P 0x11 {base} 64k",
        f"write -P 0x22 {base + 4 * block} {2 * block}",
        f"read -P 0x11 {base} {4 * block}",
        f"read -P 0x22 {base + 4 * block} {2 * block}",
        f"read -P 0x11 {base + 6 * block} {64 * KiB - 6 * block}",
    ]
    check_qemu_io(session_target.url(lun), cmds)


@pytest.mark.parametrize("lun", [0, 1])
def test_qemu_io_aio(session_target: Target, lun: int) -> None:
    """Many requests in flight at once (aio_*), distinct patterns per region."""
    block = session_target.lun(lun).block_size
    base = 48 * MiB
    regions = [(base + i * 96 * KiB + (block if i % 2 else 0), 64 * KiB) for i in range(32)]
    writes = [f"aio_write -P {0x40 + i:#x} {o} {n}" for i, (o, n) in enumerate(regions)]
    reads = [f"aio_read -P {0x40 + i:#x} {o} {n}" for i, (o, n) in enumerate(regions)]
    check_qemu_io(session_target.url(lun), [*writes, "aio_flush", *reads, "aio_flush"])
    check_qemu_io(session_target.url(lun),
                  fresh_reads(block, [(0x40 + i, o, n) for i, (o, n) in enumerate(regions)]))


def test_qemu_io_write_zeroes(session_target: Target) -> None:
    base = 60 * MiB
    check_qemu_io(
        session_target.url(0),
        [f"write -P 0x5a {base} 1M", f"write -z {base + 4096} 64k",
         f"read -P 0x5a {base} 4k", f"read -P 0 {base + 4096} 64k",
         f"read -P 0x5a {base + 4096 + 64 * 1024} {1024 * 1024 - 4096 - 64 * 1024}"],
    )


def test_pattern_mismatch_is_detected(session_target: Target) -> None:
    """The checker itself: a wrong expected pattern must fail."""
    url = session_target.url(0)
    check_qemu_io(url, [f"write -P 0x77 {62 * MiB} 4k"])
    with pytest.raises(AssertionError, match="Pattern verification failed"):
        check_qemu_io(url, [f"read -P 0x78 {62 * MiB} 4k"])


def test_rig_against_tgt(tgt: Target) -> None:
    """The same clients against the reference target, so a rig problem is told apart from a
    vsand one (and the tgt fixture stays working for bench/run.py)."""
    for lun in (0, 1):
        block = tgt.lun(lun).block_size
        check_qemu_io(tgt.url(lun), [f"write -P 0x3c {block} 64k", f"read -P 0x3c {block} 64k"])
