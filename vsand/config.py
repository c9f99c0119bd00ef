"""vsand's configuration: a YAML file read into frozen, typed dataclasses.

Layout (every key but ``data_dir``, ``portals`` and ``targets`` is optional)::

    node:
      name: node-a                     # default: the host name; [A-Za-z0-9._-], 1..253 chars
    cluster:                           # optional, the same on every node; see config_cluster.py
      id: lab1                         # required; the cluster's name
      secret_file: cluster.secret      # or secret: <text>; 16..1024 bytes; a file as for CHAP
      nodes:                           # required: 2..3 nodes, this one (node.name) included
        - {name: node-a, address: 192.0.2.10:3270}   # where the peers dial it
        - {name: node-b, address: 192.0.2.11:3270}
    data_dir: /var/lib/vsand           # required
    portals:                           # required, at least one
      - listen: 0.0.0.0:3260           # host:port, [v6]:port, host (port 3260) or a bare IPv6
        advertise: 192.0.2.10:3260     # optional, see below; a missing port = the listen port
        group: 1                       # target portal group tag 1..65535, default 1
    targets:                           # required, at least one
      - iqn: iqn.2026-11.org.example:storage.disk1   # or eui.<16 hex>, naa.<16|32 hex>
        alias: disk1                   # optional TargetAlias, default none
        luns:                          # required, at least one
          - number: 0                  # required, 0..255, unique within the target
            path: /var/lib/vsand/disk1.img   # required; a file or a block device
            size: 100GiB               # bytes or K/M/G/T/KiB/MiB/GiB/TiB (all binary);
                                       # required if the file does not exist; 0 = its size
            block_size: 512            # 512 or 4096, default 512
            read_only: false           # default false
            serial: DISK1SERIAL        # VPD 0x80; 1..20 printable ASCII, no spaces;
                                       # default "VSAND" + 12 hex digits of sha256(iqn, lun)
            write_cache: writeback     # writeback (default) or writethrough
            thin: true                 # sparse file, UNMAP punches holes; default true
            mirror: true               # mirror it to the cluster; default: whether there is one
        auth:                          # optional; default method none
          method: chap                 # none or chap
          user: alice                  # the CHAP name initiators log in with
          secret_file: chap.secret     # or secret: <text>; 12..255 bytes (<= 16 for every
                                       # initiator); the file: mode 0600/0400, first line
          mutual_user: disk1           # optional: answer initiators that ask the target
          mutual_secret_file: m.secret #   to prove itself (or mutual_secret: <text>)
        acl:                           # optional; absent = every initiator may log in
          - initiator: iqn.1994-05.com.redhat:host1
            luns: [0]                  # optional; default all: LUN masking per initiator
    discovery_auth:                    # same keys as a target's auth, for SendTargets logins
      method: none
    iscsi:                             # login negotiation defaults and session limits
      queue_depth: 128                 # CmdSN window per session, 1..1024
      max_recv_data_segment_length: 262144   # 512..16777215
      first_burst_length: 262144       # 512..16777215, at most max_burst_length
      max_burst_length: 1048576        # 512..16777215
      immediate_data: true
      initial_r2t: false
      max_outstanding_r2t: 8           # 1..65535
      nop_interval: 5                  # seconds between NOP-In pings, 0 = off
      nop_timeout: 15                  # seconds without an answer before dropping a session
      login_timeout: 15                # seconds a login may take
      header_digest: [CRC32C, None]    # digests a login may settle on (the initiator's
      data_digest: [CRC32C, None]      # order of preference wins); [None] = never
    io_threads: 8                      # 1..1024
    log_level: info                    # debug, info, warning, error
    admin_socket: /run/vsand/vsand.sock    # default <data_dir>/vsand.sock
    metrics:
      listen: 127.0.0.1:9470           # host:port of the Prometheus endpoint; "" = off

Decisions worth knowing:
- Relative paths (data_dir, LUN paths, admin_socket) are relative to the config file's
  directory and stored absolute, so the daemon's working directory never matters.  ``~`` is
  refused rather than expanded: whose home it means depends on who starts the daemon.
- A wildcard listen address (0.0.0.0, ::) without ``advertise`` is allowed: SendTargets then
  advertises the local address of the connection the initiator asked on.  `PortalConfig`
  keeps the wildcard in ``advertise_host``; `PortalConfig.advertise_wildcard` tells the
  daemon to substitute.  A wildcard ``advertise`` is an error: nobody can connect to it.
- Default serials depend on the target IQN and LUN number only, not on the node name: a
  mirrored LUN must show the same VPD 0x80 serial on every node (DESIGN invariant 5), and the
  nodes of a cluster share the target IQNs.  `default_config` does mix the node name in, since
  its IQN is the same on every vsand host.  Serials must be unique across the node's LUNs:
  multipath merges devices with equal serials, which would corrupt data.
- Checks that look at the file system: a LUN path must not be a directory; a path that does
  not exist needs a size (vsand creates it) and cannot be read-only.
- YAML duplicate keys are errors (PyYAML would silently keep the last one).
- Security (RFC 7143 §9.2.1, §12.1.3): a CHAP secret shorter than 12 bytes is an error (vsand
  has no IPsec to make it safe); longer than 16 bytes is a warning (``Config.warnings``:
  Microsoft's initiator refuses it).  One secret never serves both directions, anywhere in
  the file.  A secret file readable or writable by group or others is an error naming its
  mode.  ``dump_config`` writes inline secrets as "(redacted)"; secret files by path.  An
  ``acl`` initiator denied by it gets login status 0x0202 and does not see the target in
  discovery; its ``luns`` are all that initiator's sessions see (REPORT LUNS included).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import yaml

from vsand.protocol.iscsi.login import TargetOffer

from vsand.config_cluster import (
    NODE_NAME_ALLOWED, ClusterConfig, MirrorIds, check_node_name, cluster_to_dict, read_cluster,
    read_mirror,
)
from vsand.config_schema import (
    ADDRESS_ALLOWED, AUTH_KEYS, ISCSI_NAME_ALLOWED, MISSING, REDACTED, AclEntry,
    AuthConfig, Errors, Section, format_address, format_size, is_wildcard, join,
    normalize_iscsi_name, parse_address, parse_size, read_acl, read_auth, read_digests,
)

__all__ = [
    "AclEntry", "AuthConfig", "Config", "ConfigError", "IscsiConfig", "LunConfig", "PortalConfig", "TargetConfig",
    "config_to_dict", "default_config", "derive_serial", "dump_config", "load_config",
    "parse_config", "parse_size",
]

DEFAULT_SOURCE: Final = "<built-in default>"
ISCSI_PORT: Final = 3260
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class PortalConfig:
    listen_host: str
    listen_port: int
    advertise_host: str  # a wildcard here means "the address the initiator connected to"
    advertise_port: int
    group_tag: int

    @property
    def advertise_wildcard(self) -> bool:
        return is_wildcard(self.advertise_host)


@dataclass(frozen=True, slots=True)
class LunConfig:
    number: int
    path: str  # absolute
    size: int  # bytes; 0 = the existing file's or device's size
    block_size: int
    read_only: bool
    serial: str
    write_cache: bool  # True = writeback (WCE=1 in the caching mode page)
    thin: bool = True
    mirror: bool = False  # mirrored to the cluster's other nodes
    mirror_id: int = 0  # its id in the peer protocol (config_cluster.mirror_id); 0 if unmirrored


@dataclass(frozen=True, slots=True)
class TargetConfig:
    iqn: str  # lower-cased
    alias: str
    luns: tuple[LunConfig, ...]
    auth: AuthConfig = AuthConfig()
    acl: tuple[AclEntry, ...] | None = None  # None: every initiator, every LUN


_OFFER = TargetOffer()


@dataclass(frozen=True, slots=True)
class IscsiConfig:
    # The defaults here are the config file's defaults too (_ISCSI_INTS reads them); the
    # negotiation defaults are the login code's own offer, so the two cannot drift apart.
    queue_depth: int = 128
    max_recv_data_segment_length: int = _OFFER.max_recv_data_segment_length
    first_burst_length: int = _OFFER.first_burst_length
    max_burst_length: int = _OFFER.max_burst_length
    immediate_data: bool = _OFFER.immediate_data
    initial_r2t: bool = _OFFER.initial_r2t
    max_outstanding_r2t: int = _OFFER.max_outstanding_r2t
    nop_interval: float = 5.0
    nop_timeout: float = 15.0
    login_timeout: float = 15.0
    header_digest: tuple[str, ...] = ("CRC32C", "None")
    data_digest: tuple[str, ...] = ("CRC32C", "None")


@dataclass(frozen=True, slots=True)
class Config:
    node_name: str
    data_dir: str  # absolute
    portals: tuple[PortalConfig, ...]
    targets: tuple[TargetConfig, ...]
    iscsi: IscsiConfig
    io_threads: int
    log_level: str
    admin_socket: str  # absolute
    metrics_listen: str  # "host:port" or "" = off
    source: str  # the file it came from, or DEFAULT_SOURCE
    discovery_auth: AuthConfig = AuthConfig()
    warnings: tuple[str, ...] = ()  # not errors, but worth a log line at start-up
    cluster: ClusterConfig | None = None  # None: a single node, nothing mirrored


class ConfigError(Exception):
    """Every problem found in one config; each line names file, key path, problem, allowed."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


