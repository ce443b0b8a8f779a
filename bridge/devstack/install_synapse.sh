#!/usr/bin/env bash
# Install the throwaway local Synapse (bridge/devstack/synapse.py; `make run` and the Matrix tests
# start it) into a virtualenv of its own, .venv-synapse/ at the repository root. Idempotent: does
# nothing when the pinned version is already importable there.
set -euo pipefail
cd "$(dirname "$0")/../.."

SYNAPSE_VERSION=1.163.2
VENV=.venv-synapse
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}

installed() {
  "$VENV/bin/python" - "$SYNAPSE_VERSION" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version

import synapse  # noqa: F401

sys.exit(version("matrix-synapse") != sys.argv[1])
PY
}

[ -x "$VENV/bin/python" ] && installed && exit 0

echo "Installing matrix-synapse==$SYNAPSE_VERSION into $VENV/" >&2
start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "matrix-synapse==$SYNAPSE_VERSION"
installed || { echo "matrix-synapse $SYNAPSE_VERSION is not importable in $VENV/" >&2; exit 1; }
echo "Synapse installed in $(( $(date +%s) - start )) s" >&2
