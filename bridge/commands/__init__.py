"""Bot commands. Importing a module registers its commands (mautrix's command_handler)."""

from mautrix.bridge.commands.handler import command_aliases, command_handlers

from . import account, bridging, encryption, meta, moderation, portal, relay, room_info
from .handler import REFUSAL, KalandraCommandProcessor

# mautrix registers these on import; they need portals, ghosts, double puppeting or a manhole,
# which this bridge does not have (yet). Ours replace them as they are built.
_NOT_OURS = (
    "clean-rooms",
    "close-manhole",
    "delete-portal",
    "login-matrix",
    "logout-matrix",
    "open-manhole",
    "ping-matrix",
    "remove-avatar",
    "remove-displayname",
    "set-avatar",
    "set-displayname",
    "set-pl",
)
for _name in _NOT_OURS:
    command_handlers.pop(_name, None)
    command_aliases.pop(_name, None)

__all__ = [
    "REFUSAL",
    "KalandraCommandProcessor",
    "account",
    "bridging",
    "encryption",
    "meta",
    "moderation",
    "portal",
    "relay",
    "room_info",
]
