"""CHAP and mutual CHAP for the iSCSI security stage (RFC 7143 §12.1.3, RFC 1994).

Theory of operation
-------------------
One ``ChapAuthenticator`` runs one login's exchange; the login machine feeds it the CHAP_*
keys of each complete request and sends back what it answers (see ``login.AuthStep``)::

    initiator: CHAP_A=<A1,A2,...>
    target:    CHAP_A=<A>  CHAP_I=<I>  CHAP_C=<C>
    initiator: CHAP_N=<N>  CHAP_R=<R>  [CHAP_I=<I'>  CHAP_C=<C'>]      (with [...]: mutual)
    target:                            [CHAP_N=<N'>  CHAP_R=<R'>]

R = H(I || secret || C) for the algorithm A (5 MD5, 6 SHA-1, 7 SHA-256, 8 SHA3-256: the
numbers RFC 7143bis and Linux use; the first of the initiator's list that we support wins).

Every failure is the same ``AuthStep(failure=1)``, which the login machine turns into Login
Response 0x0201 "authentication failure": an unknown user name and a wrong response cannot be
told apart, and both are checked (in constant time) whichever is wrong.  The mutual answer is
computed only after the initiator has proven itself, so the target is never an oracle for
someone who does not know the initiator's secret.  Besides a bad response, these fail:

* a challenge from the initiator equal to ours (RFC 7143 §12.1.3: the reflection attack);
* a challenge shorter than ``MIN_CHALLENGE`` bytes, or an identifier+challenge pair seen
  before (``ReplayGuard``, shared by the logins of one daemon: RFC 1994 §2.3 forbids reuse);
* mutual CHAP asked of a target that has no mutual secret, keys out of turn, or malformed
  values (binary values are 0x-hex or 0b-base64, RFC 7143 §6.1).

This module reads no entropy and no clock: the caller passes ``random_bytes`` (os.urandom).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from .login import AuthFactory, AuthStep

# CHAP_A number -> hashlib name.  5 is the one RFC 7143 requires.
ALGORITHMS: dict[int, str] = {5: "md5", 6: "sha1", 7: "sha256", 8: "sha3_256"}
CHALLENGE_LEN = 32          # bytes of our challenge (at least the longest digest)
MIN_CHALLENGE = 16          # shortest challenge accepted from an initiator
MAX_CHALLENGE = 1024        # longest: bounds the work an initiator can ask of us
MIN_SECRET = 12             # RFC 7143 §9.2.1: secrets under 96 bits need IPsec
FAILURE = 1                 # Login status detail 0x01: authentication failure

RandomBytes = Callable[[int], bytes]


class ChapError(ValueError):
    """A CHAP value that cannot be decoded."""


@dataclass(frozen=True, slots=True)
class ChapCredentials:
    """What a target checks (``user``/``secret``) and answers with (``mutual_*``)."""
    user: str
    secret: bytes
    mutual_user: str = ""
    mutual_secret: bytes = b""

    def __post_init__(self) -> None:
        if not self.user or len(self.secret) < MIN_SECRET:
            raise ValueError("CHAP needs a user name and a secret of at least 12 bytes")
        if bool(self.mutual_user) != bool(self.mutual_secret):
            raise ValueError("mutual CHAP needs both a user name and a secret")
        if self.mutual_secret and len(self.mutual_secret) < MIN_SECRET:
            raise ValueError("the mutual CHAP secret must be at least 12 bytes")
        if self.mutual_secret and hmac.compare_digest(self.mutual_secret, self.secret):
            # RFC 7143 §12.1.3: a secret is used in one direction only.
            raise ValueError("the mutual CHAP secret must differ from the initiator's")

    def __repr__(self) -> str:
        # Secrets never reach a log line or a traceback through repr().
        return f"ChapCredentials(user={self.user!r}, mutual_user={self.mutual_user!r})"


class ReplayGuard:
    """Remembers the last ``capacity`` (algorithm, identifier, challenge) an initiator sent."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._seen: OrderedDict[tuple[int, int, bytes], None] = OrderedDict()

    def fresh(self, algorithm: int, ident: int, challenge: bytes) -> bool:
        """True the first time a triple is seen; remembers it."""
        key = (algorithm, ident, challenge)
        if key in self._seen:
            self._seen.move_to_end(key)
            return False
        self._seen[key] = None
        if len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        return True


# ---------------------------------------------------------------------------------------------
# Value codecs

