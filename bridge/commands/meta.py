"""General commands: help (mautrix's), version and ping."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from mautrix import __version__ as mautrix_version
from mautrix.bridge.commands import SECTION_GENERAL, CommandEvent, command_handler
from mautrix.bridge.commands.meta import help_cmd
from mautrix.types import EventID

if TYPE_CHECKING:
    from ..bridge import KalandraBridge
    from ..user import User


@command_handler(
    needs_auth=False, help_section=SECTION_GENERAL, help_text="Show the bridge's version."
)
async def version(evt: CommandEvent) -> EventID:
    bridge = cast("KalandraBridge", evt.bridge)
    return await evt.reply(f"Kalandra Bridge {bridge.version} (mautrix-python {mautrix_version})")


@command_handler(
    needs_auth=False,
    help_section=SECTION_GENERAL,
    help_text="Check that the bridge and its Kalandra server are up.",
)
async def ping(evt: CommandEvent) -> EventID:
    bridge = cast("KalandraBridge", evt.bridge)
    level = cast("User", evt.sender).level
    server = bridge.kalandra
    if server is None:
        state = "the Kalandra server is not running"
    else:
        ports = [f"{name} port {lst.port}" for name, lst in server.listeners.items()]
        state = f"the Kalandra server is up ({', '.join(ports) or 'no native listeners'})"
    return await evt.reply(f"Pong: {state}. Your permission level: `{level}`.")


__all__ = ["help_cmd", "ping", "version"]