# ---------------------------------------------------------------------------------------------
# Entry points


def load_config(path: str | os.PathLike[str]) -> Config:
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read the config file: "
                           f"{exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{source}: byte {exc.start} is not UTF-8 "
                           f"(allowed: a UTF-8 text file)"]) from None
    return parse_config(text, source)


def parse_config(text: str, source: str) -> Config:
    """Parse YAML `text`; `source` names it in messages and anchors relative paths.

    A `source` in angle brackets ("<string>") is not a file: relative paths are then
    relative to the current directory.
    """
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = ": ".join(p for p in (exc.context, exc.problem) if p)
        raise ConfigError([f"{source}: {where}YAML syntax error: {what}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: YAML syntax error: {exc}"]) from None
    except RecursionError:
        raise ConfigError([f"{source}: YAML nesting is too deep"]) from None
    if data is None:
        raise ConfigError([f"{source}: the file is empty (required: a mapping with data_dir, "
                           f"portals and targets)"])
    base = os.getcwd() if source.startswith("<") else os.path.dirname(os.path.abspath(source))
    return _build(data, source, base)


def default_config(data_dir: str = "./vsand-data") -> Config:
    """One portal on 127.0.0.1:3260 and one thin 1 GiB LUN: enough to try vsand out."""
    node = _host_name()
    iqn = "iqn.2026-11.org.vsand:default"
    data = {
        "node": {"name": node},
        "data_dir": data_dir,
        "portals": [{"listen": "127.0.0.1:3260", "advertise": "127.0.0.1:3260", "group": 1}],
        "targets": [{
            "iqn": iqn,
            "alias": "vsand-default",
            "luns": [{
                "number": 0,
                "path": os.path.join(data_dir, "lun0.img"),
                "size": 1 << 30,
                "block_size": 512,
                # Every vsand host has this IQN: the node name keeps the serials of two such
                # hosts apart, or a multipath initiator would merge their disks.
                "serial": derive_serial(iqn, 0, salt=node),
                "write_cache": "writeback",
                "thin": True,
            }],
        }],
    }
    # Through the validating builder, so the default obeys every rule a file does.
    return _build(data, DEFAULT_SOURCE, os.getcwd())