def decode_binary(value: str) -> bytes:
    """A binary value: 0x/0X + hex digits (odd count: a leading 0 is implied) or 0b/0B + base64."""
    prefix, body = value[:2], value[2:]
    if not body:
        raise ChapError("empty binary value")
    if prefix in ("0x", "0X"):
        if len(body) % 2:
            body = "0" + body
        try:
            return bytes.fromhex(body)
        except ValueError:
            raise ChapError("malformed hex value") from None
    if prefix in ("0b", "0B"):
        try:
            return base64.b64decode(body.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise ChapError("malformed base64 value") from None
    raise ChapError("a binary value starts with 0x or 0b")


def encode_binary(data: bytes) -> str:
    return "0x" + data.hex()


def decode_identifier(value: str) -> int:
    """CHAP_I: a number 0..255, decimal or 0x-hex."""
    try:
        if value[:2] in ("0x", "0X"):
            n = int(value[2:], 16)
        elif value.isdigit() and value.isascii():
            n = int(value, 10)
        else:
            raise ValueError
    except ValueError:
        raise ChapError("malformed CHAP_I") from None
    if not 0 <= n <= 255:
        raise ChapError("CHAP_I out of range")
    return n


def response(algorithm: int, ident: int, secret: bytes, challenge: bytes) -> bytes:
    """RFC 1994 §4.1: H(Identifier || secret || Challenge)."""
    h = hashlib.new(ALGORITHMS[algorithm])
    h.update(bytes((ident,)))
    h.update(secret)
    h.update(challenge)
    return h.digest()


def choose_algorithm(offered: str) -> int | None:
    """The first value of the initiator's CHAP_A list that we implement."""
    for item in offered.split(","):
        item = item.strip()
        if item.isdigit() and item.isascii() and int(item) in ALGORITHMS:
            return int(item)
    return None


# ---------------------------------------------------------------------------------------------
# The exchange

_FAIL = AuthStep(failure=FAILURE)


class ChapAuthenticator:
    """One login's CHAP exchange, on the target side."""

    def __init__(self, credentials: ChapCredentials, random_bytes: RandomBytes,
                 guard: ReplayGuard | None = None) -> None:
        self.credentials = credentials
        self.random_bytes = random_bytes
        self.guard = guard
        self._state = "algorithm"      # -> "response" -> "done" | "failed"
        self._algorithm = 0
        self._ident = 0
        self._challenge = b""

    def receive(self, pairs: list[tuple[str, str]]) -> AuthStep:
        step = _FAIL
        try:
            if self._state == "algorithm":
                step = self._on_algorithm(dict(pairs))
            elif self._state == "response":
                step = self._on_response(dict(pairs))
        except ChapError:
            step = _FAIL
        if step.failure:
            self._state = "failed"      # a failed exchange stays failed
        return step

    def _on_algorithm(self, keys: dict[str, str]) -> AuthStep:
        if set(keys) != {"CHAP_A"}:
            return _FAIL
        algorithm = choose_algorithm(keys["CHAP_A"])
        if algorithm is None:
            return _FAIL
        self._algorithm = algorithm
        self._ident = self.random_bytes(1)[0]
        self._challenge = self.random_bytes(CHALLENGE_LEN)
        if len(self._challenge) != CHALLENGE_LEN:
            raise ValueError("random_bytes returned the wrong number of bytes")
        self._state = "response"
        return AuthStep(reply=(("CHAP_A", str(algorithm)), ("CHAP_I", str(self._ident)),
                               ("CHAP_C", encode_binary(self._challenge))))

    def _on_response(self, keys: dict[str, str]) -> AuthStep:
        mutual = "CHAP_I" in keys or "CHAP_C" in keys
        expected = {"CHAP_N", "CHAP_R"} | ({"CHAP_I", "CHAP_C"} if mutual else set())
        if set(keys) != expected:
            return _FAIL
        creds = self.credentials
        got = decode_binary(keys["CHAP_R"])
        want = response(self._algorithm, self._ident, creds.secret, self._challenge)
        # Both comparisons always run: the time taken says nothing about which one failed.
        name_ok = hmac.compare_digest(keys["CHAP_N"].encode(), creds.user.encode())
        response_ok = hmac.compare_digest(got, want)
        if not (name_ok & response_ok):
            return _FAIL
        if not mutual:
            self._state = "done"
            return AuthStep(done=True)
        if not creds.mutual_secret:
            return _FAIL                # the initiator wants a proof we cannot give
        ident = decode_identifier(keys["CHAP_I"])
        challenge = decode_binary(keys["CHAP_C"])
        if not MIN_CHALLENGE <= len(challenge) <= MAX_CHALLENGE:
            return _FAIL
        if hmac.compare_digest(challenge, self._challenge):
            return _FAIL                # reflection: our own challenge sent back to us
        if self.guard is not None and not self.guard.fresh(self._algorithm, ident, challenge):
            return _FAIL
        answer = response(self._algorithm, ident, creds.mutual_secret, challenge)
        self._state = "done"
        return AuthStep(reply=(("CHAP_N", creds.mutual_user), ("CHAP_R", encode_binary(answer))),
                        done=True)


def chap_factory(credentials: ChapCredentials, random_bytes: RandomBytes,
                 guard: ReplayGuard | None = None) -> AuthFactory:
    """An ``AuthFactory`` for the login machine: one authenticator per login."""
    def make(initiator_name: str, target_name: str) -> ChapAuthenticator:
        return ChapAuthenticator(credentials, random_bytes, guard)
    return make
