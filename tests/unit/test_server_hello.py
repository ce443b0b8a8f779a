"""The server's Hello/authentication state machine (kalandra_core/server/hello.py), sans-IO:
each test plays the store's and the hub's answers itself."""

from __future__ import annotations

import os

import pytest
from nacl.signing import SigningKey

from kalandra_core.proto import ErrorCode, Hello
from kalandra_core.proto.hello_proof import ReplayCache, signed_hello
from kalandra_core.proto.hlc import pack
from kalandra_core.server.hello import (
    Accept,
    BindKey,
    HelloAuth,
    IssueToken,
    LookUpToken,
    RedeemLoginCode,
    Refuse,
)
from kalandra_core.storage.base import make_login_code

NOW_MS = 1_700_000_000_000
SKEW_MS = 5 * 60 * 1000
TOKEN = "t" * 43  # a device token's shape: never taken for a login code
MEMBER = 42


def _hello(token: bytes, key: SigningKey, hlc: int) -> bytes:
    return signed_hello(token, key, hlc).encode()


def _denied(step: object, message: str) -> None:
    assert step == Refuse(ErrorCode.NOT_AUTHORIZED, message, close=True)


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def replays() -> ReplayCache:
    return ReplayCache(SKEW_MS)


def test_device_token_with_a_valid_proof_authenticates(
    key: SigningKey, replays: ReplayCache
) -> None:
    auth = HelloAuth(replays)
    hlc = pack(NOW_MS, 0)
    assert auth.hello(_hello(TOKEN.encode(), key, hlc), hlc, NOW_MS) == LookUpToken(TOKEN)
    looked_up = auth.authenticated
    assert auth.member_found(MEMBER) == BindKey(MEMBER, bytes(key.verify_key))
    assert auth.key_bound(True) == Accept(MEMBER, None)
    assert (looked_up, auth.authenticated) == (False, True)
    assert auth.member_id == MEMBER
    # A second Hello on the same session is refused, and the session stays.
    again = auth.hello(_hello(TOKEN.encode(), key, hlc + 1), hlc + 1, NOW_MS)
    assert again == Refuse(ErrorCode.FRAME_REJECTED, "already authenticated")
    assert auth.authenticated


def test_login_code_is_redeemed_and_replaced_by_a_device_token(
    key: SigningKey, replays: ReplayCache
) -> None:
    code = make_login_code(os.urandom(14))
    typed = code.upper()  # case (and dashes, spaces) are forgiven
    auth = HelloAuth(replays)
    hlc = pack(NOW_MS, 0)
    step = auth.hello(_hello(typed.encode(), key, hlc), hlc, NOW_MS)
    assert step == RedeemLoginCode(code, NOW_MS)
    assert auth.member_found(MEMBER) == BindKey(MEMBER, bytes(key.verify_key))
    assert auth.key_bound(True) == IssueToken(MEMBER)
    assert auth.token_issued("new-device-token") == Accept(MEMBER, "new-device-token")
    assert auth.authenticated


def test_unknown_login_code_and_unknown_token_are_refused(
    key: SigningKey, replays: ReplayCache
) -> None:
    hlc = pack(NOW_MS, 0)
    code = make_login_code(os.urandom(14))
    auth = HelloAuth(replays)
    assert isinstance(auth.hello(_hello(code.encode(), key, hlc), hlc, NOW_MS), RedeemLoginCode)
    _denied(auth.member_found(None), "unknown, used or expired login code")
    assert not auth.authenticated

    auth = HelloAuth(replays)
    assert isinstance(auth.hello(_hello(TOKEN.encode(), key, hlc), hlc, NOW_MS), LookUpToken)
    _denied(auth.member_found(None), "unknown or revoked device token")
    assert not auth.authenticated


def test_a_token_that_is_no_ascii_is_unknown_without_a_look_up(
    key: SigningKey, replays: ReplayCache
) -> None:
    hlc = pack(NOW_MS, 0)
    step = HelloAuth(replays).hello(_hello("é".encode(), key, hlc), hlc, NOW_MS)
    _denied(step, "unknown or revoked device token")


def test_bad_proof_is_refused_before_any_look_up(key: SigningKey, replays: ReplayCache) -> None:
    hlc = pack(NOW_MS, 0)
    other = SigningKey.generate()
    forged = Hello(
        auth_token=TOKEN.encode(),
        signature_key=bytes(key.verify_key),
        proof=signed_hello(TOKEN.encode(), other, hlc).proof,
    )
    step = HelloAuth(replays).hello(forged.encode(), hlc, NOW_MS)
    _denied(step, "proof does not verify with signature_key")
    # A proof for another timestamp than the header's does not verify either.
    step = HelloAuth(replays).hello(_hello(TOKEN.encode(), key, hlc), hlc + 1, NOW_MS)
    _denied(step, "proof does not verify with signature_key")