def derive_serial(iqn: str, lun: int, salt: str = "") -> str:
    """A stable 17-character VPD 0x80 serial: "VSAND" + 12 upper-case hex digits."""
    digest = hashlib.sha256(f"{salt}\n{iqn}\n{lun}".encode()).hexdigest()
    return "VSAND" + digest[:12].upper()


def config_to_dict(config: Config) -> dict[str, Any]:
    """The config in file layout, every key explicit; parse_config accepts it back."""
    portals: list[dict[str, Any]] = []
    for p in config.portals:
        portal: dict[str, Any] = {"listen": format_address(p.listen_host, p.listen_port)}
        if (p.advertise_host, p.advertise_port) != (p.listen_host, p.listen_port):
            portal["advertise"] = format_address(p.advertise_host, p.advertise_port)
        portal["group"] = p.group_tag
        portals.append(portal)
    targets: list[dict[str, Any]] = []
    for t in config.targets:
        target: dict[str, Any] = {
            "iqn": t.iqn,
            "alias": t.alias,
            "luns": [{
                "number": lun.number, "path": lun.path, "size": format_size(lun.size),
                "block_size": lun.block_size, "read_only": lun.read_only, "serial": lun.serial,
                "write_cache": "writeback" if lun.write_cache else "writethrough",
                "thin": lun.thin, "mirror": lun.mirror,
            } for lun in t.luns],
            "auth": _auth_to_dict(t.auth),
        }
        if t.acl is not None:
            target["acl"] = [{"initiator": e.initiator}
                             | ({"luns": list(e.luns)} if e.luns is not None else {})
                             for e in t.acl]
        targets.append(target)
    iscsi = dataclasses.asdict(config.iscsi)
    iscsi["header_digest"] = list(config.iscsi.header_digest)
    iscsi["data_digest"] = list(config.iscsi.data_digest)
    return {
        "node": {"name": config.node_name},
        **({"cluster": cluster_to_dict(config.cluster)} if config.cluster else {}),
        "data_dir": config.data_dir,
        "portals": portals,
        "targets": targets,
        "discovery_auth": _auth_to_dict(config.discovery_auth),
        "iscsi": iscsi,
        "io_threads": config.io_threads,
        "log_level": config.log_level,
        "admin_socket": config.admin_socket,
        "metrics": {"listen": config.metrics_listen},
    }


