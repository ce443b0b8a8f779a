"""A complete local system for trying the product (`make run`) and for the tests: a throwaway
Synapse in its own virtualenv (synapse.py), and the bridge with the embedded Kalandra server on
SQLite (run.py)."""
