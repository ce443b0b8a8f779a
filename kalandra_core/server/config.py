"""Server settings (the ``server`` section of the config file) with production defaults.

The fields are the options: their types and ranges are checked when the file is loaded
(kalandra_core.config_check). A range refuses only what cannot work (a negative size, a rate
or a timeout of 0, a sync of 0 frames).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config_check import bounded, load_section, not_an_option
from ..proto import MAX_PAYLOAD_SIZE


@dataclass(slots=True)
class Limits:
    max_connections: int = bounded(10_000, low=0)
    max_payload_size: int = bounded(MAX_PAYLOAD_SIZE, low=1)
    rate_per_second: float = bounded(200.0, low=0, above=True)  # frames per session, sustained
    rate_burst: int = bounded(400, low=1)
    # Media blocks (CASPut, CASGet; up to 256 KiB each) per session, instead of frames: 2,048
    # a second is 512 MiB/s, and the burst moves a 100 MiB file at once.
    media_rate_per_second: float = bounded(2048.0, low=0, above=True)
    media_rate_burst: int = bounded(512, low=1)
    # Bytes queued per connection before it is dropped (an idle one always takes one frame).
    send_buffer: int = bounded(8 * 1024 * 1024, low=0)
    handshake_timeout: float = bounded(30.0, low=0, above=True)
    idle_timeout: float = bounded(120.0, low=0, above=True)
    batch_max: int = bounded(256, low=1)  # frames per storage transaction
    sync_max: int = bounded(500, low=1)  # frames per SyncResponse
    # HLC stamps this far in the future are refused.
    max_clock_skew_ms: int = bounded(5 * 60 * 1000, low=0)
    # KeyPackage fetches per requesting member (all its sessions): sustained rate and burst.
    key_package_fetch_per_second: float = bounded(0.5, low=0, above=True)
    key_package_fetch_burst: int = bounded(50, low=1)


@dataclass(slots=True)
class MediaConfig:
    """``server.media``: the largest file (plaintext bytes) a client may upload, and the
    encrypted bytes one member may keep stored (``quota_per_member``; 0: no quota). A member's
    usage is the size of every block it references, once per room: a block shared with
    others counts in full for each holder (each reference keeps it stored), putting a block
    it already holds in that room costs nothing, and a deletion (its own, or a moderator's
    of its blocks) frees the bytes at once."""

    max_size: int = bounded(100 * 1024 * 1024, low=0)
    quota_per_member: int = bounded(1024 * 1024 * 1024, low=0)


@dataclass(slots=True)
class ClusterConfig:
    """``server.cluster``: several processes on one PostgreSQL database, each room sequenced by
    the process holding its lease. ``node_name`` must be unique and stable per process (a
    process started again under its name takes its rooms back at once); empty: the host name
    and the TCP port. A lease lasts ``lease_seconds`` from its last renewal (every
    ``renew_seconds``), judged by the database's clock: a dead process's rooms are served again
    at most that long after it died. A frame forwarded to a room's owner that has no answer in
    ``forward_timeout`` makes that node a suspect: the frame is routed again, and the room is
    taken once the suspect's lease has run out. With ``rebalance`` on, every
    ``rebalance_seconds`` a process marks itself alive and hands rooms over (no frame lost) to
    live processes while it holds more than its share of the rooms."""

    enabled: bool = False
    node_name: str = ""
    lease_seconds: float = bounded(10.0, low=0, above=True)
    renew_seconds: float = bounded(3.0, low=0, above=True)
    forward_timeout: float = bounded(5.0, low=0, above=True)
    rebalance: bool = True
    rebalance_seconds: float = bounded(5.0, low=0, above=True)


@dataclass(slots=True)
class ServerConfig:
    database: str = not_an_option("sqlite:///kalandra.db")  # the file's database.url
    tcp_host: str = "127.0.0.1"
    tcp_port: int | None = bounded(4434, low=0, high=65535)  # None: TCP off; 0: any free port
    quic_host: str = "127.0.0.1"
    quic_port: int | None = bounded(4433, low=0, high=65535)  # None: QUIC off
    certificate: Path | None = None  # PEM; None: self-signed, created next to the database
    private_key: Path | None = None
    server_key: Path | None = None  # Ed25519 seed file; created when missing
    data_dir: Path = Path(".")
    limits: Limits = field(default_factory=Limits)
    media: MediaConfig = field(default_factory=MediaConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    @classmethod
    def from_mapping(cls, data: Any, *, base: Path = Path(".")) -> tuple[ServerConfig, list[str]]:
        """Built from the YAML ``server`` section (null: the defaults), with the options it has
        that are unknown here (typos: the caller warns). A wrong value raises
        config_check.OptionErrors naming it. Relative paths are relative to ``base``."""
        config, unknown = load_section(cls, data, "server")
        for key in ("certificate", "private_key", "server_key", "data_dir"):
            path = getattr(config, key)
            if path is not None and not path.is_absolute():
                setattr(config, key, base / path)
        if not isinstance(data, dict) or "data_dir" not in data:
            config.data_dir = base
        return config, unknown
