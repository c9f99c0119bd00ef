"""``vsanctl``: talk to a running vsand over its admin socket."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .admin import request

DEFAULT_SOCKET = "./vsand-data/vsand.sock"


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "(none)"
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths))]
    for r in rows:
        lines.append("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))
    return "\n".join(lines)


def _cluster_text(result: dict[str, Any]) -> str:
    if not result:
        return "not part of a cluster"
    # links: each network's link, "*" on the one that carries the replication
    peers = [{"peer": name, **p, "drift": ", ".join(p.get("drift") or []) or "-",
              "links": " ".join(f"{x['link']}:{x['state']}{'*' if x['active'] else ''}"
                                for x in p.get("links", ()))}
             for name, p in result["peers"].items()]
    def activity(m: dict[str, Any]) -> str:
        r, v = m.get("resync"), m.get("verify")
        if r:
            return (f"resync to {r['to']}: {r['bytes_remaining'] >> 20} MiB left, "
                    f"{r['rate_mib_s']} MiB/s, ETA {r['eta_s']} s")
        if v:
            state = "running" if v["running"] else "done"
            return (f"verify {state}: {v['regions_checked']}/{v['regions_total']} regions, "
                    f"{v['mismatches']} differ"
                    + (f", {v['repaired_regions']} repaired" if v.get("repair") else ""))
        return ""

    luns = [{"lun": label, "role": m["role"], "epoch": m["epoch"],
             "in_sync": ",".join(m["in_sync"]), "generation": m["generation"],
             "dirty": ",".join(f"{p}:{n}" for p, n in m["dirty_bytes"].items()),
             "decision": m["last_decision"], "activity": activity(m)}
            for label, m in result["luns"].items()]
    return (f"cluster {result['cluster']}, node {result['node']}, vsand {result['version']}, "
            f"shared config {result['config_digest']}\n"
            + _table(peers, ["peer", "address", "state", "links", "rtt_ms", "version",
                             "config_digest", "drift"]) + "\n\n"
            + _table(luns, ["lun", "role", "epoch", "in_sync", "generation", "dirty",
                            "decision", "activity"]))


def _verify(args: argparse.Namespace) -> int:
    import time
    try:
        st = request(args.socket, "verify", lun=args.lun, repair=args.repair)
        while args.wait and st.get("running"):
            print(f"\r{st['lun']}: {st['regions_checked']}/{st['regions_total']} regions, "
                  f"{st['mismatches']} differ, ETA {st['eta_s']} s   ", end="", flush=True,
                  file=sys.stderr)
            time.sleep(1)
            st = request(args.socket, "verify", lun=args.lun, progress=True)
    except (OSError, RuntimeError, ValueError) as e:
        print(f"vsanctl: {args.socket}: {e}", file=sys.stderr)
        return 1
    if args.wait:
        print(file=sys.stderr)
    if args.json:
        print(json.dumps(st, indent=2))
    elif args.wait:
        print(f"{st['lun']}: {st['regions_checked']} regions compared, "
              f"{st['regions_skipped']} skipped, {st['mismatches']} differ"
              + (f" (regions {st['differing_regions']})" if st["mismatches"] else "")
              + (f", {st['repaired_regions']} repaired from this node" if st.get("repair")
                 else ""))
    else:
        print(f"{st['lun']}: verify started ({st['regions_total']} regions); "
              "`vsanctl cluster` or `vsanctl verify --wait` shows progress")
    return 3 if args.wait and st["mismatches"] > st.get("repaired_regions", 0) else 0


def _drill(args: argparse.Namespace) -> int:
    if not args.yes:
        print("vsanctl: a drill writes the LUN's last 256 KiB while it runs (saved first, "
              "restored after); add --yes", file=sys.stderr)
        return 2
    if args.portals or args.path:
        return _path_drill(args)
    print(f"drill on {args.lun}: verify, then the peer hangs for {args.seconds:g} s ...",
          file=sys.stderr)
    try:
        r = request(args.socket, "drill", timeout=args.seconds * 4 + 600, lun=args.lun,
                    seconds=args.seconds, consent=True)
    except (OSError, RuntimeError, ValueError) as e:
        print(f"vsanctl: {args.socket}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"{r['lun']}: peer {r['peer']} hung for {r['freeze_s']:g} s\n"
              f"  verify before: {r['verify_before']['regions']} regions, "
              f"{r['verify_before']['differ']} differ\n"
              f"  RTO: longest write stall {r['stall_s']} s; {r['write_errors']} write "
              f"error(s); {r['writes_acknowledged']} writes acknowledged\n"
              f"  RPO: {r['lost_writes']} acknowledged write(s) lost\n"
              f"  peer back in sync after {r['rejoin_s']} s (quorum epoch "
              f"{r['quorum_epoch']})\n"
              f"  verify after: {r['verify_after']['regions']} regions, "
              f"{r['verify_after']['differ']} differ")
    ok = (r["lost_writes"] == 0 and r["verify_before"]["differ"] == 0
          and r["verify_after"]["differ"] == 0)
    return 0 if ok else 3


def _path_drill(args: argparse.Namespace) -> int:
    from .config_schema import read_secret_file
    from .drill_paths import run_path_drill
    from .initiator import IoFailed, PathError
    chap = None
    try:
        if args.chap_user:
            if not args.chap_secret_file:
                raise ValueError("--chap-user needs --chap-secret-file")
            try:
                chap = (args.chap_user, read_secret_file(args.chap_secret_file))
            except ValueError as e:
                raise ValueError(f"{args.chap_secret_file} {e}") from None
        r = run_path_drill(args.socket, args.lun, args.seconds, paths=args.path or [],
                           initiator=args.initiator_name, chap=chap,
                           io_timeout=args.io_timeout,
                           progress=lambda line: print(line, file=sys.stderr, flush=True))
    except (OSError, RuntimeError, ValueError, PathError, IoFailed) as e:
        print(f"vsanctl: drill: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        lost = ", ".join(f"{p} {n}" for p, n in r["lost_by_path"].items())
        print(f"{r['lun']}: peer {r['peer']} hung for {r['freeze_s']:g} s; writes through "
              f"{', '.join(r['paths'])}\n"
              f"  verify before: {r['verify_before']['regions']} regions, "
              f"{r['verify_before']['differ']} differ\n"
              f"  RTO: longest write stall {r['stall_s']} s; {r['write_errors']} error(s) "
              f"reached the application; {r['retried_on_another_path']} command(s) sent again "
              f"on another path; {r['writes_acknowledged']} writes acknowledged\n"
              f"  RPO: {r['lost_writes']} acknowledged write(s) lost (read back per path: "
              f"{lost})\n"
              f"  peer back in sync after {r['rejoin_s']} s (quorum epoch "
              f"{r['quorum_epoch']})\n"
              f"  verify after: {r['verify_after']['regions']} regions, "
              f"{r['verify_after']['differ']} differ")
    ok = (r["lost_writes"] == 0 and r["write_errors"] == 0
          and r["verify_before"]["differ"] == 0 and r["verify_after"]["differ"] == 0)
    return 0 if ok else 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vsanctl", description="manage a running vsand")
    parser.add_argument("-s", "--socket", default=DEFAULT_SOCKET,
                        help=f"admin socket (default {DEFAULT_SOCKET}; the config's admin_socket)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("status", "daemon, portals, sessions"), ("sessions", "iSCSI sessions"),
                       ("luns", "LUNs and their I/O counters"),
                       ("cluster", "peer links and the replication state of mirrored LUNs"),
                       ("reload", "re-read the config file and apply what changed")):
        sub.add_parser(name, help=text)
    a = sub.add_parser("alua", help="show or set the ALUA access state of LUNs (testing, drills)")
    a.add_argument("--target", default="", help="target IQN (default: all)")
    a.add_argument("--lun", type=int, help="LUN number (default: all)")
    a.add_argument("state", nargs="?", default="",
                   help="active-optimized, active-non-optimized, standby, unavailable, "
                        "transitioning")
    r = sub.add_parser("resolve", help="after a split brain: keep THIS node's data of a "
                       "mirrored LUN; the other node's diverged writes are discarded")
    r.add_argument("lun", help="the LUN's serial (see vsanctl cluster)")
    r.add_argument("--discard-peer-data", action="store_true",
                   help="required: confirms that the peer's diverged writes are discarded")
    v = sub.add_parser("verify", help="compare the checksums of every region of a mirrored "
                       "LUN across its replicas, while I/O runs")
    v.add_argument("lun", help="the LUN's serial (see vsanctl cluster)")
    v.add_argument("--wait", action="store_true", help="show progress until it ends; exit "
                   "status 3 when regions differ (and were not repaired)")
    v.add_argument("--repair", action="store_true", help="THIS node's data is right: copy it "
                   "over the peer's in every region that differs (run it on the node you "
                   "trust; writes pause on both nodes for each batch of 8 regions)")
    d = sub.add_parser("drill", help="failover drill: the peer plays a hung node; measures the "
                       "I/O stall and lost writes, verifies the replicas before and after")
    d.add_argument("lun", help="the LUN's serial (see vsanctl cluster)")
    d.add_argument("--seconds", type=float, default=5.0, help="how long the peer hangs "
                   "(default 5; more than the peer timeout, or nothing fails over)")
    d.add_argument("--yes", action="store_true", help="required: the drill writes the LUN's "
                   "last 256 KiB (saved before, restored after); writes of others there are lost")
    d.add_argument("--portals", action="store_true", help="write as a multipath initiator "
                   "through this node's and the peer's first portals (iSCSI), not inside the "
                   "daemon: the stall includes the path switch")
    d.add_argument("--path", action="append", metavar="HOST:PORT",
                   help="a portal to write through (repeat; implies --portals)")
    d.add_argument("--initiator-name", default="iqn.2026-11.org.vsand:drill",
                   help="the drill's initiator IQN (an ACL must admit it)")
    d.add_argument("--chap-user", help="CHAP user name, if the target asks for CHAP")
    d.add_argument("--chap-secret-file", help="the CHAP secret (a file, mode 0600)")
    d.add_argument("--io-timeout", type=float, default=5.0,
                   help="seconds before a command that got no answer fails over to another "
                        "path (default 5, as open-iscsi's NOP timeout)")
    args = parser.parse_args(argv)
    if args.command == "verify":
        return _verify(args)
    if args.command == "drill":
        return _drill(args)
    extra: dict[str, Any] = {}
    if args.command == "alua":
        extra = {"target": args.target, "lun": args.lun, "state": args.state}
    elif args.command == "resolve":
        if not args.discard_peer_data:
            print("vsanctl: resolve discards the peer's writes since the split; add "
                  "--discard-peer-data to confirm", file=sys.stderr)
            return 2
        extra = {"lun": args.lun}
    try:
        result = request(args.socket, args.command, **extra)
    except (OSError, RuntimeError, ValueError) as e:
        print(f"vsanctl: {args.socket}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.command == "status":
        for k, v in result.items():
            print(f"{k:>14}: {v}")
    elif args.command == "sessions":
        print(_table(result, ["tsih", "initiator", "isid", "target", "peer", "tasks"]))
    elif args.command == "reload":
        for line in result["changes"] or ["nothing changed"]:
            print(line)
        for line in result["restart_needed"]:
            print(f"needs a restart: {line}")
    elif args.command == "alua":
        print(_table(result, ["target", "lun", "state", "port_group"]))
    elif args.command == "cluster":
        print(_cluster_text(result))
    elif args.command == "resolve":
        peers = ", ".join(result["full_resync_to"]) or "the peer, when it connects"
        print(f"{result['lun']}: this node's data survives; full resync to {peers}")
    else:
        print(_table(result, ["target", "lun", "path", "blocks", "block_size", "read_only",
                              "read_ops", "write_ops"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
