"""Helpers shared by the test modules (tests/ is on sys.path: ``from helpers.native import ...``).

- native.py: accounts and native clients on an embedded server, waiting for their messages and
  events;
- matrix.py: nio clients as Matrix users, syncing until something holds, sending numbered
  messages;
- markers.py: "nothing else arrives" without a fixed wait: a marker sent behind what must not
  come, and what came before it;
- sql.py: a look at a database behind its owner's back.
"""
