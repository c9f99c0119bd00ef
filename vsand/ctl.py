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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vsanctl", description="manage a running vsand")
    parser.add_argument("-s", "--socket", default=DEFAULT_SOCKET,
                        help=f"admin socket (default {DEFAULT_SOCKET}; the config's admin_socket)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.add_argument("command", choices=["status", "sessions", "luns"])
    args = parser.parse_args(argv)
    try:
        result = request(args.socket, args.command)
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
    else:
        print(_table(result, ["target", "lun", "path", "blocks", "block_size", "read_only",
                              "read_ops", "write_ops"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
