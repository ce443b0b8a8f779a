"""General commands: help (mautrix's), version, ping and whoami."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from mautrix import __version__ as mautrix_version
from mautrix.bridge.commands import SECTION_GENERAL, CommandEvent, command_handler
from mautrix.bridge.commands.meta import help_cmd
from mautrix.types import EventID

from .. import __version__
from ..db.roster import bridged_member

if TYPE_CHECKING:
    from ..context import BridgeContext
    from ..matrix_users import MatrixUser


@command_handler(
    needs_auth=False, help_section=SECTION_GENERAL, help_text="Show the bridge's version."
)
async def version(evt: CommandEvent) -> EventID:
    return await evt.reply(f"Kalandra Bridge {__version__} (mautrix-python {mautrix_version})")


@command_handler(
    needs_auth=False,
    help_section=SECTION_GENERAL,
    help_text="Check that the bridge and its Kalandra server are up.",
)
async def ping(evt: CommandEvent) -> EventID:
    bridge = cast("BridgeContext", evt.bridge)
    level = cast("MatrixUser", evt.sender).level
    server = bridge.kalandra
    if server is None:
        state = "the Kalandra server is not running"
    else:
        ports = [f"{name} port {lst.port}" for name, lst in server.listeners.items()]
        state = f"the Kalandra server is up ({', '.join(ports) or 'no native listeners'})"
    identity = await _identities(evt)
    return await evt.reply(f"Pong: {state}. Your permission level: `{level}`. {identity}")


@command_handler(
    needs_auth=False,
    help_section=SECTION_GENERAL,
    help_text="Show the bridge's Kalandra member id (native members add the bridge to a room"
    " with it) and yours.",
)
async def whoami(evt: CommandEvent) -> EventID:
    level = cast("MatrixUser", evt.sender).level
    identity = await _identities(evt)
    return await evt.reply(f"You are {evt.sender.mxid} (permission level `{level}`). {identity}")


async def _identities(evt: CommandEvent) -> str:
    """The bot's member id (what a native member needs to let the bridge into a room) and the
    asker's own bridged member, if they have one."""
    bridge = cast("BridgeContext", evt.bridge)
    bot = getattr(bridge, "bot", None)
    if bot is None or bot.client is None:
        said = "The bridge's Kalandra member is not running."
    else:
        said = (
            f"The bridge's Kalandra member id is `{bot.member_id}` (native members add it with"
            f" `kalandra invite ROOM bridge` or `kalandra invite ROOM {bot.member_id}`)."
        )
    mine = await bridged_member(bridge.db, evt.sender.mxid)
    if mine is None:
        return f"{said} You have no Kalandra member (users get one on joining a portal)."
    return f"{said} Your Kalandra member id is `{mine}`."


__all__ = ["help_cmd", "ping", "version", "whoami"]
