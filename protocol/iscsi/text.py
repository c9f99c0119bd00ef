"""Text Requests in full feature phase (RFC 7143 §11.10-§11.11, §13.3, Appendix C).

Theory of operation
-------------------
A text exchange is identified by the Initiator Task Tag.  A request with the reserved Target
Transfer Tag (0xffffffff) starts a new exchange and drops whatever the previous one left.
Whenever our reply leaves the exchange open (F=0) it carries a fresh TTT, and the initiator
continues by echoing it:

* request text continued with C=1: we answer each piece with an empty reply (F=0, TTT) until
  the text is complete;
* a reply longer than the initiator's MaxRecvDataSegmentLength: we send it in pieces with C=1
  (F=0, TTT); the initiator asks for each next piece with an empty request carrying the TTT;
  the last piece has C=0, F=1 and the reserved TTT.

Keys allowed here are the ones whose use is "any" or "full feature phase only": SendTargets,
MaxRecvDataSegmentLength (declarative; the new value applies once the exchange completes) and
InitiatorAlias.  Login-only keys are answered Reject, unknown keys NotUnderstood.

SendTargets (Appendix C): a Discovery session answers "All" with every target and "<name>"
with that target; a Normal session answers "" (and its own name) with its own target only and
rejects "All", which the RFC says MUST NOT be supported on an operational session.  Each
target is TargetName followed by one TargetAddress=address:port,tag per portal.

Each request gets exactly one PDU back (a Text Response, or a Reject for a request that breaks
the exchange rules), so the caller advances StatSN once per call.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from . import keys as K
from . import pdu
from .login import SessionParams, TargetInfo, TargetOffer

MAX_TEXT = 65536            # a request's text across C-bit continuations
RESERVED_TTT = pdu.RESERVED_TAG

# A Text Request BHS rebuilt from its decoded fields, for the data segment of a Reject.
_TEXT_BHS = struct.Struct(">BBBBIQIIII16x")


class TextHandler:
    def __init__(self, params: SessionParams, offer: TargetOffer,
                 targets: Callable[[], list[TargetInfo]], this_target: TargetInfo | None) -> None:
        self.params = params
        self.offer = offer
        self.targets = targets
        self.this_target = this_target
        self._itt: int | None = None
        self._ttt = RESERVED_TTT
        self._last_tag = 0
        self._partial = bytearray()
        self._pieces: list[bytes] = []
        self._final = True                  # the F bit the initiator set on the complete text
        self._new_mrdsl: int | None = None  # applied when the exchange completes

    def respond(self, req: pdu.TextRequest, statsn: int, expcmdsn: int,
                maxcmdsn: int) -> list[tuple[bytes, bytes]]:
        if req.cont and req.final:              # §11.10.2: C=1 requires F=0
            return [self._reject(req, pdu.RejectReason.PROTOCOL_ERROR, statsn, expcmdsn,
                                 maxcmdsn)]
        if req.ttt == RESERVED_TTT:
            self._reset()
            self._itt = req.itt
        elif req.ttt != self._ttt or req.itt != self._itt:
            return [self._reject(req, pdu.RejectReason.INVALID_PDU_FIELD, statsn, expcmdsn,
                                 maxcmdsn)]
        if self._pieces:
            if len(req.data) or req.cont:       # only "next piece, please" is legal here
                self._reset()
                return [self._reject(req, pdu.RejectReason.PROTOCOL_ERROR, statsn, expcmdsn,
                                     maxcmdsn)]
            return [self._next_piece(req, statsn, expcmdsn, maxcmdsn)]
        if len(self._partial) + len(req.data) > MAX_TEXT:
            self._reset()
            return [self._reject(req, pdu.RejectReason.PROTOCOL_ERROR, statsn, expcmdsn,
                                 maxcmdsn)]
        self._partial += req.data
        if req.cont:
            self._ttt = self._new_tag()
            header = pdu.text_response(False, False, 0, req.itt, self._ttt, statsn, expcmdsn,
                                       maxcmdsn, 0)
            return [(header, b"")]
        text = bytes(self._partial)
        self._partial.clear()
        try:
            pairs = K.parse_text(text)
        except K.TextError:
            self._reset()
            return [self._reject(req, pdu.RejectReason.PROTOCOL_ERROR, statsn, expcmdsn,
                                 maxcmdsn)]
        reply = K.encode_text(self._answer(pairs))
        # Pieces are sized by what the initiator can receive now; a new declaration in this
        # request applies only once the exchange completes.
        self._pieces = K.split_text(reply, self.params.max_send_dsl)
        self._final = req.final
        return [self._next_piece(req, statsn, expcmdsn, maxcmdsn)]

    # -----------------------------------------------------------------------------------------

    def _reset(self) -> None:
        self._itt = None
        self._ttt = RESERVED_TTT
        self._partial.clear()
        self._pieces = []
        self._new_mrdsl = None

    def _new_tag(self) -> int:
        self._last_tag = (self._last_tag + 1) & 0xFFFFFFFF
        if self._last_tag == RESERVED_TTT:
            self._last_tag = 1
        return self._last_tag

    def _next_piece(self, req: pdu.TextRequest, statsn: int, expcmdsn: int,
                    maxcmdsn: int) -> tuple[bytes, bytes]:
        piece = self._pieces.pop(0)
        more = bool(self._pieces)
        if more or not self._final:
            # The exchange stays open: more of our text, or the initiator said more will come.
            self._ttt = self._new_tag()
            header = pdu.text_response(False, more, 0, req.itt, self._ttt, statsn, expcmdsn,
                                       maxcmdsn, len(piece))
            return header, piece
        if self._new_mrdsl is not None:
            self.params.max_send_dsl = self._new_mrdsl
        self._reset()
        header = pdu.text_response(True, False, 0, req.itt, RESERVED_TTT, statsn, expcmdsn,
                                   maxcmdsn, len(piece))
        return header, piece

    def _reject(self, req: pdu.TextRequest, reason: int, statsn: int, expcmdsn: int,
                maxcmdsn: int) -> tuple[bytes, bytes]:
        b0 = pdu.Op.TEXT_REQ | (0x40 if req.immediate else 0)
        b1 = (0x80 if req.final else 0) | (0x40 if req.cont else 0)
        rejected = _TEXT_BHS.pack(b0, b1, 0, 0, len(req.data) & 0xFFFFFF, req.lun, req.itt,
                                  req.ttt, req.cmdsn, req.expstatsn)
        return pdu.reject(reason, statsn, expcmdsn, maxcmdsn), rejected

    def _answer(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        seen: set[str] = set()
        for key, value in pairs:
            if key in seen:
                out.append((key, K.REJECT))     # one answer per key per exchange
                continue
            seen.add(key)
            spec = K.TABLE.get(key)
            if spec is None:
                out.append((key, K.NOT_UNDERSTOOD))
            elif key == "SendTargets":
                out.extend(self._send_targets(value))
            elif (value in K.RESERVED_VALUES or not spec.senders & K.Sender.INITIATOR
                  or spec.use not in (K.Use.ALL, K.Use.FFPO)):
                out.append((key, K.REJECT))     # not a key the initiator may send in FFP
            elif key == "MaxRecvDataSegmentLength":
                if K.valid_literal(spec, value):
                    self._new_mrdsl = K.parse_number(value)
                else:
                    out.append((key, K.REJECT))
            elif key == "InitiatorAlias":
                self.params.initiator_alias = value
        return out

    def _send_targets(self, value: str) -> list[tuple[str, str]]:
        discovery = self.params.session_type == "Discovery"
        own = self.this_target
        if value == "All":
            if not discovery:
                return [("SendTargets", K.REJECT)]
            chosen = list(self.targets())
        elif value == "":
            if discovery:
                # No target is logged in to on a Discovery session: nothing to report.
                return [("SendTargets", K.REJECT)]
            chosen = [own] if own is not None else []
        elif discovery:
            chosen = [t for t in self.targets() if t.name == value]
        else:
            chosen = [own] if own is not None and own.name == value else []
        out: list[tuple[str, str]] = []
        for target in chosen:
            out.append(("TargetName", target.name))
            for address, port, tag in target.portals:
                out.append(("TargetAddress", K.format_address(address, port, tag)))
        return out
