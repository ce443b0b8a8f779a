"""The portal's ``org.kalandra.epoch`` state event carries a member count, not the roster: its
size does not grow with the group (a 10,000-member room sends one at every commit)."""

from __future__ import annotations

import json

from bridge.portal.members import epoch_content


def test_epoch_event_counts_members() -> None:
    content = epoch_content(7, bytes(range(32)), 1, 3)
    assert content == {
        "epoch": 7,
        "tree_hash": bytes(range(32)).hex(),
        "cipher_suite": 1,
        "member_count": 3,
    }


def test_epoch_event_size_is_independent_of_the_group_size() -> None:
    sizes = {
        n: len(json.dumps(epoch_content(2**40, bytes(32), 1, n)).encode())
        for n in (1, 100, 10_000)
    }
    # Only the count's digits differ.
    assert sizes[10_000] - sizes[1] == len("10000") - len("1")
    assert sizes[10_000] < 200
