"""The throwaway Synapse the Matrix tests start: bridge/devstack/synapse.py (also `make run`'s)."""

from bridge.devstack.synapse import (
    REGISTRATION_SHARED_SECRET,
    SERVER_NAME,
    SYNAPSE_PYTHON,
    SYNAPSE_VERSION,
    Synapse,
    SynapseError,
    free_port,
    homeserver_config,
    start_synapse,
    write_registration,
)

__all__ = [
    "REGISTRATION_SHARED_SECRET",
    "SERVER_NAME",
    "SYNAPSE_PYTHON",
    "SYNAPSE_VERSION",
    "Synapse",
    "SynapseError",
    "free_port",
    "homeserver_config",
    "start_synapse",
    "write_registration",
]
