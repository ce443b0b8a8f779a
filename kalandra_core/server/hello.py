"""Authentication of one session, sans-IO: the Hello in, the next step out.

A Hello carries a device token or a single-use login code, the device's Ed25519 key and the
proof that the device holds it (``proto/hello_proof.py``). The proof comes first: without it
nothing is looked up, redeemed or bound. What needs the store or the hub is an action the
asyncio session performs and answers:

* :class:`LookUpToken` / :class:`RedeemLoginCode` -> :meth:`HelloAuth.member_found`
* :class:`BindKey` (the device key to the account, first use binds it) ->
  :meth:`HelloAuth.key_bound`
* :class:`IssueToken` (a login code was redeemed: a device token replaces it) ->
  :meth:`HelloAuth.token_issued`

until :class:`Accept` or :class:`Refuse`. The session handles its frames one at a time, so one
Hello is in progress at most.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..proto import ErrorCode, Hello, Opcode, PayloadDecodeError, decode_payload
from ..proto.hello_proof import ReplayCache, verify_hello_proof
from ..proto.payloads import PROTOCOL_VERSION
from ..storage.base import normalize_login_code


@dataclass(frozen=True, slots=True)
class Refuse:
    """Answer the Hello with this error; ``close``: authentication failed, close the session."""

    code: ErrorCode
    message: str
    close: bool = False


@dataclass(frozen=True, slots=True)
class LookUpToken:
    """Which member this device token belongs to (None: unknown or revoked)."""

    token: str


@dataclass(frozen=True, slots=True)
class RedeemLoginCode:
    """Redeem this (normalized) login code at ``now_ms``; single use in the store, so a
    replayed Hello finds it gone."""

    code: str
    now_ms: int


@dataclass(frozen=True, slots=True)
class BindKey:
    """Bind ``key`` to the member (a no-op if it is bound already); False if the member has
    another key."""

    member_id: int
    key: bytes


@dataclass(frozen=True, slots=True)
class IssueToken:
    """Issue the member a device token (it replaces the redeemed login code)."""

    member_id: int


@dataclass(frozen=True, slots=True)
class Accept:
    member_id: int
    device_token: str | None  # new: the login code was redeemed, reconnect with this


Step = Refuse | LookUpToken | RedeemLoginCode | BindKey | IssueToken | Accept


class _State(enum.Enum):
    WAITING = "waiting"  # for a Hello
    LOOKING_UP = "looking up"  # the token or login code
    BINDING = "binding"  # the device key
    ISSUING = "issuing"  # a device token for a redeemed login code
    AUTHENTICATED = "authenticated"


class HelloAuth:
    """One session's authentication. ``replays`` is the server's: Hellos accepted within the
    clock skew window (shared by every session, so a captured Hello opens no second one)."""

    def __init__(self, replays: ReplayCache) -> None:
        self._replays = replays
        self._state = _State.WAITING
        self.member_id = 0
        self._key = b""
        self._token = b""
        self._hlc = 0
        self._code: str | None = None
        self._now_ms = 0

    @property
    def authenticated(self) -> bool:
        return self._state is _State.AUTHENTICATED

    def hello(self, payload: bytes, hlc_timestamp: int, now_ms: int) -> Step:
        """A Hello frame's payload and header timestamp, received at ``now_ms``."""
        if self._state is not _State.WAITING:
            return Refuse(ErrorCode.FRAME_REJECTED, "already authenticated")
        try:
            hello = decode_payload(Opcode.HELLO, payload)
        except PayloadDecodeError as exc:
            return Refuse(ErrorCode.INVALID_PAYLOAD, str(exc))
        assert isinstance(hello, Hello)
        if hello.version != PROTOCOL_VERSION:
            return Refuse(ErrorCode.FRAME_REJECTED, f"unsupported version {hello.version}")
        token, key, proof = hello.auth_token, hello.signature_key, hello.proof
        if not token:
            return _denied("auth_token (a device token or login code) required")
        if key is None or proof is None:
            return _denied("signature_key and proof required")
        if not self._replays.fresh(hlc_timestamp, now_ms):
            return _denied("Hello timestamp outside the allowed clock skew")
        if not verify_hello_proof(key, token, hlc_timestamp, proof):
            return _denied("proof does not verify with signature_key")
        try:
            text = token.decode("ascii")
        except UnicodeDecodeError:
            text = ""
        self._key, self._token, self._hlc, self._now_ms = key, token, hlc_timestamp, now_ms
        self._code = normalize_login_code(text)
        if self._code is not None:
            self._state = _State.LOOKING_UP
            return RedeemLoginCode(self._code, now_ms)
        if not text:
            return self._refuse("unknown or revoked device token")
        self._state = _State.LOOKING_UP
        return LookUpToken(text)

    def member_found(self, member_id: int | None) -> Step:
        """The answer to LookUpToken or RedeemLoginCode."""
        self._expect(_State.LOOKING_UP)
        if member_id is None:
            if self._code is not None:
                return self._refuse("unknown, used or expired login code")
            return self._refuse("unknown or revoked device token")
        # Checked only for valid tokens (no garbage grows the cache), and in this same step as
        # the record: of two sessions sending one Hello, one gets in. (A login code is single
        # use in the store already.)
        if self._code is None and not self._replays.first_use(
            self._token, self._key, self._hlc, self._now_ms
        ):
            return self._refuse("this Hello was already used")
        self.member_id = member_id
        self._state = _State.BINDING
        return BindKey(member_id, self._key)

    def key_bound(self, ok: bool) -> Step:
        """The answer to BindKey."""
        self._expect(_State.BINDING)
        if not ok:
            return self._refuse("signature key does not match")
        if self._code is not None:
            self._state = _State.ISSUING
            return IssueToken(self.member_id)
        return self._accept(None)

    def token_issued(self, token: str) -> Step:
        """The answer to IssueToken."""
        self._expect(_State.ISSUING)
        return self._accept(token)

    def abandon(self) -> None:
        """A step could not be performed (the store failed): the Hello is forgotten, and the
        next one starts afresh."""
        if self._state is not _State.AUTHENTICATED:
            self._reset()

    def _accept(self, device_token: str | None) -> Accept:
        self._state = _State.AUTHENTICATED
        self._token = self._key = b""
        return Accept(self.member_id, device_token)

    def _refuse(self, message: str) -> Refuse:
        """Authentication failed: back to waiting (the session closes anyway)."""
        self._reset()
        return _denied(message)

    def _reset(self) -> None:
        self._state = _State.WAITING
        self.member_id = 0
        self._token = self._key = b""

    def _expect(self, state: _State) -> None:
        if self._state is not state:
            raise RuntimeError(f"authentication step out of order (state: {self._state.value})")


def _denied(message: str) -> Refuse:
    return Refuse(ErrorCode.NOT_AUTHORIZED, message, close=True)
