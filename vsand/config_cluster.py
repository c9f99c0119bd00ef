"""The ``cluster:`` section of vsand's config: 2 or 3 nodes that mirror LUNs synchronously.

Layout (``id``, ``nodes`` and one of ``secret``/``secret_file`` are required)::

    cluster:                        # absent: a single node, nothing mirrored
      id: lab1                      # 1..64 of A-Z a-z 0-9 . _ -, starting with a letter or digit
      secret_file: cluster.secret   # or secret: <text>; 16..1024 bytes, the same on every node
      listen: 0.0.0.0:3270          # this node's replication listener (port default 3270);
                                    # default: 0.0.0.0 (:: if its address is IPv6) on the
                                    # port of its entry in nodes
      nodes:                        # every node, this one (node.name) included; 2..3 entries
        - name: node-a
          address: 192.0.2.10:3270  # where the peers dial it; port default 3270
        - name: node-b
          address: [192.0.2.11:3270, 198.51.100.11:3270]  # or one per network (link)
      heartbeat_interval: 0.5       # seconds, 0.05..10
      peer_timeout: 3.0             # seconds of silence before a peer leaves the in-sync set;
                                    # more than 2 heartbeat intervals
      resync_rate: 0                # bytes per second (sizes as for LUNs); 0 = unlimited
      startup_wait: 10              # seconds a starting node waits for its peers, 0..600
      witness: 192.0.2.12:3270      # two nodes, optional: `vsand witness` there is the
                                    # third vote; a node serves only with two votes
                                    # (mirror/quorum.py).  Three nodes: no witness, the
                                    # majority of the nodes decides (mirror/membership.py)

Several networks between the nodes: ``address`` lists one address per network, the same
number on every node (the i-th addresses of all nodes form link i), all of one node's on one
port.  The nodes link over every network and heartbeat on each; one link carries the
replication, and when it fails the nodes start over on another one that works (a failover of
the in-sync set, as on any loss, then a resync of what was written meanwhile), instead of
staying apart until the failed network is repaired.  ``listen`` must then be a wildcard.

The section is meant to be the same in every node's file; ``node.name`` says which node a
file is for.  A LUN's ``mirror`` key (default true inside a cluster) puts it in the mirror;
``mirror: true`` without a cluster is an error.  A mirrored LUN's wire id is the first two
bytes of sha256("<iqn>/<number>"), so every node computes the same id without coordination;
two mirrored LUNs of one file with the same id are an error (change a LUN number, or set
``mirror: false`` on one of them).

The secret file follows the CHAP secret files' rules (``read_secret_file``: a regular file,
mode 0600 or 0400, the secret on its first line); ``dump_config`` writes an inline secret as
"(redacted)".  Node names follow ``node.name``'s rule, which lives here since it names
cluster members too.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from vsand.config_schema import (
    ADDRESS_ALLOWED, MISSING, REDACTED, SECRET_MAX, Errors, Section, format_address,
    format_size, is_wildcard, join, mistyped, parse_address, read_secret_file,
)
from vsand.mirror.handshake import MIN_SECRET

__all__ = [
    "CLUSTER_PORT", "ClusterConfig", "ClusterNode", "MirrorIds", "check_node_name",
    "cluster_to_dict", "mirror_id", "read_cluster", "read_mirror",
]

CLUSTER_PORT: Final = 3270
CLUSTER_KEYS: Final = ("id", "secret", "secret_file", "listen", "nodes", "witness",
                       "heartbeat_interval",
                       "peer_timeout", "resync_rate", "startup_wait")
NODE_KEYS: Final = ("name", "address")
MIN_NODES: Final = 2
MAX_NODES: Final = 3
MAX_LINKS: Final = 4
MAX_CLUSTER_SECRET: Final = 1024
WITNESS_NAME: Final = "witness"
MAX_CLUSTER_ID: Final = 64
NODE_NAME_ALLOWED: Final = "1..253 of A-Z a-z 0-9 . _ -, starting with a letter or digit"
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SECRET_ALLOWED: Final = (f"{MIN_SECRET}..{MAX_CLUSTER_SECRET} bytes, the same on every node, "
                          f"ideally random")
_FILE_ALLOWED: Final = ("a file only its owner can read, mode 0600 or 0400, with the secret "
                        "on its first line")
_PATH_ALLOWED: Final = "a file path; relative paths are relative to the config file"


@dataclass(frozen=True, slots=True)
class ClusterNode:
    name: str
    host: str  # where the peers dial this node (its first address); never a wildcard
    port: int
    more: tuple[tuple[str, int], ...] = ()  # its addresses on further networks (links 1..)

    @property
    def addresses(self) -> tuple[tuple[str, int], ...]:
        """One address per link, link 0 first."""
        return ((self.host, self.port), *self.more)


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    cluster_id: str
    secret: bytes = field(repr=False)  # inline or from secret_file
    secret_file: str  # absolute, or "" when the secret was inline
    listen_host: str
    listen_port: int
    nodes: tuple[ClusterNode, ...]  # every node, this one included, sorted by name
    heartbeat_interval: float = 0.5
    peer_timeout: float = 3.0
    resync_rate: int = 0  # bytes per second, 0 = unlimited
    startup_wait: float = 10.0
    witness: ClusterNode | None = None  # the third vote (name WITNESS_NAME), if any

    def node(self, name: str) -> ClusterNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def index_of(self, name: str) -> int:
        """The node's position in the name-sorted list: the same on every node."""
        return self.nodes.index(self.node(name))

    def peers(self, me: str) -> tuple[ClusterNode, ...]:
        """Every node but `me`, in name order."""
        self.node(me)  # KeyError for a name that is not a member
        return tuple(n for n in self.nodes if n.name != me)


