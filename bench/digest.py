#!/usr/bin/env python3
"""Cost of CRC32C digests on 1 MiB sequential reads and writes: vsand with HeaderDigest and
DataDigest on, against the same daemon with them off, in one run.

libiscsi (and so QEMU) cannot negotiate data digests, so the client is the raw initiator of
the test suite (tests/integration/rawiscsi.py), single-threaded, QD1, checking every digest the
target sends with the same hardware CRC32C library the daemon uses.  The LUN is a file in tmpfs
(when /dev/shm exists) so that page-cache writeback does not swing the figures.  Sessions
alternate on/off for each round; the table gives medians of MiB/s and of the target's CPU time
per I/O.

    python bench/digest.py             # 3 rounds x 4 s per figure and mode
    python bench/digest.py --quick     # 1 round x 1 s
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "integration"))
sys.path.insert(0, str(REPO / "bench"))

from crc32c import crc32c  # noqa: E402

from rawiscsi import DATA_OUT, R2T, DigestInitiator  # noqa: E402
from rig import LunSpec, VsandTarget  # noqa: E402
from run import cpu_seconds  # noqa: E402

MiB = 1 << 20
LUN_SIZE = 256 * MiB
KEYS = [("MaxRecvDataSegmentLength", "262144"), ("ImmediateData", "Yes"),
        ("InitialR2T", "No"), ("FirstBurstLength", "262144"), ("MaxBurstLength", "1048576")]


def session(t: VsandTarget, digest: bool, isid: int) -> DigestInitiator:
    c = DigestInitiator(t.port, timeout=30)
    c.crc = staticmethod(crc32c)  # type: ignore[assignment]
    c.isid = isid
    mode = "CRC32C" if digest else "None"
    reply = c.login(t.iqn, extra=[("HeaderDigest", mode), ("DataDigest", mode)] + KEYS)
    assert reply.bhs[36:38] == b"\0\0", reply.bhs[36:38]
    c.digests = digest
    c.command(bytes(6))
    c.response()
    return c


def write_1m(c: DigestInitiator, lba: int, payload: bytes) -> None:
    n = len(payload) // 512
    cdb = struct.pack(">BBIBHB", 0x2A, 0, lba, 0, n, 0)
    first = 262144
    itt = c.command(cdb, edtl=len(payload), write=True, data=payload[:first])
    while True:
        p = c.recv()
        if p.opcode != R2T:
            assert p.bhs[3] == 0, p.data.hex()
            return
        ttt, off, length = p.word(20), p.word(40), p.word(44)
        datasn = 0
        for pos in range(off, off + length, first):
            piece = payload[pos:min(pos + first, off + length)]
            final = pos + len(piece) >= off + length
            c.send(DATA_OUT, 0x80 if final else 0, itt=itt,
                   words=(ttt, 0, c.statsn, 0, datasn, pos), data=piece)
            datasn += 1


def read_1m(c: DigestInitiator, lba: int) -> None:
    cdb = struct.pack(">BBIBHB", 0x28, 0, lba, 0, 2048, 0)
    c.command(cdb, edtl=MiB, read=True)
    p, data = c.response()
    assert len(data) == MiB and p.bhs[3] == 0


def measure(t: VsandTarget, c: DigestInitiator, write: bool, seconds: float) -> tuple[float, float]:
    payload = bytes(range(256)) * 4096
    pid = t.pid
    assert pid is not None
    cpu0 = cpu_seconds(pid)
    t0 = time.monotonic()
    n = 0
    while time.monotonic() - t0 < seconds:
        lba = (n % (LUN_SIZE // MiB)) * 2048
        if write:
            write_1m(c, lba, payload)
        else:
            read_1m(c, lba)
        n += 1
    elapsed = time.monotonic() - t0
    return n / elapsed, (cpu_seconds(pid) - cpu0) / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rounds, seconds = (1, 1.0) if args.quick else (3, 4.0)
    # The LUN lives in tmpfs when there is one: disk writeback would otherwise dominate and
    # swing the write figure run to run, and the cost being measured is the protocol's.
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="vsand-digest-", dir=shm) as tmp:
        t = VsandTarget(Path(tmp), luns=(LunSpec(0, LUN_SIZE, 512),), log_level="warning")
        t.start()
        try:
            with open(t.backing_path(0), "r+b") as f:  # dense: reads come from the page cache
                for _ in range(LUN_SIZE // MiB):
                    f.write(bytes(range(256)) * 4096)
            clients = {True: session(t, True, 0x800000000101),
                       False: session(t, False, 0x800000000102)}
            results: dict[tuple[str, bool], list[tuple[float, float]]] = {}
            for figure, write in (("1 MiB sequential read QD1", False),
                                  ("1 MiB sequential write QD1", True)):
                for r in range(rounds):
                    order = (True, False) if r % 2 == 0 else (False, True)
                    for digest in order:
                        rate, cpu = measure(t, clients[digest], write, seconds)
                        results.setdefault((figure, digest), []).append((rate, cpu))
                        print(f"  {figure:28s} round {r} digests {'on ' if digest else 'off'}"
                              f" {rate:8.1f} MiB/s {cpu:8.1f} us CPU/IO", flush=True)
            for c in clients.values():
                c.close()
        finally:
            t.stop()
    lines = ["| figure | digests on MiB/s | off MiB/s | on/off | CPU µs/IO on | off |",
             "|---|---:|---:|---:|---:|---:|"]
    for figure in ("1 MiB sequential read QD1", "1 MiB sequential write QD1"):
        on = results[(figure, True)]
        off = results[(figure, False)]
        r_on = statistics.median(x[0] for x in on)
        r_off = statistics.median(x[0] for x in off)
        c_on = statistics.median(x[1] for x in on)
        c_off = statistics.median(x[1] for x in off)
        lines.append(f"| {figure} | {r_on:,.0f} | {r_off:,.0f} | {r_on / r_off:.2f}x | "
                     f"{c_on:,.0f} | {c_off:,.0f} |")
    table = "\n".join(lines)
    print()
    print(table)
    out = REPO / "bench" / "results" / f"digest-{dt.datetime.now():%Y-%m-%d-%H%M}.md"
    out.write_text(f"# CRC32C digest cost, {dt.datetime.now():%Y-%m-%dT%H:%M}\n\n"
                   f"Command: `python bench/digest.py{' --quick' if args.quick else ''}`  \n"
                   f"{rounds} round(s) x {seconds:g} s per figure and mode, medians; raw "
                   f"single-threaded client, QD1, digests checked on both sides.\n\n{table}\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
