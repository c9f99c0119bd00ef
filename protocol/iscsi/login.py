"""The iSCSI login phase (RFC 7143 §6.3, §11.12-§11.13) as a sans-IO state machine.

Theory of operation
-------------------
One ``LoginMachine`` lives per TCP connection until it returns a reply with ``done`` (the
connection is in full feature phase, ``params`` holds the result) or ``close`` (the login
failed; the reply carries the status and the connection must be dropped after sending it).

Each Login Request goes through the same steps, in this order:

1. Header checks: version, identity fields unchanged (ISID, TSIH, CID), T and C not both set,
   CSG equal to the current stage, a legal NSG when T=1 (start→0/1, 0→1/3, 1→3).
2. If our previous reply was split with the C bit, the request must be empty and gets the next
   piece.  The stage transition and the final TSIH ride on the last piece only.
3. Text accumulates across C=1 requests (answered with empty replies) up to
   ``MAX_LOGIN_TEXT`` bytes; the complete text is parsed once.
4. The first complete text must name the initiator (and the target for a Normal session).
   The authentication this login must pass is then fixed: ``auth_policy`` (if given) maps the
   session type and target to the methods allowed and their authenticators (e.g. CHAP with
   that target's secret); without it, ``offer.auth_methods`` and ``authenticators`` apply.
5. Every key is answered from the table in ``keys``: negotiated, Irrelevant, NotUnderstood or
   Reject.  A key not allowed in the stage, sent by the wrong side, or declared twice during the
   whole login fails the login (initiator error).  Names may be repeated with the same value
   because libiscsi resends them at the start of each stage.
6. The target agrees to a transition whenever the initiator asks and the security stage is
   satisfied (AuthMethod=None chosen or allowed, or the authenticator has finished).  Asking for
   full feature phase calls ``admit`` once, which assigns the TSIH or refuses.

The target never proposes a negotiated key the initiator did not send: a key left out keeps its
RFC default, and ``params`` reports that default.  It only states declarative keys:
TargetAlias and TargetPortalGroupTag in the first reply, MaxRecvDataSegmentLength in the first
operational-stage reply.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from . import keys as K
from . import pdu

MAX_LOGIN_TEXT = 8192        # a login's text, across C-bit continuations
LOGIN_SEGMENT = 8192         # the initiator's MaxRecvDataSegmentLength during login (default)
# Only session recovery (level 0) is implemented: a configured higher level is never offered.
MAX_ERROR_RECOVERY_LEVEL = 0

SECURITY, OPERATIONAL, FULL_FEATURE = 0, 1, 3
_NEXT = {SECURITY: (OPERATIONAL, FULL_FEATURE), OPERATIONAL: (FULL_FEATURE,)}


class Status(enum.IntEnum):
    """Login status class << 8 | detail (§11.13.5)."""
    SUCCESS = 0x0000
    TARGET_MOVED_TEMPORARILY = 0x0101
    TARGET_MOVED_PERMANENTLY = 0x0102
    INITIATOR_ERROR = 0x0200
    AUTHENTICATION_FAILURE = 0x0201
    AUTHORIZATION_FAILURE = 0x0202
    NOT_FOUND = 0x0203
    TARGET_REMOVED = 0x0204
    UNSUPPORTED_VERSION = 0x0205
    TOO_MANY_CONNECTIONS = 0x0206
    MISSING_PARAMETER = 0x0207
    CANT_INCLUDE_IN_SESSION = 0x0208
    SESSION_TYPE_NOT_SUPPORTED = 0x0209
    SESSION_DOES_NOT_EXIST = 0x020A
    INVALID_DURING_LOGIN = 0x020B
    TARGET_ERROR = 0x0300
    SERVICE_UNAVAILABLE = 0x0301
    OUT_OF_RESOURCES = 0x0302


@dataclass(frozen=True)
class TargetInfo:
    name: str
    alias: str
    portals: tuple[tuple[str, int, int], ...]   # (address, port, group tag) for SendTargets


@dataclass
class TargetOffer:
    """What this target proposes or accepts (from configuration)."""
    max_recv_data_segment_length: int = 262144
    first_burst_length: int = 262144
    max_burst_length: int = 1048576
    immediate_data: bool = True
    initial_r2t: bool = False
    max_outstanding_r2t: int = 8
    max_connections: int = 1
    default_time2wait: int = 2
    default_time2retain: int = 0
    error_recovery_level: int = 0
    header_digests: tuple[str, ...] = ("None",)
    data_digests: tuple[str, ...] = ("None",)
    auth_methods: tuple[str, ...] = ("None",)


@dataclass
class SessionParams:
    """The negotiated result of a login (defaults where a key was not negotiated)."""
    session_type: str               # "Normal" | "Discovery"
    initiator_name: str
    initiator_alias: str
    target_name: str                # "" for a Discovery session that named no target
    isid: int
    tsih: int
    cid: int
    header_digest: bool
    data_digest: bool
    max_recv_dsl_target: int        # largest data segment the initiator may send us
    max_send_dsl: int               # largest data segment we may send (initiator's declaration)
    first_burst_length: int
    max_burst_length: int
    immediate_data: bool
    initial_r2t: bool
    max_outstanding_r2t: int
    max_connections: int
    data_pdu_in_order: bool
    data_sequence_in_order: bool
    default_time2wait: int
    default_time2retain: int
    error_recovery_level: int


@dataclass
class LoginReply:
    header: bytes          # 48-byte Login Response BHS
    data: bytes            # key=value text, NUL-terminated entries, unpadded
    done: bool = False     # the connection is in full feature phase after this reply
    close: bool = False    # the login failed: close the connection after sending this reply


@dataclass(frozen=True, slots=True)
class AuthStep:
    """One step of an authentication method's exchange."""
    reply: tuple[tuple[str, str], ...] = ()
    done: bool = False     # the initiator is authenticated (and we are, if it asked)
    failure: int = 0       # non-zero: fail the login with status class 2 and this detail