# ---------------------------------------------------------------------------------------------
# Names and LUN ids


def check_node_name(text: str) -> str:
    """A node name (``node.name``, ``cluster.nodes[].name``); ValueError says why not."""
    if len(text) > 253 or not _NAME_RE.fullmatch(text):
        raise ValueError("is not a valid node name")
    return text


def _check_cluster_id(text: str) -> str:
    if len(text) > MAX_CLUSTER_ID or not _NAME_RE.fullmatch(text):
        raise ValueError("is not a valid cluster id")
    return text


def mirror_id(iqn: str, number: int) -> int:
    """The 16-bit id the peer protocol carries for LUN `number` of target `iqn` (lower case)."""
    return int.from_bytes(hashlib.sha256(f"{iqn}/{number}".encode()).digest()[:2], "big")


def read_mirror(sec: Section, clustered: bool, iqn: str | None,
                number: int | None) -> tuple[bool | None, int]:
    """A LUN's ``mirror`` key and its id (0 when not mirrored or not computable)."""
    mirror = sec.boolean("mirror", clustered)
    if mirror and not clustered:
        sec.error("mirror", "is true, but the file has no cluster section (allowed: false, or "
                            "a cluster section naming the nodes to mirror to)")
        return None, 0
    if not mirror or iqn is None or number is None:
        return mirror, 0
    return mirror, mirror_id(iqn, number)


class MirrorIds:
    """Finds two mirrored LUNs of one file that the peer protocol could not tell apart."""

    def __init__(self, errors: Errors) -> None:
        self.errors = errors
        self.seen: dict[int, str] = {}  # mirror id -> key path of its first LUN

    def add(self, path: str, lun_id: int) -> None:
        first = self.seen.setdefault(lun_id, path)
        if first != path:
            self.errors.add(path, f"its mirror id {lun_id} (from sha256 of <iqn>/<number>) is "
                                  f"already that of {first} (allowed: another LUN number, or "
                                  f"mirror: false on one of the two)")


# ---------------------------------------------------------------------------------------------
# Reading the section


