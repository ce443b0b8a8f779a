"""A PostgreSQL server of one test's own (initdb in a temporary directory, its own port), for
tests that stop and start their database: stopping the shared server on 5432 would break
whatever else uses it at the time."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from matrix.synapse import free_port


def _bin(name: str) -> str:
    versions = sorted(
        Path("/usr/lib/postgresql").iterdir(), key=lambda p: [*map(int, p.name.split("."))]
    )
    return str(versions[-1] / "bin" / name)


def _as_postgres(*args: str) -> subprocess.CompletedProcess[bytes]:
    # initdb and the server refuse to run as root.
    command = ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else [*args]
    return subprocess.run(command, check=True, capture_output=True, timeout=120)


@dataclass
class PrivatePostgres:
    data: Path
    port: int

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        _as_postgres(
            _bin("pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.data / "server.log"),
            "-o",
            f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1",
            "-w",
            "start",
        )

    def stop(self) -> None:
        """Stop at once (``-m fast``: connections are cut, as in a crash of the server)."""
        _as_postgres(_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """A running server, removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="kalandra-pg-"))
    try:
        if os.geteuid() == 0:
            shutil.chown(root, "postgres", "postgres")
        data = root / "data"
        _as_postgres(
            _bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"
        )
        server = PrivatePostgres(data, free_port())
        server.start()
        try:
            yield server
        finally:
            if server.running():
                server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
