"""What Synapse sends the bridge as its appservice: transactions (authenticated, ordered,
acknowledged once handled: transactions.py, txn_order.py, as_auth.py), the events in them
(handler.py, mautrix's Matrix handler), what Synapse lost while the bridge or it was down
(catch_up.py), and the start-up ping (self_ping.py)."""
