"""Device tokens (kalandra_core/storage/base.py): never starting with "-", which the command line
would take for an option (`kalandra login --token -CYT...` failed so, one token in 64)."""

from __future__ import annotations

from kalandra_core.storage.base import device_token


def test_a_token_that_would_start_with_a_dash_is_drawn_again() -> None:
    draws = iter([b"\xf8" + bytes(31), bytes(32)])  # the first encodes as "-A...."
    token = device_token(lambda: next(draws))
    assert token == "A" * 43


def test_tokens_are_43_url_safe_characters_and_never_start_with_a_dash() -> None:
    tokens = [device_token() for _ in range(2000)]
    assert all(len(t) == 43 and not t.startswith("-") for t in tokens)
    assert all(
        set(t) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
        for t in tokens
    )
    assert len(set(tokens)) == len(tokens)
