"""Two vsand nodes, their witness and a client, each in its own network namespace, on one
bridge whose every path can be cut, in one direction or both.

Topology.  ``FaultNet`` makes five namespaces: a bridge namespace holding the Linux bridge
``br0``, and one namespace per member: ``a`` and ``b`` (the nodes), ``w`` (the witness) and
``c`` (the client).  Each member has one veth pair: one end in the member's namespace with the
member's address (``.1`` node a, ``.2`` node b, ``.3`` witness, ``.4`` client of a /24,
10.232.0.0/24 by default), the other end a port of ``br0``.  Every member reaches every
other one through the bridge, so each pair of members has a path of its own: the client's
traffic to node a shares nothing with node b's traffic to node a.

Cuts.  Every member namespace holds one nftables table (``inet vsandfault``): a set of
blocked source addresses and an input chain, at raw priority, that drops every packet from an
address in that set.  ``cut_one_way(src, dst)`` puts ``src``'s address into ``dst``'s set:
packets from ``src`` to ``dst`` vanish on arrival (the sender sees no error, as on a lossy
network) while ``dst``'s packets to ``src`` still arrive.  ``cut(x, y)`` does both directions.
``heal`` takes them out again.  ARP is never filtered, so a healed path works at once.  The
rules live inside the namespaces and go with them.

A second network.  ``FaultNet(second_subnet=...)`` adds a veth pair straight between ``a``
and ``b`` with addresses ``.1`` and ``.2`` of that subnet (``addresses2``): a second network
between the nodes only.  ``cut``/``cut_one_way``/``throttle`` act on every network between
the members unless given ``network`` (0: the bridge, 1: the second one), so a "cut a|b"
still means the nodes are apart.

Slow paths.  ``throttle(x, y, bits_per_s)`` limits what ``x`` sends to ``y`` and ``y`` to
``x`` (an HTB class on each one's veth, chosen by destination address: the pair's path alone
slows down, the rest stays fast); ``unthrottle()`` removes every limit.  HTB, not netem: a
rate limit needs nothing beyond the kernel's HTB and u32 classifier, which the test machines
have.  Needs the ``tc`` command.

Processes run inside with ``run_argv(member, argv)`` (``ip netns exec``) and must be ended
before ``close()``; ``vsand_target`` is a ``VsandCluster`` target factory (node ``a`` in
namespace ``a``...), and ``witness_netns``/``addresses["w"]`` are for ``VsandCluster``'s
witness.  ``connect(member, host, port)`` opens a TCP connection from inside a member's
namespace and hands the socket back: a thread of this process enters the namespace
(``setns`` changes only the calling thread's), connects, and ends; the socket keeps its
namespace.  So a client in ``c`` can be plain threads of the test.

``close()`` removes every namespace, which destroys the veths and nftables tables inside;
``leftovers()`` lists whatever of this net is still visible.  Every wait is bounded.  Needs
pyroute2 and root (CAP_SYS_ADMIN, CAP_NET_ADMIN) and the ``nft`` command; without them the
constructor raises ``NetnsUnavailable``.
"""

from __future__ import annotations

import ctypes
import ipaddress
import itertools
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .netns import Namespaces, NetnsUnavailable, NetnsVsandTarget, netns_argv

MEMBERS = ("a", "b", "w", "c")
NODE_MEMBERS = ("a", "b")  # the only members on the second network
LINK_DEADLINE_S = 5.0
NFT_DEADLINE_S = 10.0
TABLE = "vsandfault"
_CLONE_NEWNET = 0x40000000
_T = TypeVar("_T")

_nets = itertools.count()

_RULESET = f"""\
table inet {TABLE} {{
    set blocked {{ type ipv4_addr; }}
    chain input {{
        type filter hook input priority raw; policy accept;
        ip saddr @blocked drop
    }}
}}
"""