def test_missing_token_key_or_proof(key: SigningKey, replays: ReplayCache) -> None:
    hlc = pack(NOW_MS, 0)
    no_token = Hello(signature_key=bytes(key.verify_key), proof=b"\0" * 64)
    _denied(
        HelloAuth(replays).hello(no_token.encode(), hlc, NOW_MS),
        "auth_token (a device token or login code) required",
    )
    no_proof = Hello(auth_token=TOKEN.encode(), signature_key=bytes(key.verify_key))
    _denied(
        HelloAuth(replays).hello(no_proof.encode(), hlc, NOW_MS),
        "signature_key and proof required",
    )


def test_timestamp_outside_the_clock_skew_is_refused(
    key: SigningKey, replays: ReplayCache
) -> None:
    for offset in (SKEW_MS + 1, -SKEW_MS - 1):
        hlc = pack(NOW_MS + offset, 0)
        step = HelloAuth(replays).hello(_hello(TOKEN.encode(), key, hlc), hlc, NOW_MS)
        _denied(step, "Hello timestamp outside the allowed clock skew")


def test_a_replayed_hello_opens_no_second_session(key: SigningKey, replays: ReplayCache) -> None:
    hlc = pack(NOW_MS, 0)
    data = _hello(TOKEN.encode(), key, hlc)
    first, second = HelloAuth(replays), HelloAuth(replays)
    assert isinstance(first.hello(data, hlc, NOW_MS), LookUpToken)
    assert isinstance(second.hello(data, hlc, NOW_MS), LookUpToken)
    assert isinstance(first.member_found(MEMBER), BindKey)
    _denied(second.member_found(MEMBER), "this Hello was already used")
    # A fresh Hello (new timestamp, new proof) from the same device is fine.
    third = HelloAuth(replays)
    later = hlc + 1
    assert isinstance(third.hello(_hello(TOKEN.encode(), key, later), later, NOW_MS), LookUpToken)
    assert isinstance(third.member_found(MEMBER), BindKey)


def test_key_bound_to_another_device_is_refused(key: SigningKey, replays: ReplayCache) -> None:
    hlc = pack(NOW_MS, 0)
    auth = HelloAuth(replays)
    auth.hello(_hello(TOKEN.encode(), key, hlc), hlc, NOW_MS)
    auth.member_found(MEMBER)
    _denied(auth.key_bound(False), "signature key does not match")
    assert not auth.authenticated
    assert auth.member_id == 0


def test_wrong_version_and_undecodable_payload(key: SigningKey, replays: ReplayCache) -> None:
    hlc = pack(NOW_MS, 0)
    hello = signed_hello(TOKEN.encode(), key, hlc)
    old = Hello(
        version=hello.version + 1,
        auth_token=hello.auth_token,
        signature_key=hello.signature_key,
        proof=hello.proof,
    )
    step = HelloAuth(replays).hello(old.encode(), hlc, NOW_MS)
    assert step == Refuse(ErrorCode.FRAME_REJECTED, f"unsupported version {old.version}")
    assert not step.close  # the client may try again with a version we speak
    step = HelloAuth(replays).hello(b"\xff\x00garbage", hlc, NOW_MS)
    assert isinstance(step, Refuse)
    assert step.code == ErrorCode.INVALID_PAYLOAD
    assert not step.close


def test_steps_out_of_order_are_a_bug_of_the_driver(replays: ReplayCache) -> None:
    auth = HelloAuth(replays)
    with pytest.raises(RuntimeError, match="out of order"):
        auth.member_found(MEMBER)
    with pytest.raises(RuntimeError, match="out of order"):
        auth.key_bound(True)


def test_an_abandoned_hello_lets_the_next_one_start_afresh(
    key: SigningKey, replays: ReplayCache
) -> None:
    """The store failed during a step: the session answers STORAGE_ERROR and stays open, and
    the client may send Hello again on it."""
    hlc = pack(NOW_MS, 0)
    auth = HelloAuth(replays)
    assert isinstance(auth.hello(_hello(TOKEN.encode(), key, hlc), hlc, NOW_MS), LookUpToken)
    auth.abandon()
    assert not auth.authenticated
    later = hlc + 1
    step = auth.hello(_hello(TOKEN.encode(), key, later), later, NOW_MS)
    assert step == LookUpToken(TOKEN)
    assert isinstance(auth.member_found(MEMBER), BindKey)
    assert auth.key_bound(True) == Accept(MEMBER, None)
    auth.abandon()  # (nothing to abandon once authenticated)
    assert auth.authenticated
