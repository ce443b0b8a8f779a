#!/usr/bin/env bash
# Install the js test client's packages (tests/jsclient/package-lock.json, exact versions) into
# tests/jsclient/node_modules with `npm ci`. Idempotent: does nothing when node_modules was
# installed from the same lock file. Needs Node 20 or newer and npm.
set -euo pipefail
cd "$(dirname "$0")"

command -v node >/dev/null && command -v npm >/dev/null \
  || { echo "Node.js 20+ and npm are needed for tests/jsclient (not found)" >&2; exit 1; }
major=$(node -p 'process.versions.node.split(".")[0]')
[ "$major" -ge 20 ] || { echo "Node.js 20+ is needed for tests/jsclient (found $(node --version))" >&2; exit 1; }

STAMP=node_modules/.kalandra-lock.sha256
want=$(sha256sum package-lock.json | cut -d' ' -f1)
[ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && exit 0

echo "Installing the js test client's packages into tests/jsclient/node_modules/" >&2
start=$(date +%s)
# matrix-js-sdk asks for Node 22 (engines); it runs on 20 (client.mjs fills the gap): no warning.
npm ci --no-audit --no-fund --loglevel=error --engine-strict=false
echo "$want" > "$STAMP"
echo "js test client installed in $(( $(date +%s) - start )) s" >&2
