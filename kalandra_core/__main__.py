"""``python -m kalandra_core`` / ``kalandra``: command-line tools of the Kalandra core."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
