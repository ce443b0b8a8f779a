"""Matrix appservice bridge for Kalandra rooms (mautrix-python).

``python -m bridge -c config.yaml`` runs the appservice and the embedded Kalandra homeserver in
one process; ``python -m bridge -g -c config.yaml -r registration.yaml`` writes the Synapse
registration.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kalandra-bridge")
except PackageNotFoundError:  # a source tree that was not installed
    __version__ = "0.0.0+unknown"
