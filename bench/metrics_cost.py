#!/usr/bin/env python3
"""Cost of metrics on 4 KiB random reads at QD32: vsand with its Prometheus endpoint on and
scraped once a second, against vsand with the endpoint off, in one run, alternating.

The per-I/O counters and latency histograms are always kept (they are plain integer adds on
the I/O path); what a user switches is the endpoint and the scraping, which is what this
measures.  The counters' own cost is measured separately as a micro figure (two clock reads and
four integer adds per request, timed in a loop) and printed next to the ratio.

    python bench/metrics_cost.py           # 3 rounds x 5 s
    python bench/metrics_cost.py --quick   # 1 round x 1.5 s
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import threading
import timeit
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "integration"))
sys.path.insert(0, str(REPO / "bench"))

from rig import LunSpec, VsandTarget, free_port  # noqa: E402
from run import FIGURES, LUN_SIZE, fill_random, measure, warm  # noqa: E402

FIG = FIGURES[0]  # 4 KiB random read QD32


def scraper(port: int, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()


def counter_cost_ns() -> float:
    """The I/O path's bookkeeping per request, as the LUN does it."""
    setup = ("import time\nnow=time.perf_counter_ns\nhist=[0]*64\n"
             "class L: pass\nl=L(); l.ops=0; l.bytes=0; l.ns=0")
    stmt = ("t0=now(); dt=now()-t0; l.ops+=1; l.bytes+=4096; l.ns+=dt; "
            "hist[(dt>>10).bit_length()]+=1")
    n = 200_000
    return min(timeit.repeat(stmt, setup, number=n, repeat=5)) / n * 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rounds, seconds = (1, 1.5) if args.quick else (3, 5.0)
    results: dict[bool, list[float]] = {True: [], False: []}
    cpu: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory(prefix="vsand-metrics-") as tmp:
        mport = free_port()
        targets = {
            True: VsandTarget(Path(tmp) / "on", luns=(LunSpec(0, LUN_SIZE, 512),),
                              log_level="warning",
                              extra_config={"metrics": {"listen": f"127.0.0.1:{mport}"}}),
            False: VsandTarget(Path(tmp) / "off", luns=(LunSpec(0, LUN_SIZE, 512),),
                               log_level="warning"),
        }
        for t in targets.values():
            fill_random(t.backing_path(0), LUN_SIZE)
            t.start()
        stop = threading.Event()
        th = threading.Thread(target=scraper, args=(mport, stop), daemon=True)
        th.start()
        try:
            for r in range(rounds):
                for on in ((True, False) if r % 2 == 0 else (False, True)):
                    t = targets[on]
                    warm(t.backing_path(0))
                    m = measure(t, FIG, seconds, r)
                    results[on].append(m.iops)
                    cpu[on].append(m.cpu_us_per_io)
                    print(f"  round {r} metrics {'on ' if on else 'off'} {m.iops:10.0f} IOPS "
                          f"{m.cpu_us_per_io:6.1f} us CPU/IO", flush=True)
        finally:
            stop.set()
            for t in targets.values():
                t.stop()
    on, off = statistics.median(results[True]), statistics.median(results[False])
    c_on, c_off = statistics.median(cpu[True]), statistics.median(cpu[False])
    ns = counter_cost_ns()
    table = (f"| figure | metrics on (scraped 1/s) | off | on/off | CPU µs/IO on | off |\n"
             f"|---|---:|---:|---:|---:|---:|\n"
             f"| {FIG.title} | {on:,.0f} IOPS | {off:,.0f} IOPS | {on / off:.3f}x | "
             f"{c_on:.1f} | {c_off:.1f} |\n\n"
             f"Per-request bookkeeping on the I/O path (always on): {ns:.0f} ns, "
             f"{ns / 1000 / c_off * 100:.1f} % of the CPU per I/O above.")
    print()
    print(table)
    out = REPO / "bench" / "results" / f"metrics-{dt.datetime.now():%Y-%m-%d-%H%M}.md"
    out.write_text(f"# Cost of metrics, {dt.datetime.now():%Y-%m-%dT%H:%M}\n\n"
                   f"Command: `python bench/metrics_cost.py{' --quick' if args.quick else ''}`"
                   f"  \n{rounds} round(s) x {seconds:g} s, medians, alternating.\n\n{table}\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
