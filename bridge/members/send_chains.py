"""Send-chain floors: after a start, the bot's room state may be older than the bridge's last
sends in that room (bot_state.py saves a room's snapshot only once everything routed before it
is bridged), so its sender-key send chains can stand at generations already used. Before the
first send in each (room, epoch) after a start, every chain the bridge sent on in that epoch
is moved past the highest generation recorded for it (db/outgoing.py), once per process. Each
encryption checks the epoch it is about to use: a start can restore a snapshot from an epoch
before the last commit, and the first send that meets STALE_EPOCH is encrypted again in the newer
epoch, whose chains the bridge may also have used before the crash. (The bot's own messages,
encrypted by its client core, are covered there: kalandra_core/client/send_marks.py.)
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from kalandra_core.crypto import SenderKeyError

from ..db import OutgoingTable

if TYPE_CHECKING:
    from ..context import BridgeContext

log = logging.getLogger("kalandra.bridge.keys")


async def ensure_send_floors(bridge: BridgeContext, room_id: bytes) -> None:
    """Move the room's send chains past the generations recorded for its current epoch, once.
    Call it right before encrypting (no await in between): it returns only when the floors of
    the epoch the room is in *now* are applied, so a send re-encrypted after a stale epoch gets
    the floors of the new epoch too."""
    while True:
        epoch = bridge.bot.core.rooms[room_id].keys.epoch
        applied = bridge.run_state.floors_applied
        if (room_id, epoch) in applied:
            return
        marks = await OutgoingTable(bridge.db).marks(room_id, epoch)
        room = bridge.bot.core.rooms[room_id]
        if room.keys.epoch != epoch:
            continue  # the room moved on while we read: the floors of its new epoch
        for mark in marks:
            try:
                before = room.keys.send_generation(mark.leaf)
                room.keys.skip_send_to(mark.leaf, mark.generation + 1)
            except SenderKeyError:
                continue  # no such leaf in this epoch any more
            if before <= mark.generation:
                log.info(
                    "room %s: send chain of leaf %d moved past generation %d (restored state)",
                    room_id.hex(),
                    mark.leaf,
                    mark.generation,
                )
        applied.add((room_id, epoch))
        return
