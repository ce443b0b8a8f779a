"""The provisioning API over HTTP (provisioning.py), its room endpoints (rooms.py) and what
every endpoint needs (requests.py)."""
