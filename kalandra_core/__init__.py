"""Kalandra homeserver core: wire protocol, cryptography, MLS, sequencer, storage and client.

Nothing in this package imports ``bridge`` or ``mautrix``: the native server must run without the
Matrix side.
"""

__version__ = "0.1.0"