def _auth_to_dict(auth: AuthConfig) -> dict[str, Any]:
    """File layout of an auth section; secrets themselves never leave the process."""
    if auth.method == "none":
        return {"method": "none"}
    out: dict[str, Any] = {"method": auth.method, "user": auth.user}
    if auth.secret_file:
        out["secret_file"] = auth.secret_file
    else:
        out["secret"] = REDACTED
    if auth.mutual_user:
        out["mutual_user"] = auth.mutual_user
        if auth.mutual_secret_file:
            out["mutual_secret_file"] = auth.mutual_secret_file
        else:
            out["mutual_secret"] = REDACTED
    return out


def dump_config(config: Config) -> str:
    """YAML text of `config_to_dict`: for `vsanctl config show` and config-drift checks."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=False)


# ---------------------------------------------------------------------------------------------
# YAML loading


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, which PyYAML would silently overwrite."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[object, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *base" then overriding a key is YAML's intent, not a mistake
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:
                continue  # unhashable: SafeLoader's own error says so
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    f"in a mapping (first {key!r} at line {first.start_mark.line + 1})",
                    node.start_mark, f"duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


# ---------------------------------------------------------------------------------------------
# Building and validating

_TOP_KEYS: Final = ("node", "data_dir", "portals", "targets", "discovery_auth", "iscsi",
                    "io_threads", "log_level", "admin_socket", "metrics", "cluster")
_PORTAL_KEYS: Final = ("listen", "advertise", "group")
_TARGET_KEYS: Final = ("iqn", "alias", "luns", "auth", "acl")
_LUN_KEYS: Final = ("number", "path", "size", "block_size", "read_only", "serial",
                    "write_cache", "thin", "mirror")
# name -> (lowest, highest); the default comes from IscsiConfig.  Ranges are RFC 7143's.
_ISCSI_INTS: Final = {
    "queue_depth": (1, 1024),
    "max_recv_data_segment_length": (512, 16777215),
    "first_burst_length": (512, 16777215),
    "max_burst_length": (512, 16777215),
    "max_outstanding_r2t": (1, 65535),
}
_ISCSI_BOOLS: Final = ("immediate_data", "initial_r2t")
_ISCSI_SECONDS: Final = {"nop_interval": True, "nop_timeout": False, "login_timeout": False}
_MAX_SECONDS: Final = 3600.0
_SERIAL_RE: Final = re.compile(r"[\x21-\x7e]{1,20}")
_MAX_SIZE: Final = (1 << 63) - 1  # off_t
_SUN_PATH_MAX: Final = 107  # sockaddr_un.sun_path is 108 bytes including the NUL
_LOG_LEVELS: Final = {name: name for name in ("debug", "info", "warning", "error")}
_WRITE_CACHE: Final = {"writeback": True, "writethrough": False}
_BLOCK_SIZES: Final = {512: 512, 4096: 4096}
_PATH_ALLOWED: Final = "a file path; relative paths are relative to the config file"


def _ok(value: _T | None) -> _T:
    # Only called once no error was recorded, when every value read is set.
    assert value is not None
    return value


def _host_name() -> str:
    """This host's name as a valid node name (containers can have odd host names)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).strip("._-")[:253]
    return name or "vsand"


