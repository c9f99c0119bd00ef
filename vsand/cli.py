"""The ``vsand`` command: run the daemon, check a config file, start a local demo cluster."""

from __future__ import annotations

import argparse
import logging
import sys

from .config import Config, ConfigError, default_config, load_config


def _setup_logging(level: str) -> None:
    # One line per event, no timestamps of our own when journald adds them.
    import os
    fmt = "%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") else \
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format=fmt,
                        stream=sys.stderr)


def _how_to_connect(config: Config) -> str:
    lines = ["vsand is serving:"]
    for p in config.portals:
        host = "127.0.0.1" if p.advertise_wildcard else p.advertise_host
        hp = f"[{host}]" if ":" in host else host
        for t in config.targets:
            for lun in t.luns:
                lines.append(f"  iscsi://{hp}:{p.advertise_port}/{t.iqn}/{lun.number}"
                             f"   ({lun.size // (1 << 20) if lun.size else '?'} MiB, "
                             f"{lun.path})")
        lines.append("  open-iscsi:")
        lines.append(f"    iscsiadm -m discovery -t sendtargets -p {hp}:{p.advertise_port}")
        for t in config.targets:
            lines.append(f"    iscsiadm -m node -T {t.iqn} -p {hp}:{p.advertise_port} --login")
    lines.append("  quick check: iscsi-inq iscsi://%s:%d/%s/0" % (
        "127.0.0.1" if config.portals[0].advertise_wildcard else config.portals[0].advertise_host,
        config.portals[0].advertise_port, config.targets[0].iqn))
    return "\n".join(lines)


def _witness(args: argparse.Namespace) -> int:
    from .config_schema import parse_address, read_secret_file
    from .mirror.handshake import MIN_SECRET
    from .witness import run
    try:
        host, port = parse_address(args.listen, 3270)
    except ValueError as e:
        print(f"vsand witness: --listen {args.listen!r}: {e}", file=sys.stderr)
        return 2
    try:
        secret = read_secret_file(args.secret_file)
    except ValueError as e:
        print(f"vsand witness: --secret-file {args.secret_file}: {e}", file=sys.stderr)
        return 2
    if len(secret) < MIN_SECRET:
        print(f"vsand witness: --secret-file {args.secret_file}: shorter than {MIN_SECRET} "
              "bytes", file=sys.stderr)
        return 2
    nodes = [n for n in args.nodes.split(",") if n]
    if len(nodes) != 2:
        print("vsand witness: --nodes: two node names (a two-node cluster's third vote)",
              file=sys.stderr)
        return 2
    _setup_logging(args.log_level)
    return run({"host": host, "port": port, "witness": {
        "cluster_id": args.cluster_id, "secret": secret, "nodes": nodes,
        "state_dir": args.state_dir, "heartbeat_interval": args.heartbeat_interval,
        "peer_timeout": args.peer_timeout}})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vsand", description="vsand storage target daemon")
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="run the daemon")
    run_p.add_argument("-c", "--config", help="YAML config file (default: built-in single-node "
                       "config serving ./vsand-data/lun0.img on 127.0.0.1:3260)")
    run_p.add_argument("--data-dir", default="./vsand-data",
                       help="data directory of the built-in config")
    check_p = sub.add_parser("check-config", help="validate a config file and exit")
    check_p.add_argument("file")
    demo_p = sub.add_parser("demo", help="run a two-node mirrored cluster on 127.0.0.1 to try")
    demo_p.add_argument("--dir", default="./vsand-demo",
                        help="configs, logs and LUN files (default ./vsand-demo)")
    demo_p.add_argument("--base-port", type=int, default=3260,
                        help="iSCSI port of node a (default 3260); node b uses +1, "
                             "replication +10/+11, metrics +6210/+6211")
    demo_p.add_argument("--size", default="1GiB", help="LUN size (default 1GiB)")
    w = sub.add_parser("witness", help="run the witness: the third vote of a two-node "
                       "cluster (no data)")
    w.add_argument("--cluster-id", required=True, help="the nodes' cluster.id")
    w.add_argument("--nodes", required=True, help="the nodes' names, comma-separated")
    w.add_argument("--listen", default="0.0.0.0:3270",
                   help="host:port the nodes dial (their cluster.witness); default 0.0.0.0:3270")
    w.add_argument("--secret-file", required=True,
                   help="the cluster secret (mode 0600, first line), as on the nodes")
    w.add_argument("--state-dir", default="/var/lib/vsand-witness",
                   help="where the vote record lives (default /var/lib/vsand-witness)")
    w.add_argument("--heartbeat-interval", type=float, default=0.5)
    w.add_argument("--peer-timeout", type=float, default=3.0)
    w.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    if args.command == "witness":
        return _witness(args)

    if args.command == "demo":
        from .demo import run_demo
        return run_demo(args.dir, base_port=args.base_port, size=args.size)

    if args.command == "check-config":
        try:
            cfg = load_config(args.file)
        except ConfigError as e:
            for line in e.errors:
                print(line, file=sys.stderr)
            return 2
        n = sum(len(t.luns) for t in cfg.targets)
        print(f"{args.file}: OK ({len(cfg.targets)} target(s), {n} LUN(s), "
              f"{len(cfg.portals)} portal(s))")
        return 0

    try:
        cfg = load_config(args.config) if args.config else default_config(args.data_dir)
    except ConfigError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        return 2
    _setup_logging(cfg.log_level)
    print(_how_to_connect(cfg), file=sys.stderr, flush=True)
    from .daemon import run
    try:
        return run(cfg)
    except OSError as e:
        logging.getLogger("vsand").error("cannot start: %s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
