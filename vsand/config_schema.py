"""Primitive checks for vsand's configuration: value parsers and an error-collecting reader.

`vsand/config.py` builds the typed `Config`; this module holds the pieces it is built from and
that other code may reuse (the login code validates initiator names with `normalize_iscsi_name`,
the CLI parses sizes with `parse_size`):

- `parse_size`, `format_size`: byte counts with binary suffixes.
- `normalize_iscsi_name`: RFC 7143 §4.2.7 name formats, lower-cased as RFC 3722 stringprep does.
- `parse_address`: ``host:port``, ``[v6]:port``, ``host`` or a bare IPv6 literal.
- `read_auth`, `read_acl`, `read_digests`: the security sections (CHAP credentials, secret
  files that only their owner may read, access lists with LUN masking, digest choices).
- `Errors` and `Section`: read one YAML mapping with typed getters that never raise; every
  problem becomes one line ``<file>: <key path>: <what is wrong> (allowed: <what is allowed>)``
  so that a whole file's mistakes are reported in one go.

The value parsers raise `ValueError` with a message that reads after the offending value
("... is not a size"); `Section` turns those into error lines.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Final, TypeVar

T = TypeVar("T")


class _Missing:
    """Marks an absent key; distinct from an explicit YAML null."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing()

# ---------------------------------------------------------------------------------------------
# Sizes

# Binary only: "1G" means GiB because every storage tool an operator pairs vsand with (dd,
# truncate, qemu-img, lvcreate) reads it that way.  Decimal "GB" is refused rather than guessed.
_SIZE_UNITS: Final[dict[str, int]] = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10,
    "m": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gib": 1 << 30,
    "t": 1 << 40, "tib": 1 << 40,
}
_DECIMAL_UNITS: Final = frozenset({"kb", "mb", "gb", "tb"})
_SIZE_RE: Final = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")
SIZE_ALLOWED: Final = ("bytes as an integer, or a number with K, M, G, T, KiB, MiB, GiB or TiB "
                       "(binary: 1G = 1GiB = 1073741824)")