def read_cluster(top: Section, node_name: str | None, check_path: Callable[[str], str],
                 binds: list[tuple[str, tuple[str, int]]]) -> ClusterConfig | None:
    """The ``cluster:`` section: None when absent, or after recording errors.

    `node_name` is this file's node (None if it was invalid); the listen address is appended
    to `binds` for the overlap check.
    """
    if top.raw("cluster") is MISSING:
        return None
    errors = top.errors
    start = len(errors.lines)
    sec = Section(errors, "cluster", top.raw("cluster"), CLUSTER_KEYS)
    cluster_id = sec.string("id", None, f"1..{MAX_CLUSTER_ID} of A-Z a-z 0-9 . _ -, starting "
                            f"with a letter or digit", "the cluster's name, the same on every "
                            "node", check=_check_cluster_id)
    secret, secret_file = _read_secret(sec, check_path)
    nodes = _read_nodes(sec, node_name)
    me = next((n for n in nodes if n.name == node_name), None)
    listen: tuple[str, int] | None = None
    if sec.raw("listen") is not MISSING:
        text = sec.string("listen", None, ADDRESS_ALLOWED)
        if text is not None:
            try:
                listen = parse_address(text, CLUSTER_PORT)
            except ValueError as exc:
                sec.error("listen", f"{text!r} {exc} (allowed: {ADDRESS_ALLOWED})")
    elif me is not None:
        listen = ("::" if ":" in me.host else "0.0.0.0", me.port)
    if listen is not None and me is not None and me.more and not is_wildcard(listen[0]):
        sec.error("listen", f"{format_address(*listen)} is one address, but this node has "
                            f"{1 + len(me.more)} (allowed: a wildcard such as 0.0.0.0:"
                            f"{listen[1]}, or no listen key, so that every link is accepted)")
    if listen is not None:
        binds.append((sec.at("listen"), listen))

    interval = sec.seconds("heartbeat_interval", 0.5, 0.05, 10.0, True)
    timeout = sec.seconds("peer_timeout", 3.0, 0.0, 3600.0, False)
    if interval is not None and timeout is not None and timeout <= 2 * interval:
        sec.error("peer_timeout", f"{timeout:g} is not more than twice heartbeat_interval "
                                  f"{interval:g}, so one late heartbeat would drop a peer "
                                  f"(allowed: more than {2 * interval:g} seconds)")
    resync_rate = sec.size("resync_rate", 0)
    startup_wait = sec.seconds("startup_wait", 10.0, 0.0, 600.0, True)
    witness: ClusterNode | None = None
    if sec.raw("witness") is not MISSING:
        text = sec.string("witness", None, "host:port of the witness (vsand witness)")
        if text is not None:
            try:
                host, port = parse_address(text, CLUSTER_PORT)
            except ValueError as exc:
                sec.error("witness", f"{text!r} {exc} (allowed: {ADDRESS_ALLOWED})")
            else:
                if is_wildcard(host):
                    sec.error("witness", f"{text!r} is a wildcard address (allowed: an "
                                         "address the nodes can reach)")
                witness = ClusterNode(WITNESS_NAME, host, port)
                if len(nodes) > 2:
                    sec.error("witness", f"{len(nodes)} nodes vote among themselves (a "
                                         "majority of the data nodes); a witness is the "
                                         "third vote of two nodes only (allowed: no witness "
                                         "key with three or more nodes)")
    if any(n.name == WITNESS_NAME for n in nodes):
        sec.error("nodes", f"a node is called {WITNESS_NAME!r} (allowed: any other name; "
                           "it names the witness)")

    if len(errors.lines) != start:
        return None
    assert cluster_id is not None and secret is not None and listen is not None
    assert interval is not None and timeout is not None and resync_rate is not None
    assert startup_wait is not None
    return ClusterConfig(cluster_id, secret, secret_file, listen[0], listen[1],
                         tuple(sorted(nodes, key=lambda n: n.name)), interval, timeout,
                         resync_rate, startup_wait, witness)


def _read_secret(sec: Section, check_path: Callable[[str], str]) -> tuple[bytes | None, str]:
    """(secret, absolute secret_file or ""); (None, ...) after recording an error."""
    inline, in_file = sec.raw("secret") is not MISSING, sec.raw("secret_file") is not MISSING
    if inline and in_file:
        sec.error("secret_file", "is given together with secret (allowed: one of secret and "
                                 "secret_file)")
        return None, ""
    if not inline and not in_file:
        sec.error("secret", f"missing (required: secret or secret_file, {_SECRET_ALLOWED})")
        return None, ""
    if inline:
        text = sec.string("secret", None, _SECRET_ALLOWED)
        return (None if text is None else _checked(sec, "secret", text.encode())), ""
    path = sec.string("secret_file", None, _PATH_ALLOWED, check=check_path)
    if path is None:
        return None, ""
    try:
        secret = _read_secret_file(path)
    except ValueError as exc:
        sec.error("secret_file", f"{path!r} {exc} (allowed: {_FILE_ALLOWED})")
        return None, path
    return _checked(sec, "secret_file", secret, f"the first line of {path!r}"), path


def _read_secret_file(path: str) -> bytes:
    """`read_secret_file` (owner-only mode, first line) without its CHAP length cap."""
    secret = read_secret_file(path)
    if len(secret) <= SECRET_MAX:
        return secret  # read_secret_file saw the end of the line
    # It stops reading after SECRET_MAX + 2 bytes: read the rest of a longer first line.
    try:
        with open(path, "rb") as f:
            first = f.readline(MAX_CLUSTER_SECRET + 2).rstrip(b"\n")
    except OSError as exc:
        raise ValueError(f"cannot be read: {exc.strerror or exc}") from None
    return first[:-1] if first.endswith(b"\r") else first


def _checked(sec: Section, key: str, secret: bytes, what: str = "the secret") -> bytes | None:
    n = len(secret)  # never the secret itself in a message: only its length
    if MIN_SECRET <= n <= MAX_CLUSTER_SECRET:
        return secret
    problem = f"is {n} bytes long" if n < MIN_SECRET else \
        f"is longer than {MAX_CLUSTER_SECRET} bytes"
    sec.error(key, f"{what} {problem} (allowed: {_SECRET_ALLOWED})")
    return None


