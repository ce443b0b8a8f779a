"""Room leases and fencing for :class:`~kalandra_core.storage.sql.SqlStore` (PostgreSQL).

Expiry is judged by the database's clock (``now()``) only, so the nodes' clocks never matter.
The fencing token of a room grows by one at every acquisition and its row is never deleted, so
a token, once superseded, can never become valid again. :func:`check_fence` runs inside the
transaction of every sequencer write and holds the lease row's lock until that transaction
ends: an acquisition by another node waits for the write to commit (and then sees it when it
loads the room), or the write sees the new token and stores nothing.

A lease is handed over to another live node (rebalancing) in one statement that also raises
the token, so the giver's writes are fenced from then on and the taker needs no lease term.
``cluster_nodes`` says which nodes are alive (for rebalancing).

Also the cluster's record of its bridge's bot (``cluster_bridge``), which every process names
to its clients.
"""

from __future__ import annotations

from typing import Final

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from . import schema as db
from .base import Fenced, LeaseGrant

_ACQUIRE: Final = sa.text(
    """
    INSERT INTO room_leases AS l (room_id, owner, token, expires_at)
    VALUES (:room_id, :node, 1, now() + make_interval(secs => :seconds))
    ON CONFLICT (room_id) DO UPDATE
        SET owner = excluded.owner, token = l.token + 1, expires_at = excluded.expires_at
        WHERE l.expires_at <= now() OR l.owner = excluded.owner
    RETURNING l.token
    """
)

_RENEW: Final = sa.text(
    """
    UPDATE room_leases AS l SET expires_at = now() + make_interval(secs => :seconds)
    FROM unnest(CAST(:rooms AS bytea[]), CAST(:tokens AS bigint[])) AS h(room_id, token)
    WHERE l.room_id = h.room_id AND l.token = h.token AND l.owner = :node
    RETURNING l.room_id
    """
)

_HAND_OVER: Final = sa.text(
    """
    UPDATE room_leases AS l
        SET owner = :to, token = l.token + 1,
            expires_at = now() + make_interval(secs => :seconds)
    WHERE l.room_id = :room_id AND l.owner = :node AND l.token = :token AND l.expires_at > now()
        AND EXISTS (SELECT 1 FROM cluster_nodes AS n WHERE n.node = :to AND n.expires_at > now())
    RETURNING l.token
    """
)

_ALIVE: Final = sa.text(
    """
    INSERT INTO cluster_nodes AS n (node, expires_at)
    VALUES (:node, now() + make_interval(secs => :seconds))
    ON CONFLICT (node) DO UPDATE SET expires_at = excluded.expires_at
    """
)

_LIVE_NODES: Final = sa.text(
    """
    SELECT n.node, count(l.room_id) AS rooms
    FROM cluster_nodes AS n
    LEFT JOIN room_leases AS l ON l.owner = n.node AND l.expires_at > now()
    WHERE n.expires_at > now()
    GROUP BY n.node
    """
)


async def acquire(conn: AsyncConnection, room_id: bytes, node: str, seconds: float) -> LeaseGrant:
    params = {"room_id": room_id, "node": node, "seconds": float(seconds)}
    token = await conn.scalar(_ACQUIRE, params)
    if token is not None:
        return LeaseGrant(int(token), node)
    owner = await conn.scalar(
        sa.select(db.room_leases.c.owner).where(db.room_leases.c.room_id == room_id)
    )
    return LeaseGrant(None, str(owner))


async def renew(
    conn: AsyncConnection, node: str, held: dict[bytes, int], seconds: float
) -> list[bytes]:
    if not held:
        return []
    rooms = list(held)
    params = {
        "rooms": rooms,
        "tokens": [held[r] for r in rooms],
        "node": node,
        "seconds": float(seconds),
    }
    kept = {bytes(row.room_id) for row in await conn.execute(_RENEW, params)}
    return [r for r in rooms if r not in kept]


async def release(conn: AsyncConnection, room_id: bytes, node: str, token: int) -> None:
    leases = db.room_leases
    await conn.execute(
        leases.update()
        .where(leases.c.room_id == room_id, leases.c.owner == node, leases.c.token == token)
        .values(expires_at=sa.func.now() - sa.text("interval '1 second'"))
    )


async def hand_over(
    conn: AsyncConnection, room_id: bytes, node: str, token: int, to: str, seconds: float
) -> bool:
    params = {
        "room_id": room_id,
        "node": node,
        "token": token,
        "to": to,
        "seconds": float(seconds),
    }
    return await conn.scalar(_HAND_OVER, params) is not None


async def alive(conn: AsyncConnection, node: str, seconds: float) -> dict[str, int]:
    await conn.execute(_ALIVE, {"node": node, "seconds": float(seconds)})
    rows = await conn.execute(_LIVE_NODES)
    return {str(row.node): int(row.rooms) for row in rows}


async def leases_of(conn: AsyncConnection, node: str) -> list[bytes]:
    leases = db.room_leases
    rows = await conn.execute(
        sa.select(leases.c.room_id).where(
            leases.c.owner == node, leases.c.expires_at > sa.func.now()
        )
    )
    return [bytes(row.room_id) for row in rows]


async def owner(conn: AsyncConnection, room_id: bytes) -> str | None:
    leases = db.room_leases
    found = await conn.scalar(
        sa.select(leases.c.owner).where(
            leases.c.room_id == room_id, leases.c.expires_at > sa.func.now()
        )
    )
    return None if found is None else str(found)


async def check_fence(conn: AsyncConnection, room_id: bytes, token: int) -> None:
    """Raise Fenced unless ``token`` is the room's lease token; the row stays locked until the
    caller's transaction ends."""
    leases = db.room_leases
    current = await conn.scalar(
        sa.select(leases.c.token).where(leases.c.room_id == room_id).with_for_update()
    )
    if current is None or int(current) != token:
        raise Fenced(room_id, token, None if current is None else int(current))


async def record_bridge_bot(conn: AsyncConnection, member_id: int, mxid: str) -> None:
    # Delete and insert in one transaction: the same on both engines.
    bridge = db.cluster_bridge
    await conn.execute(bridge.delete().where(bridge.c.slot == 1))
    await conn.execute(bridge.insert().values(slot=1, member_id=member_id, mxid=mxid))


async def bridge_bot(conn: AsyncConnection) -> tuple[int, str] | None:
    bridge = db.cluster_bridge
    row = (
        await conn.execute(sa.select(bridge.c.member_id, bridge.c.mxid).where(bridge.c.slot == 1))
    ).first()
    return None if row is None else (int(row.member_id), str(row.mxid))


async def forget_bridge_bot(conn: AsyncConnection) -> bool:
    bridge = db.cluster_bridge
    result = await conn.execute(bridge.delete().where(bridge.c.slot == 1))
    return bool(result.rowcount)