def _path_checker(base: str) -> Callable[[str], str]:
    def check(text: str) -> str:
        if text == "":
            raise ValueError("is empty")
        if "\0" in text:
            raise ValueError("contains a NUL byte")
        if text.startswith("~"):
            raise ValueError("starts with '~', which is not expanded")
        return os.path.normpath(os.path.join(base, text))
    return check


def _check_alias(text: str) -> str:
    if len(text.encode("utf-8")) > 255 or any(ord(c) < 0x20 or ord(c) == 0x7f for c in text):
        raise ValueError("is not a valid alias")
    return text


def _check_serial(text: str) -> str:
    if not _SERIAL_RE.fullmatch(text):
        raise ValueError("is not a valid serial")
    return text


def _address(sec: Section, key: str, default_port: int | None,
             required: str | None = None) -> tuple[str, int] | None:
    text = sec.string(key, None, ADDRESS_ALLOWED, required)
    if text is None:
        return None
    try:
        return parse_address(text, default_port)
    except ValueError as exc:
        sec.error(key, f"{text!r} {exc} (allowed: {ADDRESS_ALLOWED})")
        return None


def _build(data: object, source: str, base: str) -> Config:
    errors = Errors(source)
    top = Section(errors, "", data, _TOP_KEYS)
    if not isinstance(data, dict):
        raise ConfigError(errors.lines)
    check_path = _path_checker(base)

    node = Section(errors, "node", top.raw("node"), ("name",))
    node_name = node.string("name", _host_name(), NODE_NAME_ALLOWED, check=check_node_name)
    data_dir = top.string("data_dir", None, _PATH_ALLOWED, "the directory for vsand's state",
                          check=check_path)

    portals, binds = _read_portals(top)
    warnings: list[str] = []
    targets = _read_targets(top, check_path, warnings, clustered=top.raw("cluster") is not MISSING)
    discovery_auth = read_auth(Section(errors, "discovery_auth", top.raw("discovery_auth"),
                                       AUTH_KEYS), check_path, warnings)
    if discovery_auth is not None:
        _check_secret_directions(errors, targets, discovery_auth)
    iscsi = _read_iscsi(Section(errors, "iscsi", top.raw("iscsi"), tuple(
        f.name for f in dataclasses.fields(IscsiConfig))))

    io_threads = top.integer("io_threads", 8, 1, 1024)
    log_level = top.one_of("log_level", "info", _LOG_LEVELS)

    admin_socket = top.string("admin_socket", None, _PATH_ALLOWED, check=check_path)
    if admin_socket is None and top.raw("admin_socket") is MISSING and data_dir is not None:
        admin_socket = os.path.join(data_dir, "vsand.sock")
    if admin_socket is not None and len(admin_socket.encode()) > _SUN_PATH_MAX:
        top.error("admin_socket", f"{admin_socket!r} is {len(admin_socket.encode())} bytes "
                                  f"long (allowed: a Unix socket path of at most "
                                  f"{_SUN_PATH_MAX} bytes; set admin_socket explicitly)")
        admin_socket = None

    metrics = Section(errors, "metrics", top.raw("metrics"), ("listen",))
    metrics_listen: str | None = ""
    if metrics.raw("listen") not in (MISSING, ""):
        addr = _address(metrics, "listen", None)
        metrics_listen = None if addr is None else format_address(*addr)
        if addr is not None:
            binds.append(("metrics.listen", addr))
    cluster = read_cluster(top, node_name, check_path, binds)
    _check_binds(errors, binds)

    if errors.lines:
        raise ConfigError(errors.lines)
    return Config(
        node_name=_ok(node_name), data_dir=_ok(data_dir), portals=tuple(portals),
        targets=tuple(targets), iscsi=_ok(iscsi), io_threads=_ok(io_threads),
        log_level=_ok(log_level), admin_socket=_ok(admin_socket),
        metrics_listen=_ok(metrics_listen), source=source,
        discovery_auth=_ok(discovery_auth), warnings=tuple(warnings), cluster=cluster)


