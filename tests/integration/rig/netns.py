"""Two network namespaces joined by a veth pair, and vsand nodes that run inside them.

``NetnsPair`` creates namespaces ``a`` and ``b`` (names unique per process and pair), one veth
pair with an end in each, addresses ``.1`` and ``.2`` of a /24 (10.231.0.0/24 by default) and
``lo`` up in both.  ``link_down()`` sets the end in ``a`` down, which cuts both directions:
``a`` loses its route to ``b`` (connecting fails at once) and ``b`` sees no carrier (packets
vanish).  A namespace's own address stays reachable from inside it, so a client next to a
node keeps its connection through the cut.  ``close()`` removes both namespaces, which
destroys the veth ends moved into them, and any end still in this namespace after a failed
set-up.  Processes are run inside with ``run_argv(side, argv)`` (``ip netns exec``) and must
be ended before ``close()``: a namespace lives as long as a process in it.

``NetnsPair(second_subnet=...)`` adds a second veth pair, a second network between the same
namespaces (``addresses2``); ``link_down(1)`` cuts that one.

``NetnsVsandTarget`` is a ``VsandTarget`` started through ``ip netns exec`` whose readiness
check connects to its portal from inside its namespace; ``NetnsPair.vsand_target`` builds one
per node and fits ``VsandCluster(target_factory=...)`` with ``hosts=pair.addresses``.

Traffic stays on the pair's addresses; nothing here reaches any other network.  Every wait
is bounded by a deadline.  Needs pyroute2, CAP_SYS_ADMIN and CAP_NET_ADMIN (root); without
them the constructor raises ``NetnsUnavailable`` (tests skip on it).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Self

from .procs import START_DEADLINE_S, DaemonError, VsandTarget

SIDES = ("a", "b")
LINK_DEADLINE_S = 5.0

_pairs = itertools.count()

# Run inside a namespace: exit 0 once HOST:PORT accepts a connection, 1 at the deadline.
_PROBE = """\
import socket, sys, time
host, port, end = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.05)
sys.exit(1)
"""


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be made here (no pyroute2, or no CAP_NET_ADMIN)."""


