"""Send-chain floors: after a start, the bot's room state may be older than the bridge's last
sends in that room (bot_state.py saves a room's snapshot only once everything routed before it
is bridged), so its sender-key send chains can stand at generations already used. Before the
first send in a room after a start, every chain the bridge sent on in the current epoch is
moved past the highest generation recorded for it (db/outgoing.py), once per room per process.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from kalandra_core.crypto import SenderKeyError

from .db import OutgoingTable, SendMark

if TYPE_CHECKING:
    from .bridge import KalandraBridge

log = logging.getLogger("kalandra.bridge.keys")

_applied: set[tuple[bytes, int]] = set()  # (room, epoch) whose floors are applied


async def ensure_send_floors(bridge: KalandraBridge, room_id: bytes) -> None:
    room = bridge.bot.core.rooms[room_id]
    epoch = room.keys.epoch
    if (room_id, epoch) in _applied:
        return
    for mark in await OutgoingTable(bridge.db).marks(room_id, epoch):
        room = bridge.bot.core.rooms[room_id]
        if room.keys.epoch != mark.epoch:
            return  # the room moved on meanwhile: new chains, nothing used in them yet
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
    _applied.add((room_id, epoch))


async def mark_bot_send(bridge: KalandraBridge, room_id: bytes) -> None:
    """Before the bot's own client sends in the room: record the generation it will use."""
    await ensure_send_floors(bridge, room_id)
    room = bridge.bot.core.rooms[room_id]
    leaf = room.keys.own_index
    mark = SendMark(room.keys.epoch, leaf, room.keys.send_generation(leaf))
    await OutgoingTable(bridge.db).mark(room_id, mark)