class Authenticator(Protocol):
    """An authentication method's exchange (CHAP, ...): fed its keys, one request at a time."""

    def receive(self, pairs: list[tuple[str, str]]) -> AuthStep: ...


# Builds the authenticator for a method, given (initiator name, target name).
AuthFactory = Callable[[str, str], Authenticator]


@dataclass(frozen=True)
class AuthPolicy:
    """The authentication one login must pass, chosen once its session type and target are
    known (a target's CHAP secret differs from the discovery one)."""
    methods: tuple[str, ...] = ("None",)
    authenticators: Mapping[str, AuthFactory] = field(default_factory=dict)


# (session type, target name) -> the policy for that login.
AuthPolicyLookup = Callable[[str, str], AuthPolicy]


class _Fail(Exception):
    """Internal: abandon the request and answer with a login reject."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


@dataclass(slots=True)
class _Outcome:
    """How the complete text of one request is answered."""
    pairs: list[tuple[str, str]]
    transit: bool
    nsg: int
    tsih: int
    done: bool


class LoginMachine:
    def __init__(self, *, portal_group_tag: int, offer: TargetOffer,
                 lookup_target: Callable[[str], TargetInfo | None],
                 admit: Callable[[SessionParams], tuple[int, int, int]],
                 authenticators: Mapping[str, AuthFactory] | None = None,
                 auth_policy: AuthPolicyLookup | None = None,
                 cmd_window: int = 1) -> None:
        self.portal_group_tag = portal_group_tag
        self.offer = offer
        self.lookup_target = lookup_target
        self.admit = admit
        self.authenticators: Mapping[str, AuthFactory] = authenticators or {}
        self.auth_policy = auth_policy
        self._auth_methods = offer.auth_methods     # replaced by the policy, if any
        self.cmd_window = max(1, cmd_window)
        self.params: SessionParams | None = None

        self._over = False                      # done or failed: no more login requests
        self._stage: int | None = None          # current stage; None before the first request
        self._ident: tuple[int, int, int] | None = None
        self._partial = bytearray()             # request text continued with C=1
        self._pending: list[bytes] = []         # pieces of our reply still to send (C=1)
        self._pending_outcome: _Outcome | None = None
        self._first_text = True
        self._seen: dict[str, str] = {}         # every key the initiator sent during login
        self._results: dict[str, object] = {}   # negotiated values, decoded
        self._initiator_mrdsl: int | None = None
        self._declared_mrdsl: int | None = None
        self._names_sent = False
        self.session_type = "Normal"
        self.initiator_name = ""
        self.initiator_alias = ""
        self.target_name = ""
        self.target: TargetInfo | None = None
        self._auth_method: str | None = None
        self._auth: Authenticator | None = None
        self._authenticated = False

    # -----------------------------------------------------------------------------------------

    def receive(self, req: pdu.LoginRequest, statsn: int) -> LoginReply:
        try:
            return self._receive(req, statsn)
        except _Fail as fail:
            return self._reject(req, statsn, fail.status)

    def _receive(self, req: pdu.LoginRequest, statsn: int) -> LoginReply:
        if self._over:
            raise _Fail(Status.INITIATOR_ERROR)
        self._check_header(req)
        assert self._stage is not None
        if self._pending:
            # We are sending a reply in pieces: the initiator only asks for the next one.
            if len(req.data) or req.cont:
                raise _Fail(Status.INITIATOR_ERROR)
            return self._next_piece(req, statsn)
        if len(self._partial) + len(req.data) > MAX_LOGIN_TEXT:
            raise _Fail(Status.INITIATOR_ERROR)
        self._partial += req.data
        if req.cont:
            return self._reply(req, statsn, b"", transit=False, cont=False, nsg=0, tsih=req.tsih)
        text = bytes(self._partial)
        self._partial.clear()
        try:
            pairs = K.parse_text(text)
        except K.TextError:
            raise _Fail(Status.INITIATOR_ERROR) from None
        outcome = self._negotiate(req, pairs)
        pieces = K.split_text(K.encode_text(outcome.pairs), LOGIN_SEGMENT)
        self._pending = pieces
        self._pending_outcome = outcome
        return self._next_piece(req, statsn)

    def _check_header(self, req: pdu.LoginRequest) -> None:
        if req.version_min > 0:
            raise _Fail(Status.UNSUPPORTED_VERSION)
        ident = (req.isid, req.tsih, req.cid)
        if self._ident is None:
            self._ident = ident
        elif ident != self._ident:
            raise _Fail(Status.INITIATOR_ERROR)
        if req.transit and req.cont:      # §11.12.2: C=1 requires T=0
            raise _Fail(Status.INITIATOR_ERROR)
        if self._stage is None:
            if req.csg not in (SECURITY, OPERATIONAL):
                raise _Fail(Status.INITIATOR_ERROR)
            if req.csg == OPERATIONAL and "None" not in self._accepted_auth():
                # Skipping security negotiation when we require authentication (§6.3).
                raise _Fail(Status.AUTHENTICATION_FAILURE)
            self._stage = req.csg
        elif req.csg != self._stage:
            raise _Fail(Status.INITIATOR_ERROR)
        if req.transit and req.nsg not in _NEXT.get(self._stage, ()):
            raise _Fail(Status.INITIATOR_ERROR)

    def _next_piece(self, req: pdu.LoginRequest, statsn: int) -> LoginReply:
        piece = self._pending.pop(0)
        outcome = self._pending_outcome
        assert outcome is not None
        if self._pending:
            return self._reply(req, statsn, piece, transit=False, cont=True, nsg=0,
                               tsih=req.tsih)
        self._pending_outcome = None
        if outcome.transit:
            self._stage = outcome.nsg
        if outcome.done:
            self._over = True
        return self._reply(req, statsn, piece, transit=outcome.transit, cont=False,
                           nsg=outcome.nsg if outcome.transit else 0, tsih=outcome.tsih,
                           done=outcome.done)

    def _reply(self, req: pdu.LoginRequest, statsn: int, data: bytes, *, transit: bool,
               cont: bool, nsg: int, tsih: int, done: bool = False) -> LoginReply:
        assert self._stage is not None
        # The stage in the header is the one the request was in, even when it ends it.
        csg = req.csg
        maxcmdsn = (req.cmdsn + self.cmd_window - 1) & 0xFFFFFFFF if done else req.cmdsn
        header = pdu.login_response(transit, cont, csg, nsg, 0, 0, req.isid, tsih, req.itt,
                                    statsn, req.cmdsn, maxcmdsn, 0, 0, len(data))
        return LoginReply(header, data, done=done)

    def _reject(self, req: pdu.LoginRequest, statsn: int, status: int) -> LoginReply:
        self._over = True
        self._pending.clear()
        self._partial.clear()
        # T, C, CSG and NSG are reserved in a login reject (§6.3.1).
        header = pdu.login_response(False, False, 0, 0, 0, 0, req.isid, req.tsih, req.itt,
                                    statsn, req.cmdsn, req.cmdsn, status >> 8, status & 0xFF,
                                    0)
        return LoginReply(header, b"", done=False, close=True)

    # -----------------------------------------------------------------------------------------
    # Negotiation of one complete request text

    def _accepted_auth(self) -> tuple[str, ...]:
        """Offered methods we can run: None, or one with an authenticator plugged in."""
        return tuple(m for m in self._auth_methods
                     if m == "None" or m in self.authenticators)

    def _ours(self, name: str) -> object:
        o = self.offer
        return {
            "HeaderDigest": o.header_digests, "DataDigest": o.data_digests,
            "MaxConnections": o.max_connections, "InitialR2T": o.initial_r2t,
            "ImmediateData": o.immediate_data, "MaxBurstLength": o.max_burst_length,
            "FirstBurstLength": o.first_burst_length, "DefaultTime2Wait": o.default_time2wait,
            "DefaultTime2Retain": o.default_time2retain,
            "MaxOutstandingR2T": o.max_outstanding_r2t, "DataPDUInOrder": True,
            "DataSequenceInOrder": True, "ErrorRecoveryLevel": min(o.error_recovery_level, MAX_ERROR_RECOVERY_LEVEL),
            "TaskReporting": ("RFC3720",), "iSCSIProtocolLevel": 1, "IFMarker": False,
            "OFMarker": False, "AuthMethod": self._accepted_auth(),
        }.get(name)

    def _current(self, name: str) -> object:
        if name in self._results:
            return self._results[name]
        return K.default_value(K.TABLE[name])

    def _current_int(self, name: str) -> int:
        value = self._current(name)
        return value if isinstance(value, int) else 0

    def _negotiate(self, req: pdu.LoginRequest, pairs: list[tuple[str, str]]) -> _Outcome:
        if self._first_text:
            self._first_text = False
            self._identify(req, pairs)
        out: list[tuple[str, str]] = []
        if not self._names_sent and self.target_name:
            # §13.9: TPGT goes in the first reply after the first complete request.
            self._names_sent = True
            if self.target is not None and self.target.alias:
                out.append(("TargetAlias", self.target.alias))
            out.append(("TargetPortalGroupTag", str(self.portal_group_tag)))
        if self._stage == OPERATIONAL and self._declared_mrdsl is None:
            self._declared_mrdsl = self.offer.max_recv_data_segment_length
            out.append(("MaxRecvDataSegmentLength", str(self._declared_mrdsl)))

        # FirstBurstLength depends on MaxBurstLength, InitialR2T and ImmediateData: do it last.
        ordered = sorted(pairs, key=lambda kv: kv[0] == "FirstBurstLength")
        auth_pairs: list[tuple[str, str]] = []
        for key, value in ordered:
            reply = self._one_key(req, key, value, auth_pairs)
            if reply is not None:
                out.append((key, reply))

        if auth_pairs:
            if self._auth is None:
                # Method keys without a method running (e.g. CHAP_A after AuthMethod=None).
                raise _Fail(Status.AUTHENTICATION_FAILURE)
            step = self._auth.receive(auth_pairs)
            if step.failure:
                raise _Fail(0x0200 | (step.failure & 0xFF))
            out.extend(step.reply)
            self._authenticated = step.done

        transit = req.transit
        if transit and self._stage == SECURITY and not self._security_satisfied():
            if self._auth is None:
                # Leaving security without choosing a method we could accept.
                raise _Fail(Status.AUTHENTICATION_FAILURE)
            transit = False     # the method's exchange is still going on
        tsih = req.tsih
        done = False
        if transit and req.nsg == FULL_FEATURE:
            params = self._params(req)
            status_class, status_detail, tsih = self.admit(params)
            if status_class != 0:
                raise _Fail(((status_class & 0xFF) << 8) | (status_detail & 0xFF))
            params.tsih = tsih
            self.params = params
            done = True
        return _Outcome(out, transit, req.nsg if transit else 0, tsih, done)

    def _identify(self, req: pdu.LoginRequest, pairs: list[tuple[str, str]]) -> None:
        """Checks on the first complete request: who is logging in, to what, for what."""
        first: dict[str, str] = {}
        for key, value in pairs:
            first.setdefault(key, value)
        name = first.get("InitiatorName", "")
        if not name:
            raise _Fail(Status.MISSING_PARAMETER)
        if len(name.encode()) > K.MAX_NAME_LEN:
            raise _Fail(Status.INITIATOR_ERROR)
        session_type = first.get("SessionType", "Normal")
        if session_type not in ("Normal", "Discovery"):
            raise _Fail(Status.SESSION_TYPE_NOT_SUPPORTED)
        self.initiator_name = name
        self.session_type = session_type
        target_name = first.get("TargetName", "")
        if session_type == "Normal":
            if not target_name:
                raise _Fail(Status.MISSING_PARAMETER)
            target = self.lookup_target(target_name)
            if target is None:
                raise _Fail(Status.NOT_FOUND)
            self.target = target
        # A Discovery session may name a target; it is ignored (never looked up), but it
        # still earns the TargetPortalGroupTag answer (§13.9: "when TargetName is given").
        self.target_name = target_name
        if self.auth_policy is not None:
            policy = self.auth_policy(session_type, target_name if session_type == "Normal"
                                      else "")
            self._auth_methods = policy.methods
            self.authenticators = policy.authenticators
            if self._stage == OPERATIONAL and "None" not in self._accepted_auth():
                # Security negotiation skipped, and this target requires it (§6.3).
                raise _Fail(Status.AUTHENTICATION_FAILURE)

    def _one_key(self, req: pdu.LoginRequest, key: str, value: str,
                 auth_pairs: list[tuple[str, str]]) -> str | None:
        """Answer one key (None: nothing to say), collecting the auth method's keys."""
        spec = K.TABLE.get(key)
        previous = self._seen.get(key)
        if previous is not None:
            # §6.3: a parameter is declared or negotiated once per login.  Names may be
            # restated unchanged (libiscsi resends them in each stage), and the declarative
            # MaxRecvDataSegmentLength may be restated (the last one counts).
            if spec is None or not spec.redeclarable:
                raise _Fail(Status.INITIATOR_ERROR)
            if key != "MaxRecvDataSegmentLength" and value != previous:
                raise _Fail(Status.INITIATOR_ERROR)
            if key != "MaxRecvDataSegmentLength":
                return None
        self._seen[key] = value
        if spec is None:
            return K.NOT_UNDERSTOOD
        if value in K.RESERVED_VALUES or not spec.senders & K.Sender.INITIATOR:
            raise _Fail(Status.INITIATOR_ERROR)
        if spec.use is K.Use.FFPO:
            return K.IRRELEVANT
        if spec.stage is not K.Stage.ANY and spec.stage.value != self._stage:
            raise _Fail(Status.INITIATOR_ERROR)      # §6.3: key not allowed in this stage
        if spec.kind is K.Kind.AUTH:
            auth_pairs.append((key, value))
            return None
        if key == "AuthMethod":
            return self._auth_method_answer(value)
        if spec.kind is K.Kind.DECLARATIVE:
            return self._declaration(key, value)
        if key == "MaxRecvDataSegmentLength":
            if not K.valid_literal(spec, value):
                return K.REJECT
            self._initiator_mrdsl = K.parse_number(value)
            return None
        if spec.use is K.Use.LO and req.tsih != 0:
            return K.IRRELEVANT     # session-wide keys were settled by the leading connection
        if K.irrelevant(spec, self.session_type == "Discovery",
                        bool(self._current("InitialR2T")), bool(self._current("ImmediateData"))):
            return K.IRRELEVANT
        ours = self._ours(key)
        if key == "FirstBurstLength":
            ours = min(self.offer.first_burst_length, self._current_int("MaxBurstLength"))
        ans = K.answer(spec, value, ours)
        if ans.result is not None:
            self._results[key] = ans.result
        return ans.text

    def _declaration(self, key: str, value: str) -> str | None:
        if key in K.ALWAYS_REJECT:
            return K.REJECT
        if key == "InitiatorAlias":
            self.initiator_alias = value
        elif key == "SessionType" and value != self.session_type:
            raise _Fail(Status.INITIATOR_ERROR)     # the session type is fixed by the first text
        elif key == "TargetName" and not self.target_name:
            # Only a Discovery session gets here (a Normal one named it in its first text).
            self.target_name = value
        # Restated names were compared with their first value when the duplicate was seen.
        return None

    def _auth_method_answer(self, value: str) -> str:
        ans = K.answer(K.TABLE["AuthMethod"], value, self._accepted_auth())
        if not isinstance(ans.result, str):
            # Nothing offered that we allow: §6.3.2 lets the target end the login here.
            raise _Fail(Status.AUTHENTICATION_FAILURE)
        self._auth_method = ans.result
        if ans.result == "None":
            self._authenticated = True
        else:
            factory = self.authenticators[ans.result]
            self._auth = factory(self.initiator_name, self.target_name)
        return ans.result

    def _security_satisfied(self) -> bool:
        if self._auth_method is None:
            return "None" in self._accepted_auth()
        return self._authenticated

    def _params(self, req: pdu.LoginRequest) -> SessionParams:
        num = self._current_int

        def flag(name: str) -> bool:
            return bool(self._current(name))

        max_burst = num("MaxBurstLength")
        return SessionParams(
            session_type=self.session_type,
            initiator_name=self.initiator_name,
            initiator_alias=self.initiator_alias,
            target_name=self.target.name if self.target is not None else self.target_name,
            isid=req.isid, tsih=req.tsih, cid=req.cid,
            header_digest=self._current("HeaderDigest") == "CRC32C",
            data_digest=self._current("DataDigest") == "CRC32C",
            max_recv_dsl_target=self._declared_mrdsl or 8192,
            max_send_dsl=self._initiator_mrdsl or 8192,
            # §13.14: FirstBurstLength never exceeds MaxBurstLength.
            first_burst_length=min(num("FirstBurstLength"), max_burst),
            max_burst_length=max_burst,
            immediate_data=flag("ImmediateData"),
            initial_r2t=flag("InitialR2T"),
            max_outstanding_r2t=num("MaxOutstandingR2T"),
            max_connections=num("MaxConnections"),
            data_pdu_in_order=flag("DataPDUInOrder"),
            data_sequence_in_order=flag("DataSequenceInOrder"),
            default_time2wait=num("DefaultTime2Wait"),
            default_time2retain=num("DefaultTime2Retain"),
            error_recovery_level=num("ErrorRecoveryLevel"),
        )
