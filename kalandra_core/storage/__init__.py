"""Persistence: database URLs and schema migrations (the Store itself arrives with the server)."""
