#!/usr/bin/env bash
# The Matrix tests' Synapse is the one `make run` uses: bridge/devstack/install_synapse.sh.
exec bash "$(dirname "$0")/../../bridge/devstack/install_synapse.sh" "$@"
