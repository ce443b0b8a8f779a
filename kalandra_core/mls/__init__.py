"""Our MLS (RFC 9420) layer over the pinned ``rfc9420`` package.

This package is the only place in the project that imports ``rfc9420``. ``_lib`` checks that the
installed release is the audited 1.3.0 and corrects its receive-side defects; ``corrections``
fixes its send side; ``group`` is the API the server, client and bridge use (create, add, join,
remove, self-update, external join, process, exporter, roster, state); ``keypackage`` builds and
reads KeyPackages; ``conformance`` runs the official MLS interop test vectors through this layer.
"""
