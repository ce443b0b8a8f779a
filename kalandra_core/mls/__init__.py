"""Our MLS (RFC 9420) layer over the pinned ``rfc9420`` package.

``_lib`` is the only module in the project that imports ``rfc9420`` (the others take its names
from ``_lib``; an import-linter contract in pyproject.toml keeps it so). It checks that the
installed release is the audited 1.3.0 and corrects its receive-side defects; ``corrections``
fixes its send side; ``server_view`` reads what a server may from MLS messages; ``group`` is
the API the server, client and bridge use (create, add, join, remove, self-update, external
join, process, exporter, roster, state); ``keypackage`` builds and reads KeyPackages;
``conformance`` runs the official MLS interop test vectors through this layer; ``fastpaths``
removes the library's quadratic costs in large groups (installed here, on first import).
"""

from . import fastpaths as _fastpaths

_fastpaths.apply()
