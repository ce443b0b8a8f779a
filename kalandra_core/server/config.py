"""Server settings (the ``server`` section of the config file) with production defaults."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..proto import MAX_PAYLOAD_SIZE


@dataclass(slots=True)
class Limits:
    max_connections: int = 10_000
    max_payload_size: int = MAX_PAYLOAD_SIZE
    rate_per_second: float = 200.0  # frames per session, sustained
    rate_burst: int = 400
    send_buffer: int = 8 * 1024 * 1024  # bytes queued per connection before it is dropped
    handshake_timeout: float = 30.0
    idle_timeout: float = 120.0
    batch_max: int = 256  # frames per storage transaction
    sync_max: int = 500  # frames per SyncResponse
    max_clock_skew_ms: int = 5 * 60 * 1000  # HLC stamps this far in the future are refused
    # KeyPackage fetches per requesting member (all its sessions): sustained rate and burst.
    key_package_fetch_per_second: float = 0.5
    key_package_fetch_burst: int = 50


@dataclass(slots=True)
class MediaConfig:
    """``server.media``: the largest file (plaintext bytes) a client may upload."""

    max_size: int = 100 * 1024 * 1024


@dataclass(slots=True)
class ServerConfig:
    database: str = "sqlite:///kalandra.db"
    tcp_host: str = "127.0.0.1"
    tcp_port: int | None = 4434  # None: TCP off
    quic_host: str = "127.0.0.1"
    quic_port: int | None = 4433  # None: QUIC off
    certificate: Path | None = None  # PEM; None: self-signed, created next to the database
    private_key: Path | None = None
    server_key: Path | None = None  # Ed25519 seed file; created when missing
    data_dir: Path = Path(".")
    limits: Limits = field(default_factory=Limits)
    media: MediaConfig = field(default_factory=MediaConfig)

    @classmethod
    def from_mapping(cls, data: dict[str, Any], *, base: Path = Path(".")) -> ServerConfig:
        """Build from the YAML ``server`` section; unknown keys are an error (typos)."""
        data = dict(data)
        limits = Limits(**_known(Limits, data.pop("limits", {}) or {}, "server.limits"))
        media = MediaConfig(**_known(MediaConfig, data.pop("media", {}) or {}, "server.media"))
        known = _known(cls, data, "server")
        for key in ("certificate", "private_key", "server_key", "data_dir"):
            if known.get(key) is not None:
                path = Path(known[key])
                known[key] = path if path.is_absolute() else base / path
        config = cls(**known, limits=limits, media=media)
        if "data_dir" not in known:
            config.data_dir = base
        return config


def _known(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    names = {f.name for f in fields(cls)} - {"limits", "media"}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {', '.join(sorted(unknown))}")
    return dict(data)
