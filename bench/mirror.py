#!/usr/bin/env python3
"""A two-node (or, with ``--nodes 3``, three-node) vsand mirror against a single vsand node, on
this machine, in one run.

Both serve one 256 MiB LUN with 512-byte blocks, filled with random data; the mirror's client
talks to node a, which replicates every write to node b over TCP on 127.0.0.1 (both nodes
share this machine's CPUs and page cache with the client, so the mirror pays for two
daemons).  Figures, alternating which setup goes first, medians over the rounds, with
``qemu-img bench`` as in bench/run.py; CPU is that of every daemon of the setup.

Resync throughput: node a starts alone on the random file (with three nodes: a and b, a
majority; b gets a's data at the cluster's first epoch); the last node joins with an empty file and gets a full sync (256 MiB).
Then it stops, 4 KiB writes scatter over the LUN through a, and it returns: a bitmap resync
of the regions those writes dirtied.  Three nodes on this 2-core machine share its CPUs four
ways (three daemons and the client): their figure says what the third replica costs here.

    python bench/mirror.py            # 3 rounds x 5 s per figure and setup
    python bench/mirror.py --quick    # 1 round x 1.5 s
    python bench/mirror.py --nodes 3

Writes bench/results/mirror-<YYYY-MM-DD-HHMM>.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (  # noqa: E402
    LUN_SIZE, MiB, RANDOM_STEP, REPO, Figure, bench_argv, cpu_seconds, fill_random,
    qemu_img_bench, warm,
)

from rig import LunSpec, VsandCluster, VsandTarget  # noqa: E402  (run.py put rig on the path)
from rig.qemu import check_qemu_io  # noqa: E402

FIGURES = (
    Figure("randwrite-4k-qd32", "4 KiB random write QD32", 4096, 32, True, RANDOM_STEP, "IOPS",
           4000),
    Figure("seqwrite-1m-qd8", "1 MiB sequential write QD8", MiB, 8, True, None, "MiB/s", 64),
    Figure("randwrite-4k-qd1", "4 KiB random write QD1", 4096, 1, True, RANDOM_STEP, "IOPS",
           1000),
    Figure("randread-4k-qd32", "4 KiB random read QD32", 4096, 32, False, RANDOM_STEP, "IOPS",
           4000),
)


def measure(url: str, pids: list[int], fig: Figure, seconds: float) -> dict[str, float]:
    probe = qemu_img_bench(bench_argv(url, fig, fig.probe_count), timeout=120)
    count = max(fig.probe_count, int(fig.probe_count / probe * seconds))
    argv = bench_argv(url, fig, count)
    cpu0 = sum(cpu_seconds(p) for p in pids)
    elapsed = qemu_img_bench(argv, timeout=seconds * 10 + 60)
    cpu = sum(cpu_seconds(p) for p in pids) - cpu0
    iops = count / elapsed
    return {"iops": iops, "mib_s": iops * fig.size / MiB, "lat_us": 1e6 / iops * fig.depth,
            "cpu_us_per_io": cpu * 1e6 / count}


def resync_seconds(cluster: VsandCluster, joiner: str,
                   deadline: float = 600) -> tuple[float, int]:
    t0 = time.monotonic()
    node = cluster.nodes[joiner]
    node.restart() if node.proc else node.start()
    cluster.wait_in_sync(deadline)
    dt_s = time.monotonic() - t0
    (state,) = cluster.lun_states("a")
    return dt_s, int(state["resync_bytes"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--seconds", type=float)
    ap.add_argument("--nodes", type=int, choices=(2, 3), default=2)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    names = ("a", "b", "c")[:args.nodes]
    joiner = names[-1]
    rounds = args.rounds or (1 if args.quick else 3)
    seconds = args.seconds or (1.5 if args.quick else 5.0)
    luns = (LunSpec(0, LUN_SIZE, 512),)
    results: dict[str, dict[str, list[dict[str, float]]]] = {"single": {}, "mirror": {}}
    resync: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="vsand-bench-mirror-") as tmp:
        single = VsandTarget(Path(tmp) / "single", luns=luns, log_level="warning")
        cluster = VsandCluster(Path(tmp) / "mirror", names=names, luns=luns, startup_wait=0.5,
                               extra_config={"log_level": "warning"})
        first = names[:-1]
        for path in (single.backing_path(0), cluster.backing_path("a")):
            fill_random(path, LUN_SIZE)
        try:
            single.start()
            a = cluster.nodes["a"].start()
            for n in first[1:]:
                cluster.nodes[n].start()
            cluster.wait_roles({n: "degraded" for n in first}, 30)
            full_s, full_bytes = resync_seconds(cluster, joiner)
            resync["full_mib_s"] = full_bytes / MiB / full_s
            resync["full_bytes"] = full_bytes
            print(f"full resync: {full_bytes / MiB:.0f} MiB in {full_s:.2f} s", flush=True)
            setups = {"single": (single.url(0), lambda: [single.pid]),
                      "mirror": (a.url(0), lambda: [n.pid for n in cluster.nodes.values()])}
            for i, fig in enumerate(FIGURES):
                for rnd in range(rounds):
                    order = ["single", "mirror"] if (i + rnd) % 2 == 0 else ["mirror", "single"]
                    for name in order:
                        url, pids = setups[name]
                        for p in ([single.backing_path(0)] if name == "single" else
                                  [cluster.backing_path(n) for n in names]):
                            warm(p)
                        m = measure(url, pids(), fig, seconds)
                        results[name].setdefault(fig.key, []).append(m)
                        value = m["iops"] if fig.unit == "IOPS" else m["mib_s"]
                        print(f"  {fig.key:18} round {rnd}  {name:6} {value:10.1f} {fig.unit:5}"
                              f"  {m['cpu_us_per_io']:7.1f} us CPU/IO", flush=True)
            # Bitmap resync: the joiner away while 4 KiB writes land on 32 scattered blocks (so
            # in at most 32 of the 256 1 MiB regions).
            cluster.nodes[joiner].stop()
            cluster.wait_roles({n: "degraded" for n in first}, 30)
            cluster.wait_serving(30)
            offsets = [(i * 40503 % 65536) * 4096 for i in range(32)]
            check_qemu_io(a.url(0), [f"write -P 7 {off} 4k" for off in offsets])
            (state,) = cluster.lun_states("a")
            dirty = int(state["dirty_bytes"][joiner])
            before = int(state["resync_bytes"])
            bm_s, after = resync_seconds(cluster, joiner)
            resync.update(bitmap_seconds=bm_s, bitmap_dirty_bytes=dirty,
                          bitmap_resynced_bytes=after - before, bitmap_written_bytes=32 * 4096)
            print(f"bitmap resync: {dirty / MiB:.0f} MiB dirty, {(after - before) / MiB:.0f} MiB"
                  f" copied in {bm_s:.2f} s", flush=True)
        finally:
            single.stop()
            cluster.stop()

    rows = ["| figure | single | mirror | mirror/single | CPU µs/IO single | CPU µs/IO mirror |",
            "|---|---:|---:|---:|---:|---:|"]
    summary = {}
    for fig in FIGURES:
        key = "iops" if fig.unit == "IOPS" else "mib_s"
        s = statistics.median(m[key] for m in results["single"][fig.key])
        m_ = statistics.median(m[key] for m in results["mirror"][fig.key])
        cs = statistics.median(m["cpu_us_per_io"] for m in results["single"][fig.key])
        cm = statistics.median(m["cpu_us_per_io"] for m in results["mirror"][fig.key])
        extra = ""
        if fig.depth == 1:
            extra = (f" (latency {1e6 / s:.0f} vs {1e6 / m_:.0f} µs)")
        rows.append(f"| {fig.title}{extra} | {s:,.0f} {fig.unit} | {m_:,.0f} {fig.unit} | "
                    f"{m_ / s:.2f}x | {cs:.1f} | {cm:.1f} |")
        summary[fig.key] = {"single": s, "mirror": m_, "ratio": m_ / s, "unit": fig.unit}
    rows.append(f"| full resync (256 MiB) | | {resync['full_mib_s']:.0f} MiB/s | | | |")
    rows.append(f"| bitmap resync after {resync['bitmap_written_bytes'] // 1024} KiB of "
                f"scattered writes | | {resync['bitmap_resynced_bytes'] / MiB:.0f} MiB in "
                f"{resync['bitmap_seconds']:.2f} s | | | |")
    table = "\n".join(rows)
    print("\n" + table)
    now = dt.datetime.now()
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"mirror{'' if args.nodes == 2 else '3'}-{now:%Y-%m-%d-%H%M}.md"
    out.write_text("\n".join([
        f"# {('Two', 'Three')[args.nodes - 2]}-node mirror vs single node, "
        f"{now.isoformat(timespec='seconds')}", "",
        f"Command: `{shlex.join([sys.executable, *sys.argv])}`  ",
        f"{rounds} round(s) x {seconds:g} s per figure and setup, medians; setups alternate; "
        "every node and the client on one machine, replication over 127.0.0.1.", "",
        table, "", "```json", json.dumps({"figures": summary, "resync": resync}, indent=2),
        "```", ""]))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