def netns_argv(ns: str, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


class Namespaces:
    """Network namespaces and veth interfaces this process makes (``_create``, in a
    subclass) and removes again (``close``, also after a set-up that failed half-way);
    members get the addresses ``.1``, ``.2``... of ``subnet`` in order.  A subclass names
    each member's namespace (``names``) and its veth end there (``ifnames``)."""

    names: dict[str, str]
    ifnames: dict[str, str]

    def __init__(self, subnet: str, members: tuple[str, ...]) -> None:
        try:
            from pyroute2 import IPRoute, netns
        except ImportError as e:
            raise NetnsUnavailable(f"pyroute2 is not importable: {e}") from None
        self._IPRoute = IPRoute
        self._netns = netns
        net = ipaddress.ip_network(subnet)
        if not net.is_private:
            raise ValueError(f"{subnet} is not a private network")
        hosts = net.hosts()
        self.prefixlen = net.prefixlen
        self.members = members
        self.addresses: dict[str, str] = {m: str(next(hosts)) for m in members}
        self._made: list[str] = []

    def _build(self) -> None:
        try:
            self._create()
        except BaseException as e:
            self.close()
            # OSError from creating a namespace, NetlinkError (code = errno) from the veth.
            code = getattr(e, "errno", None) if isinstance(e, OSError) else getattr(e, "code", None)
            if code in (errno.EPERM, errno.EACCES):
                raise NetnsUnavailable(f"cannot set up network namespaces: {e} (needs root: "
                                       "CAP_SYS_ADMIN and CAP_NET_ADMIN)") from None
            raise

    def _create(self) -> None:
        raise NotImplementedError

    def _namespaces(self) -> list[str]:
        raise NotImplementedError

    def _interfaces(self) -> list[str]:
        raise NotImplementedError

    def close(self) -> None:
        """Remove the namespaces (veths and anything else inside go with them) and any veth
        end still in this namespace after a failed set-up; safe to call more than once."""
        while self._made:
            name = self._made.pop()
            with contextlib.suppress(OSError):
                self._netns.remove(name)
        with contextlib.suppress(Exception), self._IPRoute() as ipr:
            for ifname in self._interfaces():
                for index in ipr.link_lookup(ifname=ifname):
                    ipr.link("del", index=index)
        end = time.monotonic() + LINK_DEADLINE_S  # the kernel tears namespaces down later
        while self.leftovers() and time.monotonic() < end:
            time.sleep(0.05)

    def leftovers(self) -> list[str]:
        """Namespaces or veth ends of these still visible from here."""
        present = set(self._netns.listnetns())
        out = [n for n in self._namespaces() if n in present]
        with self._IPRoute() as ipr:
            out += [i for i in self._interfaces() if ipr.link_lookup(ifname=i)]
        return out

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ipr(self, member: str) -> Any:
        return self._ipr_ns(self.names[member])

    def _ipr_ns(self, ns: str) -> Any:
        # flags=0: a namespace that is gone is an error, not a new empty one made silently
        return self._IPRoute(netns=ns, flags=0)

    def _configure(self, member: str, ifname: str | None = None,
                   address: str | None = None) -> None:
        """The member's veth end (default: its first) gets its address; it and ``lo`` go up."""
        with self._ipr(member) as ipr:
            (index,) = ipr.link_lookup(ifname=ifname or self.ifnames[member])
            ipr.addr("add", index=index, address=address or self.addresses[member],
                     prefixlen=self.prefixlen)
            ipr.link("set", index=index, state="up")
            (lo,) = ipr.link_lookup(ifname="lo")
            ipr.link("set", index=lo, state="up")

    def _direct_veth(self, ifnames: dict[str, str], addresses: dict[str, str]) -> None:
        """A veth pair straight between two members' namespaces (``ifnames``: each one's
        end), addressed and up: a second network between them."""
        x, y = ifnames
        with self._IPRoute() as ipr:
            ipr.link("add", ifname=ifnames[x], kind="veth", peer=ifnames[y])
            for m in (x, y):
                (index,) = ipr.link_lookup(ifname=ifnames[m])
                ipr.link("set", index=index, net_ns_fd=self.names[m])
        for m in (x, y):
            self._configure(m, ifnames[m], addresses[m])

    def _await_carrier(self, up: bool = True, ifnames: dict[str, str] | None = None) -> None:
        """Until every veth end in ``ifnames`` (default: each member's first) reports the
        wanted operational state."""
        ifnames = ifnames or self.ifnames
        want = "UP" if up else "DOWN"
        end = time.monotonic() + LINK_DEADLINE_S
        while True:
            states = {}
            for m, ifname in ifnames.items():
                with self._ipr(m) as ipr:
                    (index,) = ipr.link_lookup(ifname=ifname)
                    states[m] = ipr.get_links(index)[0].get_attr("IFLA_OPERSTATE")
            if all(s == want for s in states.values()):
                return
            if time.monotonic() > end:
                raise AssertionError(f"veths {ifnames}: {states}, wanted {want} within "
                                     f"{LINK_DEADLINE_S:g} s")
            time.sleep(0.02)


class NetnsPair(Namespaces):
    def __init__(self, subnet: str = "10.231.0.0/24", second_subnet: str | None = None) -> None:
        super().__init__(subnet, SIDES)
        n = next(_pairs)
        pid = os.getpid()
        self.names: dict[str, str] = {side: f"vsand-it-{pid}-{n}-{side}" for side in SIDES}
        # Interface names are at most 15 bytes: "vs" + pid (<= 6 hex) + pair (hex) + side.
        self.ifnames: dict[str, str] = {side: f"vs{pid:x}{n:x}{side}" for side in SIDES}
        self.addresses2: dict[str, str] = {}
        self.ifnames2: dict[str, str] = {}
        if second_subnet is not None:
            net = ipaddress.ip_network(second_subnet)
            if not net.is_private or net.prefixlen != self.prefixlen:
                raise ValueError(f"{second_subnet}: a private /{self.prefixlen} is needed")
            hosts = net.hosts()
            self.addresses2 = {side: str(next(hosts)) for side in SIDES}
            self.ifnames2 = {side: f"vs{pid:x}{n:x}{side}2" for side in SIDES}
        self._build()

    def _namespaces(self) -> list[str]:
        return list(self.names.values())

    def _interfaces(self) -> list[str]:
        return [*self.ifnames.values(), *self.ifnames2.values()]

    # --- set-up -----------------------------------------------------------------------
    def _create(self) -> None:
        for side in SIDES:
            self._netns.create(self.names[side])
            self._made.append(self.names[side])
        with self._IPRoute() as ipr:
            ipr.link("add", ifname=self.ifnames["a"], kind="veth", peer=self.ifnames["b"])
            for side in SIDES:
                (index,) = ipr.link_lookup(ifname=self.ifnames[side])
                ipr.link("set", index=index, net_ns_fd=self.names[side])
        for side in SIDES:
            self._configure(side)
        self._await_carrier(True)
        if self.ifnames2:
            self._direct_veth(self.ifnames2, self.addresses2)
            self._await_carrier(True, self.ifnames2)

    # --- the link ---------------------------------------------------------------------
    def link_down(self, network: int = 0) -> None:
        """Cut a network in both directions (its end in ``a`` goes down)."""
        self._set_a("down", network)

    def link_up(self, network: int = 0) -> None:
        self._set_a("up", network)

    def _set_a(self, state: str, network: int) -> None:
        ifnames = (self.ifnames, self.ifnames2)[network]
        with self._ipr("a") as ipr:
            (index,) = ipr.link_lookup(ifname=ifnames["a"])
            ipr.link("set", index=index, state=state)
        self._await_carrier(state == "up", ifnames)

    # --- processes inside -------------------------------------------------------------
    def run_argv(self, ns: str, argv: list[str]) -> list[str]:
        """``argv`` run inside namespace ``ns`` (a side, ``a``/``b``, or a full name)."""
        return netns_argv(self.names.get(ns, ns), argv)

    def vsand_target(self, workdir: Path, *, node_name: str, **kw: Any) -> NetnsVsandTarget:
        """A ``VsandCluster`` target factory: node ``a`` runs in namespace ``a``, and so on."""
        return NetnsVsandTarget(workdir, netns=self.names[node_name],
                                host=self.addresses[node_name], node_name=node_name, **kw)


def wait_port_in_netns(ns: str, host: str, port: int, proc: subprocess.Popen[bytes] | None,
                       deadline_s: float = START_DEADLINE_S) -> None:
    """Poll from inside ``ns`` until ``host:port`` accepts; fail early if ``proc`` exits."""
    probe = subprocess.Popen(
        netns_argv(ns, [sys.executable, "-c", _PROBE, host, str(port), str(deadline_s)]),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True)
    end = time.monotonic() + deadline_s + 5  # the probe's own deadline, plus its start-up
    try:
        while True:
            rc = probe.poll()
            if rc == 0:
                return
            if rc is not None:
                err = probe.stderr.read().decode(errors="replace") if probe.stderr else ""
                raise DaemonError(f"port {host}:{port} in netns {ns} not accepting connections "
                                  f"after {deadline_s:.0f} s (probe exit {rc}) {err.strip()}")
            if proc is not None and proc.poll() is not None:
                raise DaemonError(f"process exited with code {proc.returncode} before "
                                  "listening")
            if time.monotonic() > end:
                raise DaemonError(f"probe of {host}:{port} in netns {ns} did not finish")
            time.sleep(0.05)
    finally:
        if probe.poll() is None:
            os.kill(probe.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            probe.wait(timeout=5)
        if probe.stderr:
            probe.stderr.close()


class NetnsVsandTarget(VsandTarget):
    """A vsand node inside network namespace ``netns``, serving on ``host`` there."""

    def __init__(self, workdir: Path, *, netns: str, host: str, **kw: Any) -> None:
        super().__init__(workdir, **kw)
        self.netns = netns
        self.host = host

    def url(self, number: int = 0) -> str:
        self.lun(number)
        return f"iscsi://{self.host}:{self.port}/{self.iqn}/{number + self.lun_offset}"

    def describe(self) -> str:
        return f"{super().describe()} netns={self.netns} host={self.host}"

    def argv(self) -> list[str]:
        # ``ip netns exec`` execs the command: the PID we hold is the daemon's own.
        return netns_argv(self.netns, super().argv())

    def _await_ready(self) -> None:
        assert self.proc is not None
        try:
            wait_port_in_netns(self.netns, self.host, self.port, self.proc)
        except DaemonError as e:
            self._reap_after_failure()
            raise self._error(str(e)) from None
