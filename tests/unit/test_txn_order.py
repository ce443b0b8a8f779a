"""Transactions after a gap in Synapse's numbering are refused once
(bridge/appservice/txn_order.py)."""

from __future__ import annotations

from bridge.appservice.txn_order import TxnOrder


def test_in_order_and_replays_are_admitted() -> None:
    order = TxnOrder()
    for txn in ("1", "2", "3"):
        assert order.admit(txn)
        order.acknowledged(txn)
    assert order.admit("3")  # a replay of the last one
    assert order.admit("2")  # an older one
    assert order.admit("4")


def test_a_gap_is_refused_once_then_the_missing_one_comes_first() -> None:
    order = TxnOrder(last=246)
    assert not order.admit("248")  # 247 is stuck in Synapse: make it recover
    assert order.admit("247")
    order.acknowledged("247")
    assert order.admit("248")
    order.acknowledged("248")
    assert order.admit("249")


def test_a_number_skipped_for_good_is_taken_on_its_retry() -> None:
    order = TxnOrder(last=10)
    assert not order.admit("12")
    assert order.admit("12")  # the oldest Synapse has: 11 does not exist
    order.acknowledged("12")
    assert order.admit("13")


def test_numbers_restarting_after_a_synapse_restart_are_taken() -> None:
    order = TxnOrder(last=900)
    assert order.admit("1")
    order.acknowledged("1")
    assert order.admit("2")
    assert not order.admit("4")


def test_without_a_baseline_or_a_numeric_id_everything_is_admitted() -> None:
    assert TxnOrder().admit("57")
    order = TxnOrder(last=3)
    assert order.admit("mautrix-python_1_1")
