#!/usr/bin/env python3
"""vsand against tgt with ``qemu-img bench``, on this machine, in one run.

Starts both targets itself (127.0.0.1 only, free ports, a scratch directory), each serving one
256 MiB LUN with 512-byte blocks backed by a file pre-filled with random data (so no region is
unallocated: qemu's iscsi driver answers reads of regions it believes unmapped with zeros
without asking the target). Then, figure by figure, alternating which target goes first:
warm both backing files (read fully once: this kind of machine evicts page cache that idles
about a minute), run ``qemu-img bench`` on each, and take the median over the rounds.

Each measurement is time-bounded: a short probe run gives the rate, then ``-c`` is set so the
real run lasts about ``--seconds``.

    python bench/run.py            # 3 rounds x 5 s per figure and target (~4 min)
    python bench/run.py --quick    # 1 round x 1.5 s (~30 s)

Writes bench/results/<YYYY-MM-DD-HHMM>.md (table, command lines, JSON) and the same JSON as
.json next to it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "integration"))

from rig import LunSpec, Target, TgtTarget, VsandTarget  # noqa: E402

MiB = 1024 * 1024
LUN_SIZE = 256 * MiB
# Step for "random" 4 KiB I/O: qemu-img bench has no random mode, but it wraps offsets modulo
# the image size, so an odd multiple of 4 KiB walks all 65536 4 KiB blocks of the 256 MiB LUN
# in a scattered order (odd is coprime with 2^16), defeating sequential readahead.
RANDOM_STEP = 4096 * 40503


@dataclass(frozen=True)
class Figure:
    key: str
    title: str
    size: int
    depth: int
    write: bool
    step: int | None  # None: sequential (step = size)
    unit: str  # "IOPS" or "MiB/s"
    probe_count: int


FIGURES = (
    Figure("randread-4k-qd32", "4 KiB random read QD32", 4096, 32, False, RANDOM_STEP, "IOPS",
           4000),
    Figure("randwrite-4k-qd32", "4 KiB random write QD32", 4096, 32, True, RANDOM_STEP, "IOPS",
           4000),
    Figure("randread-4k-qd1", "4 KiB random read QD1", 4096, 1, False, RANDOM_STEP, "IOPS", 1000),
    Figure("seqread-1m-qd8", "1 MiB sequential read QD8", MiB, 8, False, None, "MiB/s", 64),
    Figure("seqwrite-1m-qd8", "1 MiB sequential write QD8", MiB, 8, True, None, "MiB/s", 64),
)

_COMPLETED = re.compile(r"Run completed in ([0-9.]+) seconds")


def bench_argv(url: str, fig: Figure, count: int) -> list[str]:
    argv = ["qemu-img", "bench", "-f", "raw", "-t", "none", "-c", str(count), "-d", str(fig.depth),
            "-s", str(fig.size)]
    if fig.step is not None:
        argv += ["-S", str(fig.step)]
    if fig.write:
        argv += ["-w", "--pattern=0x5a"]
    return [*argv, url]


def qemu_img_bench(argv: list[str], timeout: float) -> float:
    """Run it; return the elapsed seconds qemu-img reports."""
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    m = _COMPLETED.search(cp.stdout)
    if cp.returncode != 0 or not m:
        raise RuntimeError(f"$ {shlex.join(argv)}\nexit {cp.returncode}\n{cp.stdout}{cp.stderr}")
    return max(float(m.group(1)), 1e-6)


def warm(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(4 * MiB)
        while f.readinto(buf):
            pass


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the whole process (all threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Measurement:
    target: str
    figure: str
    round: int
    count: int
    seconds: float
    iops: float
    mib_s: float
    cpu_us_per_io: float  # target process CPU per request (client-bound figures hide this)
    command: str


def measure(t: Target, fig: Figure, seconds: float, rnd: int) -> Measurement:
    url = t.url(0)
    probe = qemu_img_bench(bench_argv(url, fig, fig.probe_count), timeout=120)
    rate = fig.probe_count / probe
    count = max(fig.probe_count, int(rate * seconds))
    argv = bench_argv(url, fig, count)
    assert t.pid is not None
    cpu0 = cpu_seconds(t.pid)
    elapsed = qemu_img_bench(argv, timeout=seconds * 10 + 60)
    cpu = cpu_seconds(t.pid) - cpu0
    iops = count / elapsed
    return Measurement(t.kind, fig.key, rnd, count, elapsed, iops, iops * fig.size / MiB,
                       cpu * 1e6 / count, shlex.join(argv))


def fill_random(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for _ in range(size // (4 * MiB)):
            f.write(os.urandom(4 * MiB))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 round of 1.5 s per figure")
    ap.add_argument("--rounds", type=int, help="rounds per figure (default 3, quick 1)")
    ap.add_argument("--seconds", type=float, help="seconds per run (default 5, quick 1.5)")
    ap.add_argument("--only", help="comma-separated figure keys: "
                    + ",".join(f.key for f in FIGURES))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--workdir", type=Path, help="scratch directory (default: a temp dir)")
    args = ap.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    seconds = args.seconds or (1.5 if args.quick else 5.0)
    figures = [f for f in FIGURES if not args.only or f.key in args.only.split(",")]

    with tempfile.TemporaryDirectory(prefix="vsand-bench-", dir=args.workdir) as tmp:
        luns = (LunSpec(0, LUN_SIZE, 512),)
        targets: list[Target] = [VsandTarget(Path(tmp) / "vsand", luns=luns, log_level="warning"),
                                 TgtTarget(Path(tmp) / "tgt", luns=luns)]
        for t in targets:
            fill_random(t.backing_path(0), LUN_SIZE)
        started: list[Target] = []
        results: list[Measurement] = []
        try:
            for t in targets:
                started.append(t.start())
            for i, fig in enumerate(figures):
                for rnd in range(rounds):
                    order = targets if (i + rnd) % 2 == 0 else targets[::-1]
                    for t in order:
                        warm(t.backing_path(0))
                        m = measure(t, fig, seconds, rnd)
                        results.append(m)
                        value = m.iops if fig.unit == "IOPS" else m.mib_s
                        print(f"  {fig.key:18} round {rnd}  {t.kind:5} {value:10.1f} {fig.unit:5}"
                              f"  {m.cpu_us_per_io:7.1f} us CPU/IO", flush=True)
        finally:
            for t in reversed(started):
                t.stop()

    table = summarize(figures, results)
    print()
    print(table)
    write_results(args, figures, results, table, rounds, seconds)
    return 0


def median_value(results: list[Measurement], target: str, fig: Figure, what: str = "") -> float:
    what = what or ("iops" if fig.unit == "IOPS" else "mib_s")
    vals = [getattr(m, what) for m in results if m.target == target and m.figure == fig.key]
    return statistics.median(vals)


def summarize(figures: list[Figure], results: list[Measurement]) -> str:
    rows = ["| figure | unit | vsand | tgt | vsand/tgt | CPU µs/IO vsand | CPU µs/IO tgt |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for fig in figures:
        v, t = median_value(results, "vsand", fig), median_value(results, "tgt", fig)
        cv = median_value(results, "vsand", fig, "cpu_us_per_io")
        ct = median_value(results, "tgt", fig, "cpu_us_per_io")
        rows.append(f"| {fig.title} | {fig.unit} | {v:,.0f} | {t:,.0f} | {v / t:.2f}x "
                    f"| {cv:.1f} | {ct:.1f} |")
    return "\n".join(rows)


def write_results(args: argparse.Namespace, figures: list[Figure], results: list[Measurement],
                  table: str, rounds: int, seconds: float) -> None:
    now = dt.datetime.now()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / now.strftime("%Y-%m-%d-%H%M")
    tgt_version = subprocess.run(["tgtd", "-V"], capture_output=True, text=True).stdout.strip()
    qemu_version = subprocess.run(["qemu-img", "--version"], capture_output=True,
                                  text=True).stdout.splitlines()[0]
    machine = {"cpus": os.cpu_count(), "kernel": platform.release(),
               "python": platform.python_version()}
    data: dict[str, object] = {
        "date": now.isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "rounds": rounds,
        "seconds_per_run": seconds,
        "machine": machine,
        "tgt": tgt_version,
        "qemu": qemu_version,
        "figures": {
            f.key: {"title": f.title, "unit": f.unit,
                    "vsand": median_value(results, "vsand", f),
                    "tgt": median_value(results, "tgt", f),
                    "ratio": median_value(results, "vsand", f) / median_value(results, "tgt", f),
                    "cpu_us_per_io": {k: median_value(results, k, f, "cpu_us_per_io")
                                      for k in ("vsand", "tgt")}}
            for f in figures
        },
        "runs": [asdict(m) for m in results],
    }
    stem.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    cmds = sorted({re.sub(r"iscsi://\S+", "iscsi://127.0.0.1:PORT/IQN/LUN",
                          re.sub(r"-c \d+", "-c N", m.command)) for m in results})
    md = [
        f"# vsand vs tgt, {data['date']}",
        "",
        f"Command: `{data['command']}`  ",
        f"{rounds} round(s) x {seconds:g} s per figure and target, medians; targets alternate "
        "figure by figure; backing files (256 MiB, random data) warmed before each run.  ",
        f"Machine: {machine['cpus']} CPUs, Linux {machine['kernel']}, "
        f"Python {machine['python']}; {tgt_version and 'tgt ' + tgt_version}; "
        f"{qemu_version}.",
        "",
        table,
        "",
        "qemu-img bench invocations (N from a probe run, for the time budget):",
        "",
        *[f"    {c}" for c in cmds],
        "",
        "```json",
        json.dumps(data["figures"], indent=2),
        "```",
        "",
    ]
    stem.with_suffix(".md").write_text("\n".join(md))
    print(f"\nwrote {stem.with_suffix('.md')} and {stem.with_suffix('.json')}")


if __name__ == "__main__":
    sys.exit(main())