def parse_size(value: object) -> int:
    """Return a byte count from an int or a string like "100GiB", "512M", "1.5T", "4096".

    K/M/G/T and KiB/MiB/GiB/TiB are all binary (1G == 1GiB == 2**30); units are case-insensitive;
    a fraction is accepted only if it comes to a whole number of bytes.  Decimal units (GB) are
    refused as ambiguous.  Raises ValueError; the multiple-of-block-size rule is the LUN's.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(mistyped(value, "a size"))
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value} is negative")
        return value
    m = _SIZE_RE.fullmatch(value)
    if m is None:
        raise ValueError(f"{show(value)} is not a size")
    number, unit = m.group(1), m.group(2).lower()
    if unit in _DECIMAL_UNITS:
        raise ValueError(f"{show(value)} uses a decimal unit ({m.group(2)}), which is ambiguous")
    if unit not in _SIZE_UNITS:
        raise ValueError(f"{show(value)} has an unknown unit {m.group(2)!r}")
    exact = Fraction(number) * _SIZE_UNITS[unit]
    if exact.denominator != 1:
        raise ValueError(f"{show(value)} is not a whole number of bytes")
    return int(exact)


def format_size(size: int) -> str | int:
    """The largest exact binary unit ("1GiB"), or the plain int when no unit divides it."""
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return size


# ---------------------------------------------------------------------------------------------
# iSCSI names (RFC 7143 §4.2.7, RFC 3720 §3.2.6, RFC 3722 stringprep)

ISCSI_NAME_ALLOWED: Final = ("iqn.YYYY-MM.reversed.domain[:id], eui.<16 hex digits> or "
                             "naa.<16 or 32 hex digits>; a-z 0-9 '-' '.' ':', at most 223 bytes")
_LABEL: Final = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
_IQN_RE: Final = re.compile(rf"iqn\.(\d{{4}})-(\d{{2}})\.({_LABEL}(?:\.{_LABEL})*)(?::(.*))?",
                            re.DOTALL)
_HEX_RE: Final = re.compile(r"[0-9a-f]+")
_NAME_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-.:")


def normalize_iscsi_name(name: str) -> str:
    """Return `name` lower-cased (stringprep's case folding) or raise ValueError saying why not.

    Only the ASCII subset of the stringprep profile is accepted: that is what every initiator
    emits in practice, and a non-ASCII name would compare differently across implementations.
    """
    norm = name.lower()
    if len(norm.encode("utf-8")) > 223:
        raise ValueError(f"is {len(norm.encode('utf-8'))} bytes long")
    bad = next((c for c in norm if c not in _NAME_CHARS), None)
    if bad is not None:
        raise ValueError(f"contains {bad!r}")
    if norm.startswith("iqn."):
        m = _IQN_RE.fullmatch(norm)
        if m is None:
            raise ValueError("is not iqn.YYYY-MM.reversed.domain[:id]")
        if not 1 <= int(m.group(2)) <= 12:
            raise ValueError(f"has month {m.group(2)}")
        if m.group(4) == "":
            raise ValueError("has nothing after ':'")
        return norm
    if norm.startswith("eui."):
        if len(norm) != 20 or not _HEX_RE.fullmatch(norm[4:]):
            raise ValueError("is not eui. followed by 16 hex digits")
        return norm
    if norm.startswith("naa."):
        if len(norm) not in (20, 36) or not _HEX_RE.fullmatch(norm[4:]):
            raise ValueError("is not naa. followed by 16 or 32 hex digits")
        return norm
    raise ValueError("does not start with iqn., eui. or naa.")


# ---------------------------------------------------------------------------------------------
# Network addresses

ADDRESS_ALLOWED: Final = "host:port, [IPv6]:port, host, or a bare IPv6 address; port 1..65535"
_HOSTNAME_RE: Final = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?", re.IGNORECASE)


def is_wildcard(host: str) -> bool:
    """True for 0.0.0.0 and :: - addresses one can listen on but never connect to."""
    return host in ("0.0.0.0", "::")


def _normalize_host(host: str) -> str:
    if host == "":
        raise ValueError("has an empty host (use 0.0.0.0 or [::] for every address)")
    try:
        # Normalised so that "::0" and "::" or "[::1]" and "::1" compare equal for uniqueness.
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if len(host) > 253 or not _HOSTNAME_RE.fullmatch(host):
        raise ValueError(f"has host {host!r}, which is neither an IP address nor a host name")
    return host.lower().rstrip(".")


def _parse_port(text: str) -> int:
    if not text.isdigit() or not text.isascii() or not 1 <= int(text) <= 65535:
        raise ValueError(f"has port {text!r}")
    return int(text)


def parse_address(text: str, default_port: int | None) -> tuple[str, int]:
    """Split "host:port" into a normalised (host, port); `default_port` None = port required.

    A bare IPv6 literal ("::1", "fe80::1%eth0") is all host: write "[::1]:3261" for a port,
    since "::1:3261" is itself a valid IPv6 address.
    """
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError("has '[' without ']'")
        host, rest = text[1:close], text[close + 1:]
        if ":" not in host:
            raise ValueError("has brackets around a non-IPv6 host")
        if rest == "":
            port_text = None
        elif rest.startswith(":"):
            port_text = rest[1:]
        else:
            raise ValueError(f"has {rest!r} after ']'")
    elif text.count(":") >= 2:
        host, port_text = text, None
    elif ":" in text:
        host, port_text = text.split(":")
    else:
        host, port_text = text, None
    norm = _normalize_host(host)
    if port_text is None:
        if default_port is None:
            raise ValueError("has no port")
        return norm, default_port
    return norm, _parse_port(port_text)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---------------------------------------------------------------------------------------------
# Error collection and typed reading


def kind(value: object) -> str:
    """A value's YAML type, with article, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__}"  # YAML timestamps become dates; say so


def show(value: object) -> str:
    """A short, bounded rendering of a YAML value for messages.

    Containers are named, never printed: an aliased YAML structure repr()s exponentially.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        text = repr(value)
    elif isinstance(value, str):
        text = repr(value)
    elif isinstance(value, (Mapping, list, tuple)):
        return kind(value)
    else:
        text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def mistyped(value: object, expected: str) -> str:
    """ "'abc' is a string, not an integer"; an explicit null reads as an empty value."""
    if value is None:
        return f"is empty (null), not {expected}"
    if isinstance(value, (Mapping, list, tuple)):
        return f"is {kind(value)}, not {expected}"
    return f"{show(value)} is {kind(value)}, not {expected}"


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class Errors:
    """Collects "<source>: <path>: <message>" lines; the caller raises once at the end."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.lines.append(f"{self.source}: {path or '(top level)'}: {message}")


class Section:
    """Typed, error-collecting reads from one YAML mapping at key path `path`.

    Every getter returns the value, the default when the key is absent, or None when the value
    is wrong (after recording why).  Callers skip cross-field checks on None, so one mistake
    is reported once rather than cascading.  Unknown keys are reported on construction.
    """

    def __init__(self, errors: Errors, path: str, value: object, keys: Sequence[str]) -> None:
        self.errors = errors
        self.path = path
        self.data: Mapping[object, object] = {}
        if value is MISSING or value is None:
            return  # an absent or empty section reads as all defaults
        if not isinstance(value, Mapping):
            self.error(None, f"{mistyped(value, 'a mapping')} "
                             f"(allowed: a mapping with keys {', '.join(keys)})")
            return
        self.data = value
        for key in value:
            if not isinstance(key, str):
                self.error(None, f"key {show(key)} is {kind(key)}, expected a string "
                                 f"(allowed keys: {', '.join(keys)})")
            elif key not in keys:
                close = difflib.get_close_matches(key, keys, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                self.error(key, f"unknown key{hint} (allowed keys: {', '.join(keys)})")

    def at(self, key: str | None) -> str:
        return self.path if key is None else join(self.path, key)

    def error(self, key: str | None, message: str) -> None:
        self.errors.add(self.at(key), message)

    def raw(self, key: str) -> object:
        return self.data.get(key, MISSING)

    def _get(self, key: str, required: str | None) -> object:
        """The raw value, or MISSING after reporting it when `required` (says what is needed)."""
        value = self.raw(key)
        if value is MISSING and required is not None:
            self.error(key, f"missing (required: {required})")
        return value

    def integer(self, key: str, default: int | None, lo: int, hi: int,
                required: str | None = None) -> int | None:
        value = self._get(key, required)
        if value is MISSING:
            return default
        allowed = f"an integer {lo}..{hi}"
        # bool is an int subclass in Python; "queue_depth: yes" must not read as 1.
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(key, f"{mistyped(value, 'an integer')} (allowed: {allowed})")
            return None
        if not lo <= value <= hi:
            self.error(key, f"{value} is out of range (allowed: {allowed})")
            return None
        return value

    def one_of(self, key: str, default: T, choices: Mapping[Any, T]) -> T | None:
        """A value from a closed set; `choices` maps accepted YAML values to results."""
        value = self._get(key, None)
        if value is MISSING:
            return default
        allowed = ", ".join(show(c) for c in choices)
        # type() rather than isinstance: 1 must not match True, nor "512" match 512.
        if type(value) not in {type(c) for c in choices}:
            self.error(key, f"{mistyped(value, 'one of the allowed values')} "
                            f"(allowed: {allowed})")
            return None
        # "INFO", "WriteBack": case is not worth an error
        folded = value.lower() if isinstance(value, str) else value
        for choice, result in choices.items():
            if type(choice) is type(folded) and choice == folded:
                return result
        self.error(key, f"{show(value)} is not allowed (allowed: {allowed})")
        return None

    def boolean(self, key: str, default: bool) -> bool | None:
        value = self._get(key, None)
        if value is MISSING:
            return default
        if not isinstance(value, bool):
            self.error(key, f"{mistyped(value, 'a boolean')} (allowed: true, false)")
            return None
        return value

    def seconds(self, key: str, default: float, lo: float, hi: float,
                zero_ok: bool) -> float | None:
        value = self._get(key, None)
        if value is MISSING:
            return default
        allowed = (f"seconds {lo:g}..{hi:g}" if zero_ok else f"seconds > 0, at most {hi:g}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.error(key, f"{mistyped(value, 'a number of seconds')} (allowed: {allowed})")
            return None
        if not math.isfinite(value) or not lo <= value <= hi or (value == 0 and not zero_ok):
            self.error(key, f"{show(value)} is out of range (allowed: {allowed})")
            return None
        return float(value)

    def string(self, key: str, default: str | None, allowed: str, required: str | None = None,
               check: Callable[[str], str] | None = None) -> str | None:
        """A string, passed through `check` (which normalises or raises ValueError)."""
        value = self._get(key, required)
        if value is MISSING:
            return default
        if not isinstance(value, str):
            # YAML 1.1 turns unquoted 0123 into an int and 10:30 into 630: suggest quotes.
            hint = "; quote it" if isinstance(value, (int, float)) else ""
            self.error(key, f"{mistyped(value, 'a string')}{hint} (allowed: {allowed})")
            return None
        if check is None:
            return value
        try:
            return check(value)
        except ValueError as exc:
            self.error(key, f"{show(value)} {exc} (allowed: {allowed})")
            return None

    def size(self, key: str, default: int) -> int | None:
        value = self._get(key, None)
        if value is MISSING or value is None:
            return default
        try:
            return parse_size(value)
        except ValueError as exc:
            self.error(key, f"{exc} (allowed: {SIZE_ALLOWED})")
            return None

    def items(self, key: str, required: str | None) -> list[tuple[str, object]]:
        """(path, item) for each entry of a list value; reports a non-list or an empty list."""
        value = self._get(key, required)
        if value is MISSING or (value is None and required is None):
            return []
        if not isinstance(value, list) and value is not None:
            self.error(key, mistyped(value, "a list")
                            + (f" (required: {required})" if required else ""))
            return []
        if not value and required is not None:  # [] or an explicit null
            self.error(key, f"is empty (required: {required})")
        return [(f"{self.at(key)}[{i}]", item) for i, item in enumerate(value or [])]


# ---------------------------------------------------------------------------------------------
# Security: CHAP credentials and access lists

AUTH_KEYS: Final = ("method", "user", "secret", "secret_file", "mutual_user", "mutual_secret",
                    "mutual_secret_file")
ACL_KEYS: Final = ("initiator", "luns")
AUTH_METHODS: Final = {"none": "none", "chap": "chap"}
SECRET_MIN: Final = 12   # RFC 7143 §9.2.1: under 96 bits CHAP needs IPsec, which vsand lacks
SECRET_PORTABLE: Final = 16  # the longest secret Microsoft's initiator accepts
SECRET_MAX: Final = 255
CHAP_USER_ALLOWED: Final = "1..255 bytes of text, no control characters"
SECRET_ALLOWED: Final = (f"{SECRET_MIN}..{SECRET_MAX} bytes (at most {SECRET_PORTABLE} for "
                         f"every initiator to accept it), ideally random")
REDACTED: Final = "(redacted)"


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """How initiators authenticate to a target (or to discovery): none, or CHAP."""
    method: str = "none"                    # "none" | "chap"
    user: str = ""
    secret: bytes = field(default=b"", repr=False)
    mutual_user: str = ""                    # the target's name and secret, for mutual CHAP
    mutual_secret: bytes = field(default=b"", repr=False)
    secret_file: str = ""                    # where the secret came from, "" = inline
    mutual_secret_file: str = ""


@dataclass(frozen=True, slots=True)
class AclEntry:
    initiator: str                           # normalised iSCSI name
    luns: tuple[int, ...] | None = None      # None: every LUN of the target


def _check_chap_user(text: str) -> str:
    if not text or len(text.encode("utf-8")) > 255 or any(
            ord(c) < 0x20 or ord(c) == 0x7f for c in text):
        raise ValueError("is not a valid CHAP user name")
    return text


def read_secret_file(path: str) -> bytes:
    """The first line of a secret file that only its owner can read; ValueError says why not."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ValueError(f"cannot be read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError("is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise ValueError(f"has mode {mode:04o}, readable or writable by group or others "
                         f"(chmod 600 it)")
    try:
        with open(path, "rb") as f:
            first = f.read(SECRET_MAX + 2).split(b"\n", 1)[0]
    except OSError as exc:
        raise ValueError(f"cannot be read: {exc.strerror or exc}") from None
    return first[:-1] if first.endswith(b"\r") else first


class _SecretReader:
    """Reads one secret given inline (``key``) or in a file (``key_file``)."""

    def __init__(self, sec: Section, check_path: Callable[[str], str],
                 warnings: list[str]) -> None:
        self.sec = sec
        self.check_path = check_path
        self.warnings = warnings

    def read(self, key: str, needed: bool) -> tuple[bytes | None, str]:
        sec = self.sec
        file_key = f"{key}_file"
        inline, in_file = sec.raw(key) is not MISSING, sec.raw(file_key) is not MISSING
        if inline and in_file:
            sec.error(file_key, f"is given together with {key} (allowed: one of {key} and "
                                f"{file_key})")
            return None, ""
        if not inline and not in_file:
            if needed:
                sec.error(key, f"missing (required: {key} or {file_key}, {SECRET_ALLOWED})")
            return (None if needed else b""), ""
        if inline:
            text = sec.string(key, None, SECRET_ALLOWED)
            return (None if text is None else self._checked(key, text.encode("utf-8"))), ""
        path = sec.string(file_key, None, "a file path; relative paths are relative to the "
                                          "config file", check=self.check_path)
        if path is None:
            return None, ""
        try:
            secret = read_secret_file(path)
        except ValueError as exc:
            sec.error(file_key, f"{path!r} {exc} (allowed: a file only its owner can read, "
                                f"mode 0600 or 0400, with the secret on its first line)")
            return None, path
        return self._checked(file_key, secret, f"the first line of {path!r}"), path

    def _checked(self, key: str, secret: bytes, what: str = "the secret") -> bytes | None:
        n = len(secret)
        if n < SECRET_MIN:
            # Never the secret itself in a message: only its length.
            self.sec.error(key, f"{what} is {n} bytes long; CHAP secrets under 96 bits "
                                f"are open to offline dictionary attacks unless IPsec "
                                f"protects the link (RFC 7143 §9.2.1) (allowed: "
                                f"{SECRET_ALLOWED})")
            return None
        if n > SECRET_MAX:
            self.sec.error(key, f"{what} is longer than {SECRET_MAX} bytes (allowed: "
                                f"{SECRET_ALLOWED})")
            return None
        if n > SECRET_PORTABLE:
            self.warnings.append(f"{self.sec.errors.source}: {self.sec.at(key)}: {what} is "
                                 f"{n} bytes long; some initiators (Microsoft's) accept at "
                                 f"most {SECRET_PORTABLE}")
        return secret


def read_auth(sec: Section, check_path: Callable[[str], str],
              warnings: list[str]) -> AuthConfig | None:
    """An ``auth:`` or ``discovery_auth:`` mapping; None after recording errors."""
    start = len(sec.errors.lines)
    method = sec.one_of("method", "none", AUTH_METHODS)
    if method != "chap":
        for key in AUTH_KEYS[1:]:
            if sec.raw(key) is not MISSING:
                sec.error(key, f"is set but method is {method or 'invalid'} (allowed: only "
                               f"with method: chap)")
        return AuthConfig() if len(sec.errors.lines) == start else None
    user = sec.string("user", None, CHAP_USER_ALLOWED, "the CHAP user name initiators log "
                      "in with", check=_check_chap_user)
    secrets = _SecretReader(sec, check_path, warnings)
    secret, secret_file = secrets.read("secret", True)
    mutual_user = sec.string("mutual_user", "", CHAP_USER_ALLOWED, check=_check_chap_user)
    has_mutual = any(sec.raw(k) is not MISSING for k in ("mutual_secret", "mutual_secret_file"))
    if sec.raw("mutual_user") is MISSING and has_mutual:
        sec.error("mutual_user", "missing (required with a mutual secret: the name this "
                                 "target answers mutual CHAP with)")
    mutual_secret, mutual_file = secrets.read("mutual_secret", bool(mutual_user))
    if secret and mutual_secret and secret == mutual_secret:
        sec.error("mutual_secret", "equals secret (allowed: a different secret; RFC 7143 "
                                   "§12.1.3 forbids using one secret in both directions)")
    if len(sec.errors.lines) != start:
        return None
    assert user is not None and secret is not None and mutual_secret is not None
    return AuthConfig("chap", user, secret, mutual_user or "", mutual_secret, secret_file,
                      mutual_file)


def read_acl(sec: Section, lun_numbers: set[int] | None) -> tuple[AclEntry, ...] | None:
    """A target's ``acl:`` list (absent: None, every initiator admitted)."""
    raw = sec.raw("acl")
    if raw is MISSING:
        return None
    entries: list[AclEntry] = []
    if raw is not None and not isinstance(raw, list):
        sec.error("acl", f"{mistyped(raw, 'a list')} (allowed: a list of {{initiator: "
                         f"<iSCSI name>, luns: [numbers]}})")
        return None
    items = sec.items("acl", None)
    if not items and (raw is None or isinstance(raw, list)):
        sec.error("acl", "is empty, which would admit no initiator (allowed: a list of "
                         "{initiator: <iSCSI name>, luns: [numbers]}; omit acl to admit every "
                         "initiator)")
    seen: dict[str, str] = {}
    for path, item in items:
        entry = Section(sec.errors, path, item, ACL_KEYS)
        start = len(sec.errors.lines)
        name = entry.string("initiator", None, ISCSI_NAME_ALLOWED, "the initiator's iSCSI "
                            "name", check=_name_check)
        if name is not None:
            if name in seen:
                entry.error("initiator", f"{name!r} is already listed at {seen[name]} "
                                         f"(allowed: one entry per initiator)")
            seen.setdefault(name, join(path, "initiator"))
        luns: tuple[int, ...] | None = None
        if entry.raw("luns") is not MISSING:
            numbers: list[int] = []
            lun_items = entry.items("luns", "at least one LUN number")
            for lun_path, value in lun_items:
                known = sorted(lun_numbers or ())
                if isinstance(value, bool) or not isinstance(value, int):
                    sec.errors.add(lun_path, f"{mistyped(value, 'a LUN number')} (allowed: "
                                             f"one of the target's LUNs {known})")
                elif lun_numbers is not None and value not in lun_numbers:
                    sec.errors.add(lun_path, f"{value} is not a LUN of this target (allowed: "
                                             f"one of {known})")
                elif value in numbers:
                    sec.errors.add(lun_path, f"{value} is listed twice (allowed: each LUN "
                                             f"once)")
                else:
                    numbers.append(value)
            luns = tuple(sorted(numbers))
        if len(sec.errors.lines) == start and name is not None:
            entries.append(AclEntry(name, luns))
    return tuple(entries)


def _name_check(text: str) -> str:
    try:
        return normalize_iscsi_name(text)
    except ValueError as exc:
        raise ValueError(f"is not a valid iSCSI name: it {exc}") from None


DIGESTS: Final = {"crc32c": "CRC32C", "none": "None"}
DIGEST_ALLOWED: Final = "a list of CRC32C and None, e.g. [CRC32C, None]"


def read_digests(sec: Section, key: str, default: tuple[str, ...]) -> tuple[str, ...] | None:
    """``header_digest``/``data_digest``: the digests a login may settle on."""
    raw = sec.raw(key)
    if raw is MISSING:
        return default
    if not isinstance(raw, list) or not raw:
        what = "is empty" if isinstance(raw, list) else mistyped(raw, "a list")
        sec.error(key, f"{what} (allowed: {DIGEST_ALLOWED})")
        return None
    out: list[str] = []
    for i, value in enumerate(raw):
        name = DIGESTS.get(value.lower()) if isinstance(value, str) else None
        if name is None or name in out:
            problem = "is listed twice" if name else "is not a digest"
            sec.errors.add(f"{sec.at(key)}[{i}]", f"{show(value)} {problem} (allowed: "
                                                  f"{DIGEST_ALLOWED})")
            return None
        out.append(name)
    return tuple(out)
