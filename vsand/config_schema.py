"""Primitive checks for vsand's configuration: value parsers and an error-collecting reader.

`vsand/config.py` builds the typed `Config`; this module holds the pieces it is built from and
that other code may reuse (the login code validates initiator names with `normalize_iscsi_name`,
the CLI parses sizes with `parse_size`):

- `parse_size`, `format_size`: byte counts with binary suffixes.
- `normalize_iscsi_name`: RFC 7143 §4.2.7 name formats, lower-cased as RFC 3722 stringprep does.
- `parse_address`: ``host:port``, ``[v6]:port``, ``host`` or a bare IPv6 literal.
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
import re
from collections.abc import Callable, Mapping, Sequence
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