def _read_portals(top: Section) -> tuple[list[PortalConfig], list[tuple[str, tuple[str, int]]]]:
    portals: list[PortalConfig] = []
    binds: list[tuple[str, tuple[str, int]]] = []  # (key path, (host, port)) for overlap checks
    for path, item in top.items("portals", "at least one portal"):
        sec = Section(top.errors, path, item, _PORTAL_KEYS)
        listen = _address(sec, "listen", ISCSI_PORT, "the address to listen on")
        advertise = None
        if sec.raw("advertise") is not MISSING and listen is not None:
            advertise = _address(sec, "advertise", listen[1])
            if advertise is not None and is_wildcard(advertise[0]):
                sec.error("advertise", f"{advertise[0]!r} is a wildcard, which initiators "
                                       f"cannot connect to (allowed: a concrete address or "
                                       f"host name; omit advertise to advertise the address "
                                       f"each initiator connected to)")
                advertise = None
        elif listen is not None:
            advertise = listen
        group = sec.integer("group", 1, 1, 65535)
        if listen is not None:
            binds.append((join(path, "listen"), listen))
        if listen is not None and advertise is not None and group is not None:
            portals.append(PortalConfig(listen[0], listen[1], advertise[0], advertise[1], group))
    return portals, binds


def _check_binds(errors: Errors, binds: list[tuple[str, tuple[str, int]]]) -> None:
    """Two listeners on one (host, port), or beside a same-family wildcard, cannot both bind."""
    for i, (path, (host, port)) in enumerate(binds):
        for other_path, (other_host, other_port) in binds[:i]:
            if port != other_port:
                continue
            if host == other_host:
                errors.add(path, f"{format_address(host, port)} is already used by "
                                 f"{other_path} (allowed: a host:port no other listener uses)")
                break
            # IPV6_V6ONLY is set by asyncio, so 0.0.0.0 and :: only clash within their family.
            v6, other_v6 = ":" in host, ":" in other_host
            if v6 == other_v6 and (is_wildcard(host) or is_wildcard(other_host)):
                errors.add(path, f"{format_address(host, port)} overlaps "
                                 f"{format_address(other_host, other_port)} of {other_path}, "
                                 f"so one of them cannot bind (allowed: a different port, or "
                                 f"only the wildcard)")
                break