def _read_nodes(sec: Section, node_name: str | None) -> list[ClusterNode]:
    """The ``nodes`` list; only entries without errors are returned."""
    nodes: list[ClusterNode] = []
    names: dict[str, str] = {}  # name -> key path of its first use
    addresses: dict[tuple[str, int], str] = {}
    links: tuple[int, str] | None = None  # addresses per node, and who said so first
    items = sec.items("nodes", f"every node of the cluster, this one included, "
                               f"{MIN_NODES}..{MAX_NODES} entries")
    if items and not MIN_NODES <= len(items) <= MAX_NODES:
        sec.error("nodes", f"has {len(items)} entr{'y' if len(items) == 1 else 'ies'} "
                           f"(allowed: {MIN_NODES}..{MAX_NODES} nodes, this one included)")
    for path, item in items:
        entry = Section(sec.errors, path, item, NODE_KEYS)
        name = entry.string("name", None, NODE_NAME_ALLOWED, "the node's node.name",
                            check=check_node_name)
        if name is not None:
            if name in names:
                entry.error("name", f"{name!r} is already used by {names[name]} (allowed: a "
                                    f"name unique among the nodes)")
            names.setdefault(name, join(path, "name"))
        found = _read_addresses(entry, path, addresses)
        if found is not None:
            if links is None:
                links = (len(found), join(path, "address"))
            elif len(found) != links[0]:
                entry.error("address", f"lists {len(found)} address(es), {links[1]} "
                                       f"{links[0]} (allowed: as many as every other node: "
                                       f"the i-th addresses of all nodes form link i)")
        if name is not None and found is not None:
            nodes.append(ClusterNode(name, found[0][0], found[0][1], tuple(found[1:])))
    if node_name is not None and items and node_name not in names:
        sec.error("nodes", f"no entry is named {node_name!r}, this file's node.name (required: "
                           f"an entry for this node; node.name defaults to the host name)")
    return nodes


def _read_addresses(entry: Section, path: str, seen: dict[tuple[str, int], str]
                    ) -> list[tuple[str, int]] | None:
    """A node's ``address``: one host:port, or a list of them (one per link)."""
    allowed = (f"host:port (port default {CLUSTER_PORT}), or a list of 1..{MAX_LINKS} of "
               "them, one per network")
    raw = entry.raw("address")
    if raw is MISSING:
        entry.error("address", f"missing (required: where the peers reach this node, "
                               f"{allowed})")
        return None
    texts = raw if isinstance(raw, list) else [raw]
    if not 1 <= len(texts) <= MAX_LINKS:
        entry.error("address", f"lists {len(texts)} addresses (allowed: {allowed})")
        return None
    out: list[tuple[str, int]] = []
    for i, text in enumerate(texts):
        key = "address" if not isinstance(raw, list) else f"address[{i}]"
        if not isinstance(text, str):
            entry.error(key, f"{mistyped(text, 'a string')} (allowed: {allowed})")
            return None
        try:
            address = parse_address(text, CLUSTER_PORT)
        except ValueError as exc:
            entry.error(key, f"{text!r} {exc} (allowed: {ADDRESS_ALLOWED})")
            return None
        if is_wildcard(address[0]):
            entry.error(key, f"{address[0]!r} is a wildcard, which peers cannot connect to "
                             f"(allowed: a concrete address or host name)")
            return None
        if address in seen:
            entry.error(key, f"{format_address(*address)} is already used by "
                             f"{seen[address]} (allowed: an address unique among the nodes)")
            return None
        if out and address[1] != out[0][1]:
            entry.error(key, f"port {address[1]} is not the port of the node's first address "
                             f"({out[0][1]}) (allowed: one port for all of a node's addresses:"
                             f" one listener accepts every link)")
            return None
        seen[address] = join(path, key)
        out.append(address)
    return out


def cluster_to_dict(cluster: ClusterConfig) -> dict[str, Any]:
    """File layout of the section; an inline secret is written as "(redacted)"."""
    out: dict[str, Any] = {"id": cluster.cluster_id}
    if cluster.secret_file:
        out["secret_file"] = cluster.secret_file
    else:
        out["secret"] = REDACTED
    out["listen"] = format_address(cluster.listen_host, cluster.listen_port)
    out["nodes"] = [{"name": n.name, "address": format_address(n.host, n.port) if not n.more
                     else [format_address(*a) for a in n.addresses]} for n in cluster.nodes]
    out["heartbeat_interval"] = cluster.heartbeat_interval
    out["peer_timeout"] = cluster.peer_timeout
    out["resync_rate"] = format_size(cluster.resync_rate)
    out["startup_wait"] = cluster.startup_wait
    if cluster.witness is not None:
        out["witness"] = format_address(cluster.witness.host, cluster.witness.port)
    return out