def _enter_netns(path: str) -> None:
    """Move the calling thread (only it) into the network namespace mounted at ``path``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"setns({path}): {os.strerror(e)}")
    finally:
        os.close(fd)


class FaultNet(Namespaces):
    def __init__(self, subnet: str = "10.232.0.0/24", second_subnet: str | None = None) -> None:
        if shutil.which("nft") is None:
            raise NetnsUnavailable("the nft command (nftables) is not installed")
        super().__init__(subnet, MEMBERS)
        self.addresses2: dict[str, str] = {}
        if second_subnet is not None:
            hosts = ipaddress.ip_network(second_subnet).hosts()
            self.addresses2 = {m: str(next(hosts)) for m in NODE_MEMBERS}
        n = next(_nets)
        pid = os.getpid()
        self.bridge_ns = f"vsand-ft-{pid}-{n}-br"
        self.names: dict[str, str] = {m: f"vsand-ft-{pid}-{n}-{m}" for m in MEMBERS}
        # Interface names are at most 15 bytes: "vf" + pid (<= 6 hex) + net (hex) + member
        # (+ "p" for the bridge port).
        self.ifnames: dict[str, str] = {m: f"vf{pid:x}{n:x}{m}" for m in MEMBERS}
        self.ports: dict[str, str] = {m: f"{self.ifnames[m]}p" for m in MEMBERS}
        self.ifnames2: dict[str, str] = ({m: f"vf{pid:x}{n:x}{m}2" for m in NODE_MEMBERS}
                                         if self.addresses2 else {})
        # (src, dst, address): src's packets from that address of its to dst are dropped
        self.blocked: set[tuple[str, str, str]] = set()
        self.throttled: dict[str, str] = {}  # device with an HTB root qdisc -> its member
        self._build()

    def _namespaces(self) -> list[str]:
        return [self.bridge_ns, *self.names.values()]

    def _interfaces(self) -> list[str]:
        return [*self.ifnames.values(), *self.ports.values(), *self.ifnames2.values()]

    # --- set-up and tear-down ---------------------------------------------------------
    def _create(self) -> None:
        for ns in (self.bridge_ns, *self.names.values()):
            self._netns.create(ns)
            self._made.append(ns)
            if not os.path.ismount(self._path(ns)):
                raise RuntimeError(f"network namespace {ns} is not mounted after its creation")
        with self._ipr_ns(self.bridge_ns) as ipr:
            ipr.link("add", ifname="br0", kind="bridge")
            (br,) = ipr.link_lookup(ifname="br0")
            ipr.link("set", index=br, state="up")
        with self._IPRoute() as ipr:
            for m in MEMBERS:
                ipr.link("add", ifname=self.ifnames[m], kind="veth", peer=self.ports[m])
                (index,) = ipr.link_lookup(ifname=self.ifnames[m])
                ipr.link("set", index=index, net_ns_fd=self.names[m])
                (index,) = ipr.link_lookup(ifname=self.ports[m])
                ipr.link("set", index=index, net_ns_fd=self.bridge_ns)
        with self._ipr_ns(self.bridge_ns) as ipr:
            (br,) = ipr.link_lookup(ifname="br0")
            for m in MEMBERS:
                (index,) = ipr.link_lookup(ifname=self.ports[m])
                ipr.link("set", index=index, master=br, state="up")
        for m in MEMBERS:
            self._configure(m)
            self._nft(m, _RULESET)
        self._await_carrier()
        if self.ifnames2:
            self._direct_veth(self.ifnames2, self.addresses2)
            self._await_carrier(True, self.ifnames2)

    def _path(self, ns: str) -> str:
        return os.path.join(self._netns.NETNS_RUN_DIR, ns)

    # --- cuts -------------------------------------------------------------------------
    def _nft(self, member: str, script: str) -> None:
        cp = subprocess.run(netns_argv(self.names[member], ["nft", "-f", "-"]), input=script,
                            capture_output=True, text=True, timeout=NFT_DEADLINE_S, check=False)
        if cp.returncode != 0:
            raise RuntimeError(f"nft in {member}: exit {cp.returncode}: {cp.stderr.strip()}\n"
                               f"{script}")

    def _check(self, *members: str) -> None:
        for m in members:
            if m not in self.names:
                raise ValueError(f"{m!r} is not one of {MEMBERS}")

    def _source_addresses(self, src: str, network: int | None) -> list[str]:
        both = [self.addresses[src], self.addresses2.get(src)]
        return [a for i, a in enumerate(both) if a and network in (None, i)]

    def cut_one_way(self, src: str, dst: str, network: int | None = None) -> None:
        """Drop every packet from ``src`` to ``dst`` (on arrival at ``dst``), on every
        network or only on ``network``."""
        self._check(src, dst)
        if src == dst:
            raise ValueError("a member cannot be cut from itself")
        for address in self._source_addresses(src, network):
            if (src, dst, address) not in self.blocked:
                self._nft(dst, f"add element inet {TABLE} blocked {{ {address} }}\n")
                self.blocked.add((src, dst, address))

    def cut(self, x: str, y: str, network: int | None = None) -> None:
        """Drop every packet between ``x`` and ``y``, both directions."""
        self.cut_one_way(x, y, network)
        self.cut_one_way(y, x, network)

    def heal_one_way(self, src: str, dst: str) -> None:
        self._check(src, dst)
        for entry in sorted(e for e in self.blocked if e[:2] == (src, dst)):
            self._nft(dst, f"delete element inet {TABLE} blocked {{ {entry[2]} }}\n")
            self.blocked.discard(entry)

    def heal(self, x: str | None = None, y: str | None = None) -> None:
        """Restore the path between ``x`` and ``y`` (both directions), or every path."""
        if x is None or y is None:
            for m in MEMBERS:
                self._nft(m, f"flush set inet {TABLE} blocked\n")
            self.blocked.clear()
            return
        self.heal_one_way(x, y)
        self.heal_one_way(y, x)

    # --- slow paths ---------------------------------------------------------------------
    def _tc(self, member: str, *args: str) -> None:
        cp = subprocess.run(netns_argv(self.names[member], ["tc", *args]), capture_output=True,
                            text=True, timeout=NFT_DEADLINE_S, check=False)
        if cp.returncode != 0:
            raise RuntimeError(f"tc {' '.join(args)} in {member}: exit {cp.returncode}: "
                               f"{cp.stderr.strip()}")

    def throttle(self, x: str, y: str, bits_per_s: int) -> None:
        """Limit the path between ``x`` and ``y`` to ``bits_per_s`` each way."""
        self._check(x, y)
        if shutil.which("tc") is None:
            raise NetnsUnavailable("the tc command (iproute2) is not installed")
        for src, dst in ((x, y), (y, x)):
            for devs, addresses in ((self.ifnames, self.addresses),
                                    (self.ifnames2, self.addresses2)):
                if src in devs and dst in addresses:
                    self._throttle_dev(src, devs[src], dst, addresses[dst], bits_per_s)

    def _throttle_dev(self, src: str, dev: str, dst: str, address: str,
                      bits_per_s: int) -> None:
        if dev not in self.throttled:
            self._tc(src, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb",
                     "default", "1")
            self._tc(src, "class", "add", "dev", dev, "parent", "1:", "classid", "1:1",
                     "htb", "rate", "10gbit")
            self.throttled[dev] = src
        # One class per destination: its minor number is the member's position + 2.
        minor = f"1:{MEMBERS.index(dst) + 2}"
        self._tc(src, "class", "replace", "dev", dev, "parent", "1:", "classid", minor,
                 "htb", "rate", f"{bits_per_s}bit", "burst", "16k")
        self._tc(src, "filter", "replace", "dev", dev, "parent", "1:", "protocol", "ip",
                 "prio", str(MEMBERS.index(dst) + 1), "u32", "match", "ip", "dst",
                 f"{address}/32", "flowid", minor)

    def unthrottle(self) -> None:
        for dev, member in sorted(self.throttled.items()):
            self._tc(member, "qdisc", "del", "dev", dev, "root")
        self.throttled.clear()

    def ruleset(self, member: str) -> str:
        cp = subprocess.run(netns_argv(self.names[member], ["nft", "list", "ruleset"]),
                            capture_output=True, text=True, timeout=NFT_DEADLINE_S, check=False)
        return cp.stdout

    # --- processes and sockets inside -------------------------------------------------
    def run_argv(self, member: str, argv: list[str]) -> list[str]:
        return netns_argv(self.names[member], argv)

    def vsand_target(self, workdir: Path, *, node_name: str, **kw: Any) -> NetnsVsandTarget:
        """A ``VsandCluster`` target factory: node ``a`` runs in namespace ``a``, and so on."""
        return NetnsVsandTarget(workdir, netns=self.names[node_name],
                                host=self.addresses[node_name], node_name=node_name, **kw)

    @property
    def witness_netns(self) -> str:
        return self.names["w"]

    def call_in(self, member: str, fn: Callable[[], _T], deadline_s: float = 10.0) -> _T:
        """``fn()`` run by a thread inside ``member``'s network namespace."""
        path = self._path(self.names[member])
        out: list[Any] = []

        def run() -> None:
            try:
                _enter_netns(path)
                out.append((True, fn()))
            except BaseException as e:  # handed to the caller
                out.append((False, e))

        t = threading.Thread(target=run, name=f"netns-{member}", daemon=True)
        t.start()
        t.join(deadline_s)
        if not out:
            raise TimeoutError(f"call in netns {member} did not finish in {deadline_s:g} s")
        ok, value = out[0]
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def connect(self, member: str, host: str, port: int, timeout: float = 5.0) -> socket.socket:
        """A TCP connection to ``host:port`` made from inside ``member``'s namespace."""
        return self.call_in(member, lambda: socket.create_connection((host, port), timeout),
                            timeout + 5.0)

    def reachable(self, src: str, dst: str, timeout: float = 0.5) -> bool:
        """Whether a TCP SYN from ``src`` to a closed port of ``dst`` is answered (refused)."""
        try:
            self.connect(src, self.addresses[dst], 9, timeout).close()
        except ConnectionRefusedError:
            return True
        except OSError:
            return False
        return True