def _check_secret_directions(errors: Errors, targets: list[TargetConfig],
                             discovery: AuthConfig) -> None:
    """RFC 7143 §12.1.3: a secret that authenticates initiators never authenticates a target."""
    sections = [(f"targets[{i}]", t.auth) for i, t in enumerate(targets)]
    sections.append(("discovery_auth", discovery))
    initiator_secrets = {a.secret: path for path, a in sections if a.secret}
    for path, auth in sections:
        first = initiator_secrets.get(auth.mutual_secret) if auth.mutual_secret else None
        if first is not None:
            errors.add(join(join(path, "auth") if path != "discovery_auth" else path,
                            "mutual_secret"),
                       f"is also the initiators' secret of {first} (allowed: a secret used "
                       f"in one direction only)")


def _read_targets(top: Section, check_path: Callable[[str], str],
                  warnings: list[str], clustered: bool) -> list[TargetConfig]:
    targets: list[TargetConfig] = []
    iqns: dict[str, str] = {}  # normalised IQN -> key path of its first use
    lun_paths: dict[str, str] = {}  # real path -> key path of its first use
    serials: dict[str, str] = {}
    mirror_ids = MirrorIds(top.errors)
    for path, item in top.items("targets", "at least one target"):
        sec = Section(top.errors, path, item, _TARGET_KEYS)
        start = len(top.errors.lines)
        iqn = sec.string("iqn", None, ISCSI_NAME_ALLOWED, "the target's iSCSI name",
                         check=_iqn_checker())
        if iqn is not None:
            if iqn in iqns:
                sec.error("iqn", f"{iqn!r} is already used by {iqns[iqn]} "
                                 f"(allowed: a name unique among targets)")
            iqns.setdefault(iqn, join(path, "iqn"))
        alias = sec.string("alias", "", "text of at most 255 bytes, no control characters",
                           check=_check_alias)
        luns: list[LunConfig] = []
        numbers: dict[int, str] = {}
        for lun_path, lun_item in sec.items("luns", "at least one LUN"):
            lun = _read_lun(sec, lun_path, lun_item, iqn, check_path, clustered)
            if lun.number is not None:
                if lun.number in numbers:
                    sec.errors.add(join(lun_path, "number"),
                                   f"{lun.number} is already used by {numbers[lun.number]} "
                                   f"(allowed: a number unique within the target)")
                numbers.setdefault(lun.number, join(lun_path, "number"))
            if lun.path is not None:
                real = os.path.realpath(lun.path)  # a symlink to the same disk is the same disk
                if real in lun_paths:
                    sec.errors.add(join(lun_path, "path"),
                                   f"{lun.path!r} is already used by {lun_paths[real]} "
                                   f"(allowed: a file or device no other LUN uses)")
                lun_paths.setdefault(real, join(lun_path, "path"))
            if lun.serial is not None:
                if lun.serial in serials:
                    sec.errors.add(join(lun_path, "serial"),
                                   f"{lun.serial!r} is already used by {serials[lun.serial]}; "
                                   f"multipath would merge the two disks (allowed: a serial "
                                   f"unique among all LUNs)")
                serials.setdefault(lun.serial, join(lun_path, "serial"))
            if lun.done is not None:
                luns.append(lun.done)
                if lun.done.mirror:
                    mirror_ids.add(lun_path, lun.done.mirror_id)
        auth = read_auth(Section(top.errors, join(path, "auth"), sec.raw("auth"), AUTH_KEYS),
                         check_path, warnings)
        acl = read_acl(sec, set(numbers) if numbers else None)
        if len(top.errors.lines) == start:
            targets.append(TargetConfig(_ok(iqn), _ok(alias), tuple(luns), _ok(auth), acl))
    return targets


def _iqn_checker() -> Callable[[str], str]:
    def check(text: str) -> str:
        try:
            return normalize_iscsi_name(text)
        except ValueError as exc:
            raise ValueError(f"is not a valid iSCSI name: it {exc}") from None
    return check


