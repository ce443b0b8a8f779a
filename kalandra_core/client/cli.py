"""The native user's commands: ``kalandra login``, ``create-room``, ``send``, ``tail``, ...

Every command opens the local state (``--state``, default ``~/.local/share/kalandra/client.db``,
or ``$KALANDRA_STATE``), connects, catches up every room from its last applied log index, does
its work, saves and disconnects. Rooms are named by their id in hex (a unique prefix will do).
Errors print one line and exit non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import mimetypes
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from nacl.signing import SigningKey

from ..media.blob import KINDS as MEDIA_KINDS
from ..media.blob import MediaError, MediaRef
from . import events as ev
from .bridge_invite import invite_content
from .content import Content
from .core import ClientCore
from .driver import Client, ClientError, ServerAddress, addresses_text
from .events import Message
from .extras import ExtendedCore, react
from .profile import Profile, with_profile
from .room_meta import InvalidRoomMeta, RoomMeta, check_avatar, meta_content
from .state import ClientState
from .timeline import Entry, Timeline

DEFAULT_STATE = Path.home() / ".local" / "share" / "kalandra" / "client.db"
# `tail` reconnects by itself; someone is watching, so it tries again at least this often.
TAIL_RECONNECT_MAX_DELAY = 5.0


class UsageError(Exception):
    pass


def _state_path(args: argparse.Namespace) -> Path:
    if args.state:
        return Path(args.state)
    env = os.environ.get("KALANDRA_STATE")
    return Path(env) if env else DEFAULT_STATE


def _ca(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def _ansi(args: argparse.Namespace) -> bool:
    if args.color == "auto":
        return sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    return bool(args.color == "always")


def _print(lines: list[str]) -> None:
    for line in lines:
        print(line, flush=True)


async def _login(args: argparse.Namespace) -> int:
    state = ClientState(_state_path(args))
    try:
        addresses = ServerAddress.parse_many(args.server)
        signing_key = bytes(SigningKey.generate())
        # The member id comes from the server (HelloReply) the first time the token is used.
        core = ClientCore(0, signing_key)
        credential = args.code or args.token
        client = Client(core, addresses, credential, ca_certificate=_ca(args.ca), reconnect=False)
        await client.connect()
        if core.member_id == 0:
            raise UsageError("the server did not say which member this token belongs to")
        if args.code and client.token == credential:
            raise UsageError("the server did not exchange the login code for a device token")
        state.save_identity(
            server=addresses_text(addresses),
            token=client.token,
            member_id=core.member_id,
            signing_key=signing_key,
            ca=_ca(args.ca),
        )
        client.state = state
        count = await client.publish_key_packages(args.key_packages)
        await client.close()
        print(f"logged in as member {core.member_id}; {count} KeyPackages published")
        return 0
    finally:
        state.close()


async def _with_client(args: argparse.Namespace, work: Callable[[Client], Awaitable[int]]) -> int:
    state = ClientState(_state_path(args))
    try:
        identity = state.load_identity()
        if identity is None:
            raise UsageError("not logged in: run `kalandra login --server URL --code C` first")
        # It also reports reactions, which the history shows.
        core = ExtendedCore(identity.member_id, identity.signing_key)
        state.load_into(core)
        client = Client(
            core,
            ServerAddress.parse_many(identity.server),
            identity.token,
            state=state,
            ca_certificate=identity.ca,
            # Only `tail` outlives a connection; other commands fail at once when it drops.
            reconnect=args.client_command == "tail",
            reconnect_max_delay=TAIL_RECONNECT_MAX_DELAY,
        )
        await client.connect()
        await client.settle()
        _drain(client, state)
        try:
            return await work(client)
        finally:
            _drain(client, state)
            await client.close()
    finally:
        state.close()


def _drain(
    client: Client, state: ClientState, got: list[Message | ev.Event] | None = None
) -> tuple[list[Entry], list[ev.Event]]:
    """Keep what arrived (``got``, then the client's queues): the history's entries (messages,
    reactions, redactions, room changes), stored and in log order, and the other events."""
    items = list(got or [])
    while not client.messages.empty():
        items.append(client.messages.get_nowait())
    while not client.events.empty():
        items.append(client.events.get_nowait())
    entries: list[Entry] = []
    others: list[ev.Event] = []
    for item in items:
        entry = _entry(item)
        if entry is None:
            others.append(item)
            continue
        if isinstance(entry, Message):
            state.store_message(entry)
        else:
            state.store_event(entry)
        entries.append(entry)
    entries.sort(key=lambda e: e.log_index)
    return entries, others


async def _next(client: Client) -> list[Message | ev.Event]:
    """What comes next on either of the client's queues (waits for one)."""
    waits: list[asyncio.Future[Message | ev.Event]] = [
        asyncio.ensure_future(client.messages.get()),
        asyncio.ensure_future(client.events.get()),
    ]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            if not wait.done():
                wait.cancel()  # (a cancelled get leaves its item in the queue)
    return [wait.result() for wait in waits if wait.done() and not wait.cancelled()]


def _entry(event: Message | ev.Event) -> Entry | None:
    """The history entry an event makes (None: it makes none)."""
    if isinstance(event, Message | ev.Reacted):
        return event
    if isinstance(event, ev.Moderated):
        return event if event.action == "redact" else None
    if isinstance(event, ev.RoomMetaChanged):
        # The core applied the change and dropped the message; the history keeps what it said.
        try:
            content = meta_content(
                RoomMeta(
                    name=event.name if "name" in event.changed else None,
                    topic=event.topic if "topic" in event.changed else None,
                    avatar=event.avatar if "avatar" in event.changed else None,
                    remove_avatar="avatar" in event.changed and event.avatar is None,
                )
            )
        except InvalidRoomMeta:
            return None
        stamp = event.timestamp_ms
        return Message(event.room_id, event.sender_id, event.log_index, stamp, content)
    return None


def _report_connection(client: Client, event: ev.Event) -> None:
    """One line on stderr for each connection loss and failed reconnect, and one when back
    (the messages sent meanwhile follow, from the catch-up)."""
    if isinstance(event, ev.Disconnected):
        state = "disconnected from" if event.attempt == 0 else "still disconnected from"
        retry = "" if event.retry_in is None else f"; reconnecting in {event.retry_in:.1f} s"
        print(
            f"kalandra: {state} {client.address} ({event.reason}){retry}",
            file=sys.stderr,
            flush=True,
        )
    elif isinstance(event, ev.Reconnected):
        print(f"kalandra: reconnected to {client.address}", file=sys.stderr, flush=True)


def _room(client: Client, prefix: str) -> bytes:
    matches = [
        r for r, room in client.core.rooms.items() if room.active and r.hex().startswith(prefix)
    ]
    if not matches:
        raise UsageError(f"no room {prefix!r} (see `kalandra rooms`)")
    if len(matches) > 1:
        raise UsageError(f"room prefix {prefix!r} is ambiguous")
    return matches[0]


def _media_kind(mimetype: str) -> str:
    major = mimetype.split("/", 1)[0]
    return major if major in ("image", "audio", "video") else "file"


async def _download(client: Client, room_id: bytes, log_index: int, path: Path) -> None:
    """Write the file of the message at ``log_index`` to ``path`` (nothing is left at
    ``path`` when the download fails its checks)."""
    history = client.state.history(room_id, 1 << 30) if client.state else []
    found = [m for m in history if m.log_index == log_index]
    if not found or found[0].content.media is None:
        raise UsageError(f"no file at log index {log_index} (see `kalandra history`)")
    ref = found[0].content.media
    partial = path.with_name(path.name + ".part")
    try:
        with open(partial, "wb") as out:  # noqa: ASYNC230 (a local file, block by block)
            async for block in client.stream_media(room_id, ref):
                out.write(block)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    print(f"saved {ref.name or 'file'} ({ref.size} bytes, {ref.mimetype}) to {path}")


async def _upload_avatar(client: Client, room_id: bytes, path: Path) -> MediaRef:
    """The image at ``path`` stored in the room, checked as an avatar before any upload."""
    mimetype = mimetypes.guess_type(path.name)[0] or ""
    with open(path, "rb") as source:  # noqa: ASYNC230 (read block by block)
        size = source.seek(0, 2)
        source.seek(0)
        check_avatar(MediaRef(bytes(32), bytes(32), size, mimetype, path.name, "image"))
        return await client.upload_media(
            room_id, source, mimetype=mimetype, name=path.name, kind="image"
        )


def _timeline(client: Client, room_id: bytes, *, ansi: bool = False) -> Timeline:
    timeline = Timeline(ansi=ansi)
    for entry in client.state.entries(room_id) if client.state else []:
        timeline.add(entry)
    return timeline


async def _follow(client: Client, room_id: bytes, timeline: Timeline) -> None:
    """`tail`: each new entry of the room as it arrives (with connection reports on stderr)."""
    assert client.state is not None
    while True:
        entries, others = _drain(client, client.state, await _next(client))
        for event in others:
            _report_connection(client, event)
        for entry in entries:
            if entry.room_id == room_id:
                _print(timeline.add(entry))


def _text_content(
    client: Client,
    args: argparse.Namespace,
    *,
    reply_to: int | None = None,
    edit_of: int | None = None,
) -> Content:
    """The message of `send`, `reply` or `edit`, with our display name (if one is set)."""
    text = " ".join(args.text)
    formatted = None
    if args.markdown:
        from .markdown import render  # (markdown-it-py loaded only for --markdown)

        text, formatted = render(text)
    content = Content(body=text, formatted_body=formatted, reply_to=reply_to, edit_of=edit_of)
    name = client.state.load_displayname() if client.state else None
    return with_profile(content, Profile(displayname=name) if name else None)


def _message_at(client: Client, room_id: bytes, log_index: int) -> Message:
    entries = client.state.entries(room_id) if client.state else []
    found = [e for e in entries if isinstance(e, Message) and e.log_index == log_index]
    if not found:
        raise UsageError(f"no message at log index {log_index} (see `kalandra history`)")
    return found[0]


async def _send_command(client: Client, args: argparse.Namespace) -> None:
    """send, reply, edit, react, unreact, set-displayname."""
    command = args.client_command
    if command == "set-displayname":
        name = " ".join(args.name).strip() if args.name else None
        assert client.state is not None
        client.state.save_displayname(name or None)
        print(f"display name {name!r}; sent with your messages" if name else "display name off")
        return
    room_id = _room(client, args.room)
    if command == "send":
        index = await client.send(room_id, _text_content(client, args))
        print(f"sent at log index {index}")
        return
    target = int(args.log_index)
    message = _message_at(client, room_id, target)
    if command == "reply":
        index = await client.send(room_id, _text_content(client, args, reply_to=target))
        print(f"replied at log index {index}")
    elif command == "edit":
        if message.sender_id != client.core.member_id:
            raise UsageError(f"the message at log index {target} is not yours")
        if message.content.edit_of is not None:
            target = message.content.edit_of  # (an edit always names the original)
        index = await client.send(room_id, _text_content(client, args, edit_of=target))
        print(f"edited at log index {index}")
    else:
        index = await react(client, room_id, target, args.key, add=command == "react")
        print(f"{'reacted' if command == 'react' else 'reaction taken back'} at log index {index}")


BRIDGE = "bridge"  # `kalandra invite ROOM bridge`: the server's embedded Matrix bridge


def _invitees(core: ClientCore, names: list[str]) -> tuple[list[int], list[str]]:
    """(member ids to add, Matrix users to invite through the bridge). ``bridge`` and the
    bridge bot's own Matrix id are the bridge's member, as the server names it in HelloReply
    (the server is the account directory: it names every member id anyway)."""
    members: list[int] = []
    matrix: list[str] = []
    for name in names:
        if name == BRIDGE or (name.startswith("@") and name == core.bridge_mxid):
            if core.bridge_member_id is None:
                raise UsageError("this server runs no Matrix bridge (it names no bridge member)")
            members.append(core.bridge_member_id)
        elif name.startswith("@"):
            matrix.append(name)
        elif name.isdigit():
            members.append(int(name))
        else:
            raise UsageError(f"{name!r} is not a member id, `bridge` or a Matrix user id")
    return members, matrix


def _commands(args: argparse.Namespace) -> Callable[[Client], Awaitable[int]]:
    command = args.client_command

    async def run(client: Client) -> int:
        if command == "create-room":
            room_id = await client.create_room(name=args.name or "", topic=args.topic or "")
            print(room_id.hex())
        elif command == "rooms":
            for room_id, room in sorted(client.core.rooms.items()):
                if room.active:
                    name = f"  {room.name}" if room.name else ""
                    print(
                        f"{room_id.hex()}  epoch {room.epoch}  {len(room.roster())} members{name}"
                    )
        elif command == "publish-key-packages":
            print(f"{await client.publish_key_packages(args.count)} KeyPackages on the server")
        elif command == "invite":
            room_id = _room(client, args.room)
            members, matrix = _invitees(client.core, args.members)
            if members:
                index = await client.invite(room_id, members)
                print(f"added at log index {index}; epoch {client.core.rooms[room_id].epoch}")
            for mxid in matrix:  # asks the room's bridge, in an encrypted message (see module)
                index = await client.send(room_id, invite_content(mxid))
                print(f"invited {mxid} through the bridge at log index {index}")
        elif command == "join":
            await asyncio.sleep(args.wait)  # Welcomes from the mailbox arrive after Hello
            await client.settle()
            joined = [r for r in client.core.rooms if client.core.rooms[r].active]
            for room_id in joined:
                print(f"{room_id.hex()}  epoch {client.core.rooms[room_id].epoch}")
        elif command in ("send", "reply", "edit", "react", "unreact", "set-displayname"):
            await _send_command(client, args)
        elif command in ("set-name", "set-topic"):
            room_id = _room(client, args.room)
            text = " ".join(args.text)
            meta = RoomMeta(name=text) if command == "set-name" else RoomMeta(topic=text)
            index = await client.send(room_id, meta_content(meta))
            print(f"{command.removeprefix('set-')} changed at log index {index}")
        elif command in ("set-avatar", "remove-avatar"):
            room_id = _room(client, args.room)
            meta = RoomMeta(remove_avatar=True)
            if command == "set-avatar":
                meta = RoomMeta(avatar=await _upload_avatar(client, room_id, Path(args.path)))
            index = await client.send(room_id, meta_content(meta))
            print(f"avatar changed at log index {index}")
        elif command == "send-file":
            room_id = _room(client, args.room)
            path = Path(args.path)
            name = args.name or path.name
            mimetype = args.mimetype or mimetypes.guess_type(name)[0] or "application/octet-stream"
            kind = args.kind or _media_kind(mimetype)
            with open(path, "rb") as source:  # noqa: ASYNC230 (read block by block)
                ref = await client.upload_media(
                    room_id, source, mimetype=mimetype, name=name, kind=kind
                )
            index = await client.send(room_id, Content(body=name, kind=kind, media=ref))
            print(f"sent {name} ({ref.size} bytes, {kind}) at log index {index}")
        elif command == "download":
            room_id = _room(client, args.room)
            await _download(client, room_id, int(args.log_index), Path(args.path))
        elif command in ("history", "tail"):
            room_id = _room(client, args.room)
            timeline = _timeline(client, room_id, ansi=_ansi(args))
            _print(timeline.lines(args.limit))
            if command == "tail":
                await _follow(client, room_id, timeline)
        elif command == "epoch":
            room = client.core.rooms[_room(client, args.room)]
            print(f"epoch {room.epoch}")
            print(f"authenticator {room.group.epoch_authenticator.hex()}")
        elif command == "members":
            room = client.core.rooms[_room(client, args.room)]
            names = _timeline(client, room.room_id).profiles
            for member_id, (leaf, _) in sorted(room.roster().items(), key=lambda i: i[1][0]):
                me = "  (you)" if member_id == client.core.member_id else ""
                label = names[member_id].label() if member_id in names else None
                name = f"\t{label}" if label else ""
                print(f"leaf {leaf}\t{member_id}{name}{me}")
        elif command == "leave":
            await client.leave(_room(client, args.room))
            print("leave proposed; a remaining member commits it")
        elif command in ("kick", "ban", "unban"):
            room_id = _room(client, args.room)
            await client.moderate(room_id, command, int(args.member), args.reason or "")
            print(f"{command} sequenced")
        elif command == "redact":
            room_id = _room(client, args.room)
            await client.moderate(room_id, "redact", int(args.log_index), args.reason or "")
            print("redaction sequenced")
        return 0

    return run


def add_client_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def parser(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--state", help="client state file (default ~/.local/share/kalandra/)")
        p.set_defaults(func=main_client, client_command=name)
        return p

    p = parser("login", "bind this device to an account (login code or device token)")
    p.add_argument(
        "--server",
        required=True,
        help="tcp://host:port or quic://host:port; several, comma-separated, for the processes "
        "of a cluster (the next is tried when one fails)",
    )
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--code", help="single-use login code (`kalandra admin issue-code`)")
    given.add_argument("--token", help="device token (`kalandra admin issue-token`)")
    p.add_argument("--ca", help="PEM certificate to trust (self-signed QUIC servers)")
    p.add_argument("--key-packages", type=int, default=5)
    p = parser("create-room", "create a room (you are its owner)")
    p.add_argument("--name")
    p.add_argument("--topic")
    parser("rooms", "list your rooms")
    p = parser("publish-key-packages", "publish KeyPackages so others can add you")
    p.add_argument("--count", type=int, default=5)
    p = parser("invite", "add members to a room, or invite Matrix users through its bridge")
    p.add_argument("room")
    p.add_argument(
        "members",
        nargs="+",
        help="member ids, `bridge` (the server's Matrix bridge), or Matrix user ids"
        " (@user:domain) to let in through the bridge",
    )
    p = parser("join", "accept pending invitations (Welcomes)")
    p.add_argument("--wait", type=float, default=1.0, help="seconds to wait for Welcomes")
    markdown = "the text is Markdown (CommonMark; needs markdown-it-py)"
    p = parser("send", "send a text message")
    p.add_argument("room")
    p.add_argument("text", nargs="+")
    p.add_argument("--markdown", action="store_true", help=markdown)
    for name, text in (("reply", "reply to a message"), ("edit", "edit a message of yours")):
        p = parser(name, text)
        p.add_argument("room")
        p.add_argument("log_index")
        p.add_argument("text", nargs="+")
        p.add_argument("--markdown", action="store_true", help=markdown)
    for name, text in (("react", "react to a message"), ("unreact", "take a reaction back")):
        p = parser(name, text)
        p.add_argument("room")
        p.add_argument("log_index")
        p.add_argument("key", help="the reaction, e.g. an emoji")
    p = parser("set-displayname", "the name others see on your messages (none: stop sending one)")
    p.add_argument("name", nargs="*")
    p = parser("send-file", "send a file (encrypted, in blocks; image/audio/video by type)")
    p.add_argument("room")
    p.add_argument("path")
    p.add_argument("--name", help="file name shown (default: the path's)")
    p.add_argument("--mimetype", help="default: guessed from the name")
    p.add_argument("--kind", choices=sorted(MEDIA_KINDS), help="default: from the mimetype")
    p = parser("download", "save the file a message carries")
    p.add_argument("room")
    p.add_argument("log_index")
    p.add_argument("path")
    for name, text in (("set-name", "rename a room"), ("set-topic", "set a room's topic")):
        p = parser(name, f"{text} (end-to-end encrypted, as members see it)")
        p.add_argument("room")
        p.add_argument("text", nargs="+")
    p = parser("set-avatar", "set a room's avatar from an image file (end-to-end encrypted)")
    p.add_argument("room")
    p.add_argument("path")
    parser("remove-avatar", "remove a room's avatar").add_argument("room")
    for name, text in (("history", "print recent messages"), ("tail", "follow a room")):
        p = parser(name, text)
        p.add_argument("room")
        p.add_argument("--limit", type=int, default=20)
        p.add_argument(
            "--color", choices=("auto", "always", "never"), default="auto", help="bold, links"
        )
    for name, text in (("epoch", "show the room's epoch"), ("members", "list members")):
        parser(name, text).add_argument("room")
    parser("leave", "leave a room").add_argument("room")
    for name in ("kick", "ban", "unban"):
        p = parser(name, f"{name} a member (moderators)")
        p.add_argument("room")
        p.add_argument("member")
        p.add_argument("--reason")
    p = parser("redact", "redact a message (moderators)")
    p.add_argument("room")
    p.add_argument("log_index")
    p.add_argument("--reason")


def main_client(args: argparse.Namespace) -> int:
    try:
        if args.client_command == "login":
            return asyncio.run(_login(args))
        return asyncio.run(_with_client(args, _commands(args)))
    except KeyboardInterrupt:
        return 0
    except (
        UsageError,
        ClientError,
        MediaError,
        TimeoutError,
        ConnectionError,
        OSError,
        ValueError,
    ) as exc:
        message = str(exc) or type(exc).__name__
        raise SystemExit(f"kalandra: error: {message}") from None
