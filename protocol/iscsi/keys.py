"""iSCSI text keys (RFC 7143 §6, §12, §13) as data, and the key=value text codec.

Each key the target understands is one ``KeySpec`` row: how its value is encoded, how the result
of a negotiation is computed (``Kind``), who may send it, when it may be sent (``Use``, login
``Stage``) and when it is irrelevant.  ``answer`` applies one row to one offered value, so the
login state machine and the full-feature Text handler share the same negotiation rules and
neither holds a chain of per-key ifs.

Text is a sequence of ``key=value`` entries, each followed by one NUL byte.  ``parse_text``
turns bytes into ordered (key, value) pairs or raises ``TextError``; it checks the syntax only
(key-name characters and length).  Value syntax is checked per key by ``answer``, because a bad
value is answered with ``Reject`` rather than failing the whole exchange.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

MAX_KEY_LEN = 63           # RFC 7143 §6.1: a standard-label is at most 63 characters
MAX_VALUE_LEN = 255        # simple values, not counting the delimiter
MAX_NAME_LEN = 223         # iSCSI names (§4.2.7.1)
MAX_LARGE_VALUE_LEN = 8192  # CHAP challenges/responses may be long binary strings

REJECT = "Reject"
IRRELEVANT = "Irrelevant"
NOT_UNDERSTOOD = "NotUnderstood"
NONE = "None"
# Only legal as answers; proposing one of these is a protocol error (§6.2).
RESERVED_VALUES = frozenset({REJECT, IRRELEVANT, NOT_UNDERSTOOD})

# A key name starts with a letter (iSCSIProtocolLevel is the one lower-case standard key) and
# uses letters, digits and . - + @ _ (# in public extensions such as X#NodeArchitecture).
_KEY_RE = re.compile(r"[A-Za-z][A-Za-z0-9.\-+@_#]*\Z")
_DEC_RE = re.compile(r"(?:0|[1-9][0-9]*)\Z")
_HEX_RE = re.compile(r"0[xX][0-9a-fA-F]+\Z")


class TextError(ValueError):
    """Text that is not a well-formed key=value sequence (answered with an initiator error)."""


class Kind(enum.Enum):
    BOOL_AND = "boolean-and"
    BOOL_OR = "boolean-or"
    NUM_MIN = "numerical-min"
    NUM_MAX = "numerical-max"
    NUM_DECLARATIVE = "numerical-declarative"   # each side states its own (MaxRecvDataSegmentLength)
    LIST = "list"                               # pick the first offered value we support
    DECLARATIVE = "declarative"                 # stated, never answered
    AUTH = "auth"                               # belongs to an authentication method's exchange


class Scope(enum.Enum):
    SESSION = "SW"
    CONNECTION = "CO"


class Use(enum.Enum):
    IO = "initialize-only"       # login only, any connection
    LO = "leading-only"          # login of a session's leading connection only
    ALL = "any"                  # login and full feature phase
    FFPO = "ffp-only"            # full feature phase only


class Stage(enum.Enum):
    SECURITY = 0
    OPERATIONAL = 1
    ANY = 2


class Sender(enum.Flag):
    INITIATOR = enum.auto()
    TARGET = enum.auto()
    BOTH = INITIATOR | TARGET


@dataclass(frozen=True, slots=True)
class KeySpec:
    name: str
    kind: Kind
    default: str | None
    use: Use
    stage: Stage
    scope: Scope = Scope.SESSION
    senders: Sender = Sender.BOTH
    low: int = 0
    high: int = 0
    values: tuple[str, ...] = ()      # the literal values understood (lists, enums)
    discovery_irrelevant: bool = False
    max_len: int = MAX_VALUE_LEN
    redeclarable: bool = False        # may be sent again during login (same value for names)


def _normal(name: str, kind: Kind, default: str, low: int = 0, high: int = 0,
            values: tuple[str, ...] = ()) -> KeySpec:
    """A leading-only operational key that only means something in a Normal session."""
    return KeySpec(name, kind, default, Use.LO, Stage.OPERATIONAL, low=low, high=high,
                   values=values, discovery_irrelevant=True)


_LEN_HIGH = 2**24 - 1

TABLE: dict[str, KeySpec] = {s.name: s for s in (
    # §13.1..§13.9: connection and naming keys
    KeySpec("HeaderDigest", Kind.LIST, "None", Use.IO, Stage.OPERATIONAL, Scope.CONNECTION,
            values=("CRC32C", "None")),
    KeySpec("DataDigest", Kind.LIST, "None", Use.IO, Stage.OPERATIONAL, Scope.CONNECTION,
            values=("CRC32C", "None")),
    _normal("MaxConnections", Kind.NUM_MIN, "1", 1, 65535),
    KeySpec("SendTargets", Kind.DECLARATIVE, None, Use.FFPO, Stage.ANY,
            senders=Sender.INITIATOR),
    KeySpec("TargetName", Kind.DECLARATIVE, None, Use.IO, Stage.ANY, max_len=MAX_NAME_LEN,
            redeclarable=True),
    KeySpec("InitiatorName", Kind.DECLARATIVE, None, Use.IO, Stage.ANY,
            senders=Sender.INITIATOR, max_len=MAX_NAME_LEN, redeclarable=True),
    KeySpec("TargetAlias", Kind.DECLARATIVE, None, Use.ALL, Stage.ANY, senders=Sender.TARGET),
    KeySpec("InitiatorAlias", Kind.DECLARATIVE, None, Use.ALL, Stage.ANY,
            senders=Sender.INITIATOR, redeclarable=True),
    KeySpec("TargetAddress", Kind.DECLARATIVE, None, Use.ALL, Stage.ANY, senders=Sender.TARGET),
    KeySpec("TargetPortalGroupTag", Kind.NUM_DECLARATIVE, None, Use.IO, Stage.ANY,
            senders=Sender.TARGET, low=0, high=65535),
    # §13.10..§13.21: session operational parameters
    _normal("InitialR2T", Kind.BOOL_OR, "Yes"),
    _normal("ImmediateData", Kind.BOOL_AND, "Yes"),
    KeySpec("MaxRecvDataSegmentLength", Kind.NUM_DECLARATIVE, "8192", Use.ALL,
            Stage.OPERATIONAL, Scope.CONNECTION, low=512, high=_LEN_HIGH, redeclarable=True),
    _normal("MaxBurstLength", Kind.NUM_MIN, "262144", 512, _LEN_HIGH),
    _normal("FirstBurstLength", Kind.NUM_MIN, "65536", 512, _LEN_HIGH),
    KeySpec("DefaultTime2Wait", Kind.NUM_MAX, "2", Use.LO, Stage.OPERATIONAL, low=0, high=3600),
    KeySpec("DefaultTime2Retain", Kind.NUM_MIN, "20", Use.LO, Stage.OPERATIONAL, low=0,
            high=3600),
    _normal("MaxOutstandingR2T", Kind.NUM_MIN, "1", 1, 65535),
    # RFC 7143 §13.18/§13.19: both in-order keys combine with OR (Yes wins).
    _normal("DataPDUInOrder", Kind.BOOL_OR, "Yes"),
    _normal("DataSequenceInOrder", Kind.BOOL_OR, "Yes"),
    KeySpec("ErrorRecoveryLevel", Kind.NUM_MIN, "0", Use.LO, Stage.OPERATIONAL, low=0, high=2),
    KeySpec("SessionType", Kind.DECLARATIVE, "Normal", Use.LO, Stage.ANY,
            senders=Sender.INITIATOR, values=("Normal", "Discovery"), redeclarable=True),
    # §13.23..§13.26
    _normal("TaskReporting", Kind.LIST, "RFC3720",
            values=("RFC3720", "ResponseFence", "FastAbort")),
    _normal("iSCSIProtocolLevel", Kind.NUM_MIN, "1", 0, 31),
    KeySpec("X#NodeArchitecture", Kind.DECLARATIVE, None, Use.LO, Stage.ANY),
    # Obsoleted marker keys (§13.25): answered, never used.  The boolean ones are answered "No"
    # (the alternative the RFC allows) because RFC 3720 initiators still send IFMarker=No and
    # some treat "Reject" as a failure; the interval keys are always rejected.
    KeySpec("IFMarker", Kind.BOOL_AND, "No", Use.IO, Stage.OPERATIONAL, Scope.CONNECTION),
    KeySpec("OFMarker", Kind.BOOL_AND, "No", Use.IO, Stage.OPERATIONAL, Scope.CONNECTION),
    KeySpec("IFMarkInt", Kind.DECLARATIVE, None, Use.IO, Stage.OPERATIONAL, Scope.CONNECTION),
    KeySpec("OFMarkInt", Kind.DECLARATIVE, None, Use.IO, Stage.OPERATIONAL, Scope.CONNECTION),
    # §12: security negotiation.  AuthMethod picks the method; the method's own keys go to it.
    KeySpec("AuthMethod", Kind.LIST, None, Use.IO, Stage.SECURITY, Scope.CONNECTION,
            values=("KRB5", "SRP", "SPKM1", "SPKM2", "CHAP", "None")),
    *(KeySpec(n, Kind.AUTH, None, Use.IO, Stage.SECURITY, Scope.CONNECTION,
              max_len=MAX_LARGE_VALUE_LEN)
      for n in ("CHAP_A", "CHAP_I", "CHAP_C", "CHAP_N", "CHAP_R",
                "SRP_U", "SRP_GROUP", "SRP_A", "SRP_B", "SRP_M", "SRP_HM", "SRP_N", "SRP_g",
                "SRP_s", "KRB_AP_REQ", "KRB_AP_REP", "SPKM_REQ", "SPKM_ERROR",
                "SPKM_REP_TI", "SPKM_REP_IT")),
)}

# Keys answered with Reject whenever they arrive (the marker intervals: markers are gone).
ALWAYS_REJECT = frozenset({"IFMarkInt", "OFMarkInt"})


# ---------------------------------------------------------------------------------------------
# Text codec

def parse_text(data: bytes | bytearray | memoryview) -> list[tuple[str, str]]:
    """Split a complete text (all continuations joined) into ordered (key, value) pairs.

    Every entry must end with NUL; empty entries (padding-like runs of NULs) are skipped.
    """
    raw = bytes(data)
    if not raw:
        return []
    if raw[-1] != 0:
        raise TextError("text does not end with a NUL delimiter")
    pairs: list[tuple[str, str]] = []
    for entry in raw[:-1].split(b"\0"):
        if not entry:
            continue
        key_b, eq, value_b = entry.partition(b"=")
        if not eq:
            raise TextError("entry without '='")
        try:
            key = key_b.decode("ascii")
            value = value_b.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TextError("key or value is not valid text") from exc
        if len(key_b) > MAX_KEY_LEN or not _KEY_RE.match(key):
            raise TextError(f"malformed key name {key[:MAX_KEY_LEN]!r}")
        pairs.append((key, value))
    return pairs


def encode_text(pairs: list[tuple[str, str]] | tuple[tuple[str, str], ...]) -> bytes:
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in pairs)


def split_text(data: bytes, limit: int) -> list[bytes]:
    """Cut a response text into data segments of at most ``limit`` bytes (C-bit continuation).

    Entries may be cut anywhere: the peer joins the pieces before parsing (§6.1).
    """
    if limit <= 0:
        limit = 512
    if not data:
        return [b""]
    return [data[i:i + limit] for i in range(0, len(data), limit)]


def parse_number(value: str) -> int | None:
    """A decimal or 0x-hex constant below 2**64, or None when malformed."""
    if _DEC_RE.match(value):
        n = int(value)
    elif _HEX_RE.match(value):
        n = int(value[2:], 16)
    else:
        return None
    return n if n < 2**64 else None


def parse_bool(value: str) -> bool | None:
    return True if value == "Yes" else False if value == "No" else None


def format_bool(value: bool) -> str:
    return "Yes" if value else "No"


def default_value(spec: KeySpec) -> object:
    """The RFC default of a key, decoded to bool/int/str."""
    if spec.default is None:
        return None
    if spec.kind in (Kind.BOOL_AND, Kind.BOOL_OR):
        return spec.default == "Yes"
    if spec.kind in (Kind.NUM_MIN, Kind.NUM_MAX, Kind.NUM_DECLARATIVE):
        return int(spec.default)
    return spec.default


def valid_literal(spec: KeySpec, value: str) -> bool:
    """A proposed value is syntactically acceptable for its key (not yet negotiated)."""
    if len(value.encode()) > spec.max_len:
        return False
    if spec.kind in (Kind.BOOL_AND, Kind.BOOL_OR):
        return parse_bool(value) is not None
    if spec.kind in (Kind.NUM_MIN, Kind.NUM_MAX, Kind.NUM_DECLARATIVE):
        n = parse_number(value)
        return n is not None and spec.low <= n <= spec.high
    if spec.kind is Kind.LIST:
        return all(item for item in value.split(","))
    return True


@dataclass(frozen=True, slots=True)
class Answer:
    """What to say back for one offered key, and the value it leaves negotiated."""
    text: str | None            # None: nothing to say (declarative)
    result: object = None       # bool / int / str; None when the key keeps its current value


def answer(spec: KeySpec, offered: str, ours: object) -> Answer:
    """Apply the key's result function to the initiator's offer and our own preference.

    ``ours`` is a bool for boolean keys, an int for numerical ones, and for list keys the
    tuple of values we accept.  Out-of-range or malformed offers are answered ``Reject``
    and leave the key at its current value (§6.2).
    """
    if spec.name in ALWAYS_REJECT or not valid_literal(spec, offered):
        return Answer(REJECT)
    kind = spec.kind
    if kind is Kind.BOOL_AND:
        result = bool(parse_bool(offered)) and bool(ours)
        return Answer(format_bool(result), result)
    if kind is Kind.BOOL_OR:
        result = bool(parse_bool(offered)) or bool(ours)
        return Answer(format_bool(result), result)
    if kind in (Kind.NUM_MIN, Kind.NUM_MAX):
        n = parse_number(offered)
        assert n is not None  # valid_literal checked it
        mine = int(ours) if isinstance(ours, int) else n
        mine = min(max(mine, spec.low), spec.high)
        result_n = min(n, mine) if kind is Kind.NUM_MIN else max(n, mine)
        return Answer(str(result_n), result_n)
    if kind is Kind.NUM_DECLARATIVE:
        return Answer(None, parse_number(offered))
    if kind is Kind.LIST:
        accepted = tuple(ours) if isinstance(ours, (tuple, list)) else ()
        for item in offered.split(","):
            # Values we do not understand are skipped, not fatal (§6.2.1).
            if item in accepted and (not spec.values or item in spec.values):
                return Answer(item, item)
        return Answer(REJECT)
    return Answer(None, offered)


def irrelevant(spec: KeySpec, discovery: bool, initial_r2t: bool, immediate_data: bool) -> bool:
    """The spec's "Irrelevant when" rules, given the session type and the values so far."""
    if discovery and spec.discovery_irrelevant:
        return True
    # §13.14: no unsolicited data at all makes FirstBurstLength meaningless.
    return spec.name == "FirstBurstLength" and initial_r2t and not immediate_data


def format_address(address: str, port: int, group_tag: int) -> str:
    """TargetAddress value: IPv6 literals go in brackets (§13.8)."""
    if ":" in address and not address.startswith("["):
        address = f"[{address}]"
    return f"{address}:{port},{group_tag}"
