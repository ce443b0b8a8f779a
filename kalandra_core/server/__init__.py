"""The Kalandra homeserver: sessions, per-room sequencers, transports (TCP, QUIC)."""
