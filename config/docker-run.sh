#!/bin/sh
# The container's entrypoint, in the mautrix convention:
#   no config        -> copy the example (with container listen addresses) to $DATA and exit,
#                       telling the admin what to edit;
#   no registration  -> write it (python -m bridge -g) and exit, telling where it goes;
#   otherwise        -> run the bridge (appservice + embedded Kalandra homeserver).
# Any arguments replace the default command (e.g. `kalandra admin create-user alice -c ...`).
set -eu
DATA=${KALANDRA_DATA:-/data}
PYTHON=${PYTHON:-python}
EXAMPLE=${KALANDRA_EXAMPLE_CONFIG:-/opt/kalandra/example-config.yaml}
CONFIG="$DATA/config.yaml"
REGISTRATION="$DATA/registration.yaml"

if [ "$#" -gt 0 ]; then
    exec "$@"
fi
cd "$DATA"

if [ ! -f "$CONFIG" ]; then
    "$PYTHON" - "$EXAMPLE" "$CONFIG" <<'PY'
import sys

from ruamel.yaml import YAML

yaml = YAML()
with open(sys.argv[1], encoding="utf-8") as fh:
    config = yaml.load(fh)
# Inside a container the listeners face the container's network, not its loopback.
config["server"]["tcp_host"] = "0.0.0.0"
config["server"]["quic_host"] = "0.0.0.0"
config["appservice"]["hostname"] = "0.0.0.0"
with open(sys.argv[2], "w", encoding="utf-8") as fh:
    yaml.dump(config, fh)
PY
    echo "No config found: wrote $CONFIG from the example."
    echo "Set homeserver.address, homeserver.domain, appservice.address and"
    echo "bridge.permissions in it, then start the container again to write the registration."
    exit 0
fi

if [ ! -f "$REGISTRATION" ]; then
    "$PYTHON" -m bridge -g -c "$CONFIG" -r "$REGISTRATION"
    echo "Wrote $REGISTRATION: add it to your homeserver's app_service_config_files"
    echo "(Synapse), restart the homeserver, then start this container again."
    exit 0
fi

exec "$PYTHON" -m bridge -c "$CONFIG"
