"""How frames travel between a client and the server: TCP, QUIC and the in-process loopback,
behind one small interface (:mod:`.interface`). Both ends use this package; the server and the
client import it, never each other."""
