"""Who may erase a bridged message from Matrix: its own sender, or someone whose power level
in the portal reaches the room's ``redact`` level.

Synapse's acceptance proves nothing here: in room versions 3 and later it stores a redaction
that arrives over federation whatever its sender's power (the event is only hidden once the
redaction checks out), and hands it to appservices as it is. So the bridge reads the redacted
event's sender and the portal's current power levels itself before anything goes to Kalandra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mautrix.api import Method, Path
from mautrix.errors import MNotFound
from mautrix.types import (
    EventID,
    EventType,
    MessageStatusReason,
    PowerLevelStateEventContent,
    RoomID,
    UserID,
)

from .statuses import Refused

if TYPE_CHECKING:
    from ..context import BridgeContext


async def check_redaction(
    bridge: BridgeContext, room: RoomID, sender: UserID, redacts: EventID
) -> None:
    """Raise Refused unless ``sender`` may redact ``redacts`` in ``room`` (read now, from
    Synapse: the bot's cached power levels could be older than a demotion)."""
    api = bridge.az.intent.api
    try:
        original = await api.request(Method.GET, Path.v3.rooms[room].event[redacts])
    except MNotFound:
        raise Refused(
            MessageStatusReason.GENERIC_ERROR, "the redacted event is unknown to the bridge."
        ) from None
    if original.get("sender") == sender:
        return  # one's own message
    try:
        raw = await api.request(
            Method.GET, Path.v3.rooms[room].state[str(EventType.ROOM_POWER_LEVELS)]
        )
        levels = PowerLevelStateEventContent.deserialize(raw)
    except MNotFound:
        levels = PowerLevelStateEventContent()
    if levels.get_user_level(sender) >= levels.redact:
        return
    raise Refused(
        MessageStatusReason.NO_PERMISSION,
        "a redaction of someone else's message needs the power level to redact"
        f" ({levels.redact}) in this room; it was not carried to Kalandra.",
    )