@dataclass
class _Lun:
    """What the cross-LUN checks need, read even when other keys of the LUN were wrong."""
    number: int | None
    path: str | None
    serial: str | None
    done: LunConfig | None  # set only if the LUN had no error


def _read_lun(target: Section, path: str, item: object, iqn: str | None,
              check_path: Callable[[str], str], clustered: bool) -> _Lun:
    errors = target.errors
    start = len(errors.lines)
    sec = Section(errors, path, item, _LUN_KEYS)
    number = sec.integer("number", None, 0, 255, "the LUN number, 0..255")
    file = sec.string("path", None, _PATH_ALLOWED + "; a regular file or a block device",
                      "the backing file or block device", check=check_path)
    block_size = sec.one_of("block_size", 512, _BLOCK_SIZES)
    size = sec.size("size", 0)
    read_only = sec.boolean("read_only", False)
    serial = sec.string("serial", None, "1..20 printable ASCII characters, no spaces",
                        check=_check_serial)
    if serial is None and sec.raw("serial") in (MISSING, None) and iqn is not None \
            and number is not None:
        serial = derive_serial(iqn, number)
    write_cache = sec.one_of("write_cache", True, _WRITE_CACHE)
    thin = sec.boolean("thin", True)
    mirror, mirror_id = read_mirror(sec, clustered, iqn, number)

    if size is not None and size > _MAX_SIZE:
        sec.error("size", f"{size} bytes is too large (allowed: at most {_MAX_SIZE}, the "
                          f"largest file offset)")
        size = None
    if size is not None and block_size is not None and size % block_size:
        sec.error("size", f"{size} bytes ({_raw_text(sec.raw('size'))}) is not a multiple of "
                          f"block_size {block_size} (allowed: a multiple of {block_size}, or 0 "
                          f"for the existing size)")
    if file is not None:
        if os.path.isdir(file):
            sec.error("path", f"{file!r} is a directory (allowed: a regular file or a block "
                              f"device)")
        elif not os.path.exists(file):
            if size == 0:
                sec.error("size", f"missing or 0, but {file!r} does not exist yet (required: "
                                  f"the size to create it with, e.g. 100GiB)")
            if read_only:
                sec.error("path", f"{file!r} does not exist, and a read-only LUN cannot be "
                                  f"created (allowed: an existing file or device)")
    done = None
    # serial stays None without an error when the target's IQN was wrong; the IQN's error
    # then keeps the whole config from being built.
    if len(errors.lines) == start and serial is not None:
        done = LunConfig(number=_ok(number), path=_ok(file), size=_ok(size),
                         block_size=_ok(block_size), read_only=_ok(read_only),
                         serial=_ok(serial), write_cache=_ok(write_cache), thin=_ok(thin),
                         mirror=_ok(mirror), mirror_id=mirror_id)
    return _Lun(number, file, serial, done)


def _raw_text(value: object) -> str:
    return value if isinstance(value, str) else repr(value)


def _read_iscsi(sec: Section) -> IscsiConfig | None:
    defaults = IscsiConfig()
    values: dict[str, Any] = {}
    for name, (lo, hi) in _ISCSI_INTS.items():
        values[name] = sec.integer(name, getattr(defaults, name), lo, hi)
    for name in _ISCSI_BOOLS:
        values[name] = sec.boolean(name, getattr(defaults, name))
    for name, zero_ok in _ISCSI_SECONDS.items():
        values[name] = sec.seconds(name, getattr(defaults, name), 0.0, _MAX_SECONDS, zero_ok)
    for name in ("header_digest", "data_digest"):
        values[name] = read_digests(sec, name, getattr(defaults, name))
    first, most = values["first_burst_length"], values["max_burst_length"]
    if first is not None and most is not None and first > most:
        sec.error("first_burst_length", f"{first} is greater than max_burst_length {most} "
                                        f"(allowed: at most max_burst_length)")
        return None
    if any(v is None for v in values.values()):
        return None
    return IscsiConfig(**values)
