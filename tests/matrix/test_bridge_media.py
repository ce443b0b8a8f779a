"""Media across the bridge against a real Synapse, both ways: a Matrix user's image (a real PNG),
1.5 MiB file and sticker reach the native member as encrypted blocks it downloads byte for
byte, with kind, mimetype, name and size; a native member's image, file, audio, sticker, empty
file and video reach the Matrix user as m.image / m.file / m.audio / m.sticker / m.video
uploaded by the member's ghost, with their info, and the Matrix user downloads exactly the bytes
(authenticated media). A file over ``server.media.max_size`` (2 MiB here) gets a failure status
and a notice with the limit, both when the event states its size and when only the download
finds out. A relay user's image goes out through the bot's leaf with the file. In an encrypted
portal the files are Matrix encrypted attachments both ways (the Matrix user's decrypted by the
bridge, the ghost's decrypted by nio), thumbnails included. Native images whose sender gave no
size get w/h from the file, and those over 800x600 a thumbnail.
"""

from __future__ import annotations

import asyncio
import io
import os
import struct
import zlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from nio import (
    AsyncClient,
    MemoryDownloadResponse,
    RoomEncryptedFile,
    RoomEncryptedImage,
    RoomPutStateResponse,
    RoomSendResponse,
    UploadResponse,
)
from nio.crypto.attachments import decrypt_attachment

from kalandra_core.client.content import Content
from kalandra_core.client.driver import Client
from kalandra_core.client.events import Message
from matrix.bridge_stack import (
    DATABASES,
    BridgeStack,
    bot_notices,
    bridge_stack,
    command,
    ghost_of,
    messages_from_others,
    native_client,
    nio_client,
    portal_with_native,
    room_history,
    say,
    sync_until,
)

WITHIN = 60.0
LIMIT = 2 * 1024 * 1024  # server.media.max_size of this stack
STATUS = "com.beeper.message_send_status"


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=DATABASES)
async def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[BridgeStack]:
    async with bridge_stack(
        tmp_path_factory.mktemp("media"),
        request.param,
        others=("relay",),
        # Encryption allowed, off by default: one test turns it on in its portal.
        bridge_options={"relay.enabled": True, "encryption.allow": True},
        options={"server.media.max_size": LIMIT},
    ) as stack:
        yield stack


def png(width: int, height: int) -> bytes:
    """A real RGB PNG: a colour gradient."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        body = tag + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(
        b"\x00" + b"".join(bytes([x * 255 // width, y * 255 // height, 128]) for x in range(width))
        for y in range(height)
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


async def upload(client: AsyncClient, data: bytes, mimetype: str, name: str) -> str:
    response, _ = await client.upload(
        io.BytesIO(data), content_type=mimetype, filename=name, filesize=len(data)
    )
    assert isinstance(response, UploadResponse), response
    return str(response.content_uri)


async def send(client: AsyncClient, room: str, content: dict[str, Any]) -> str:
    sent = await client.room_send(room, "m.room.message", content)
    assert isinstance(sent, RoomSendResponse), sent
    return str(sent.event_id)


async def download(client: AsyncClient, mxc: str) -> bytes:
    response = await client.download(mxc=mxc)
    assert isinstance(response, MemoryDownloadResponse), response
    return bytes(response.body)


async def next_messages(native: Client, count: int) -> list[Message]:
    got: list[Message] = []
    await asyncio.wait_for(messages_from_others(native, got, count), WITHIN)
    return got


async def wait_events(
    client: AsyncClient, room: str, sender: str, count: int
) -> list[dict[str, Any]]:
    """The first ``count`` message and sticker events of ``sender`` in the room (raw)."""
    async with asyncio.timeout(WITHIN):
        while True:
            found = [
                e.source
                for e in await room_history(client, room)
                if e.source.get("sender") == sender
                and e.source.get("type") in ("m.room.message", "m.sticker")
            ]
            if len(found) >= count:
                return found[:count]
            await asyncio.sleep(0.5)


async def wait_status(client: AsyncClient, room: str, event_id: str) -> dict[str, Any]:
    async with asyncio.timeout(WITHIN):
        while True:
            for e in await room_history(client, room):
                content = e.source.get("content", {})
                if (
                    e.source.get("type") == STATUS
                    and content.get("m.relates_to", {}).get("event_id") == event_id
                    and content.get("status") != "PENDING"  # (a slow queue shows one first)
                ):
                    return dict(content)
            await asyncio.sleep(0.5)


@pytest.mark.asyncio(loop_scope="module")
async def test_matrix_media_to_native(stack: BridgeStack) -> None:
    native = await native_client(stack)
    async with nio_client(stack.synapse, stack.user) as alice:
        room_hex, portal = await portal_with_native(alice, native, "media in")
        room = bytes.fromhex(room_hex)
        image = png(24, 16)
        big = os.urandom(1536 * 1024)  # 1.5 MiB: six blocks
        image_uri = await upload(alice, image, "image/png", "gradient.png")
        big_uri = await upload(alice, big, "application/octet-stream", "data.bin")
        await send(
            alice,
            portal,
            {
                "msgtype": "m.image",
                "body": "gradient.png",
                "url": image_uri,
                "info": {"mimetype": "image/png", "size": len(image), "w": 24, "h": 16},
            },
        )
        await send(
            alice,
            portal,
            {
                "msgtype": "m.file",
                "body": "data.bin",
                "filename": "data.bin",
                "url": big_uri,
                "info": {"mimetype": "application/octet-stream", "size": len(big)},
            },
        )
        sticker = png(6, 6)
        sticker_uri = await upload(alice, sticker, "image/png", "smile.png")
        sent = await alice.room_send(
            portal,
            "m.sticker",
            {
                "body": "smile",
                "url": sticker_uri,
                "info": {"mimetype": "image/png", "size": len(sticker), "w": 6, "h": 6},
            },
        )
        assert isinstance(sent, RoomSendResponse), sent
        first, second, third = await next_messages(native, 3)

        assert first.content.kind == "image"
        ref = first.content.media
        assert ref is not None
        assert (ref.mimetype, ref.name, ref.size) == ("image/png", "gradient.png", len(image))
        assert (ref.width, ref.height) == (24, 16)
        assert await native.download_media(room, ref) == image

        assert second.content.kind == "file"
        ref = second.content.media
        assert ref is not None
        assert (ref.name, ref.size, ref.mimetype) == (
            "data.bin",
            len(big),
            "application/octet-stream",
        )
        assert await native.download_media(room, ref) == big

        assert third.content.kind == "sticker"
        ref = third.content.media
        assert ref is not None
        assert (ref.name, ref.width, ref.height) == ("smile", 6, 6)
        assert await native.download_media(room, ref) == sticker
        # Sent as the Matrix user's own member, not the bot's.
        assert first.sender_id == second.sender_id == third.sender_id != native.core.member_id
    await native.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_native_media_to_matrix(stack: BridgeStack) -> None:
    native = await native_client(stack)
    async with nio_client(stack.synapse, stack.user) as alice:
        room_hex, portal = await portal_with_native(alice, native, "media out")
        room, ghost = bytes.fromhex(room_hex), ghost_of(native)
        image = png(20, 10)
        big = os.urandom(1536 * 1024)
        sound = os.urandom(3000)
        sticker = png(8, 8)
        sent: list[tuple[str, bytes, str, str, dict[str, Any]]] = [
            ("image", image, "image/png", "out.png", {"width": 20, "height": 10}),
            ("file", big, "application/pdf", "report.pdf", {}),
            ("audio", sound, "audio/ogg", "voice.ogg", {"duration_ms": 1250}),
            ("sticker", sticker, "image/png", "wave.png", {"width": 8, "height": 8}),
            ("file", b"", "text/plain", "empty.txt", {}),
            ("video", os.urandom(5000), "video/mp4", "clip.mp4", {"width": 64, "height": 48}),
        ]
        for kind, data, mimetype, name, extra in sent:
            ref = await native.upload_media(
                room, data, mimetype=mimetype, name=name, kind=kind, **extra
            )
            await native.send(room, Content(body=name, kind=kind, media=ref))

        events = await wait_events(alice, portal, ghost, len(sent))
        types = [(e["type"], e["content"].get("msgtype")) for e in events]
        assert types == [
            ("m.room.message", "m.image"),
            ("m.room.message", "m.file"),
            ("m.room.message", "m.audio"),
            ("m.sticker", None),
            ("m.room.message", "m.file"),
            ("m.room.message", "m.video"),
        ]
        for event, (_, data, mimetype, name, _) in zip(events, sent, strict=True):
            content = event["content"]
            assert content["body"] == name
            assert content["info"]["mimetype"] == mimetype
            assert content["info"]["size"] == len(data)
            assert await download(alice, content["url"]) == data
        assert (events[0]["content"]["info"]["w"], events[0]["content"]["info"]["h"]) == (20, 10)
        assert events[1]["content"]["filename"] == "report.pdf"
        assert events[2]["content"]["info"]["duration"] == 1250
        assert events[3]["content"]["info"]["w"] == 8
        assert (events[5]["content"]["info"]["w"], events[5]["content"]["info"]["h"]) == (64, 48)
    await native.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_oversize_file_is_refused_with_the_limit(stack: BridgeStack) -> None:
    native = await native_client(stack)
    async with nio_client(stack.synapse, stack.user) as alice:
        room_hex, portal = await portal_with_native(alice, native, "too big")
        data = os.urandom(LIMIT + 512 * 1024)
        uri = await upload(alice, data, "application/zip", "huge.zip")
        notices = bot_notices(alice, portal)
        stated = await send(
            alice,
            portal,
            {
                "msgtype": "m.file",
                "body": "huge.zip",
                "url": uri,
                "info": {"mimetype": "application/zip", "size": len(data)},
            },
        )
        # No size in the event: the download finds out.
        unstated = await send(alice, portal, {"msgtype": "m.file", "body": "huge.zip", "url": uri})
        for event_id in (stated, unstated):
            status = await wait_status(alice, portal, event_id)
            assert status["status"] == "FAIL_PERMANENT"
            assert "too large" in status["message"]
            assert "2.0 MiB" in status["message"]
        await sync_until(alice, lambda: len(notices) >= 2, "the refusal notices")
        assert all(n.startswith("Not bridged to Kalandra:") for n in notices)
        assert "the file (2.5 MiB) is too large: the limit is 2.0 MiB" in notices[0]
        assert "the limit is 2.0 MiB" in notices[1]

        # The portal goes on: a file under the limit still arrives.
        small = os.urandom(1000)
        small_uri = await upload(alice, small, "text/plain", "small.txt")
        await send(alice, portal, {"msgtype": "m.file", "body": "small.txt", "url": small_uri})
        (message,) = await next_messages(native, 1)
        assert message.content.media is not None
        assert await native.download_media(bytes.fromhex(room_hex), message.content.media) == small
    await native.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_relay_user_image(stack: BridgeStack) -> None:
    native = await native_client(stack)
    async with (
        nio_client(stack.synapse, stack.user) as alice,
        nio_client(stack.synapse, stack.others["relay"]) as bob,
    ):
        room_hex, portal = await portal_with_native(alice, native, "relay media")
        answer = await command(alice, portal, "!kalandra set-relay")
        assert answer.startswith("Relay mode is on"), answer
        await alice.room_invite(portal, bob.user_id)
        await bob.join(portal)
        await sync_until(bob, lambda: portal in bob.rooms, "the join")
        image = png(4, 4)
        uri = await upload(bob, image, "image/png", "tiny.png")
        await send(bob, portal, {"msgtype": "m.image", "body": "tiny.png", "url": uri})
        (message,) = await next_messages(native, 1)
        assert message.content.kind == "image"
        assert "tiny.png" in message.content.body
        assert message.content.media is not None
        assert await native.download_media(bytes.fromhex(room_hex), message.content.media) == image
        # Through the bot's leaf: the relay format names bob in the body.
        assert bob.user_id.split(":")[0].lstrip("@") in message.content.body
    await native.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_encrypted_portal_media_both_ways(stack: BridgeStack) -> None:
    native = await native_client(stack)
    async with nio_client(stack.synapse, stack.user, encrypted=True) as alice:
        room_hex, portal = await portal_with_native(alice, native, "secret media")
        room, ghost = bytes.fromhex(room_hex), ghost_of(native)
        turned_on = await alice.room_put_state(
            portal, "m.room.encryption", {"algorithm": "m.megolm.v1.aes-sha2"}
        )
        assert isinstance(turned_on, RoomPutStateResponse), turned_on
        await sync_until(alice, lambda: alice.rooms[portal].encrypted, "the encryption event")
        await say(alice, portal, "encrypted from now on")
        (text,) = await next_messages(native, 1)
        assert text.content.body == "encrypted from now on"

        # Matrix -> Kalandra: an encrypted attachment, decrypted by the bridge.
        image = png(12, 12)
        response, keys = await alice.upload(
            io.BytesIO(image),
            content_type="image/png",
            filename="x.png",
            encrypt=True,
            filesize=len(image),  # (AES-CTR: as long as the plaintext)
        )
        assert isinstance(response, UploadResponse), response
        assert keys is not None
        file = {**keys, "url": response.content_uri}
        content = {
            "msgtype": "m.image",
            "body": "x.png",
            "file": file,
            "info": {"mimetype": "image/png", "size": len(image), "w": 12, "h": 12},
        }
        sent = await alice.room_send(
            portal, "m.room.message", content, ignore_unverified_devices=True
        )
        assert isinstance(sent, RoomSendResponse), sent
        (message,) = await next_messages(native, 1)
        assert message.content.kind == "image"
        assert message.content.media is not None
        assert message.content.media.name == "x.png"
        assert await native.download_media(room, message.content.media) == image

        # Kalandra -> Matrix: uploaded encrypted, the key inside the encrypted event.
        data = os.urandom(700 * 1024)
        for kind, payload, name in (("image", image, "back.png"), ("file", data, "data.bin")):
            ref = await native.upload_media(
                room,
                payload,
                mimetype="image/png" if kind == "image" else "text/plain",
                name=name,
                kind=kind,
            )
            await native.send(room, Content(body=name, kind=kind, media=ref))
        async with asyncio.timeout(WITHIN):
            while True:
                found = [
                    e
                    for e in await room_history(alice, portal)
                    if isinstance(e, RoomEncryptedImage | RoomEncryptedFile) and e.sender == ghost
                ]
                if len(found) >= 2:
                    break
                await asyncio.sleep(0.5)
        assert isinstance(found[0], RoomEncryptedImage)
        assert isinstance(found[1], RoomEncryptedFile)
        for event, expected in zip(found, (image, data), strict=True):
            assert event.decrypted  # the event itself was m.room.encrypted
            ciphertext = await download(alice, event.url)
            assert ciphertext != expected
            plain = decrypt_attachment(
                ciphertext, event.key["k"], event.hashes["sha256"], event.iv
            )
            assert plain == expected

        # A large image's thumbnail is an encrypted attachment too (thumbnail_file).
        large = png(1000, 700)
        ref = await native.upload_media(
            room, large, mimetype="image/png", name="l.png", kind="image"
        )
        await native.send(room, Content(body="l.png", kind="image", media=ref))
        async with asyncio.timeout(WITHIN):
            while True:
                images = [
                    e
                    for e in await room_history(alice, portal)
                    if isinstance(e, RoomEncryptedImage) and e.sender == ghost
                ]
                if len(images) >= 2:
                    break
                await asyncio.sleep(0.5)
        event = images[1]
        assert event.thumbnail_url is not None
        assert event.thumbnail_key is not None
        assert event.thumbnail_hashes is not None
        assert event.thumbnail_iv is not None
        ciphertext = await download(alice, event.thumbnail_url)
        thumb = decrypt_attachment(
            ciphertext,
            event.thumbnail_key["k"],
            event.thumbnail_hashes["sha256"],
            event.thumbnail_iv,
        )
        assert decoded_size(thumb) == (800, 560)
        info = event.source["content"]["info"]
        assert (info["w"], info["h"], info["thumbnail_info"]["size"]) == (1000, 700, len(thumb))
        assert "thumbnail_url" not in info  # (only inside thumbnail_file)
    await native.close()


def decoded_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.size


@pytest.mark.asyncio(loop_scope="module")
async def test_native_images_get_their_layout_info_and_a_thumbnail(stack: BridgeStack) -> None:
    """Images whose sender said no size get w/h read from the file; an image larger than
    Element's thumbnail box (800x600) gets a thumbnail; a video keeps its size and duration."""
    from PIL import Image

    native = await native_client(stack)
    async with nio_client(stack.synapse, stack.user) as alice:
        room_hex, portal = await portal_with_native(alice, native, "layout")
        room, ghost = bytes.fromhex(room_hex), ghost_of(native)
        large = png(1000, 700)
        gif = io.BytesIO()
        Image.new("RGB", (30, 40), (200, 10, 10)).save(gif, format="GIF")
        jpeg = io.BytesIO()
        Image.new("RGB", (33, 17), (10, 200, 10)).save(jpeg, format="JPEG")
        sent: list[tuple[str, bytes, str, str, dict[str, Any]]] = [
            ("image", large, "image/png", "large.png", {}),
            ("image", gif.getvalue(), "image/gif", "small.gif", {}),
            ("image", jpeg.getvalue(), "image/jpeg", "small.jpg", {}),
            ("video", os.urandom(4000), "video/mp4", "v.mp4", {"width": 320, "height": 240}),
        ]
        sent[3][4]["duration_ms"] = 4500
        for kind, data, mimetype, name, extra in sent:
            ref = await native.upload_media(
                room, data, mimetype=mimetype, name=name, kind=kind, **extra
            )
            await native.send(room, Content(body=name, kind=kind, media=ref))
        events = await wait_events(alice, portal, ghost, len(sent))
        infos = [e["content"]["info"] for e in events]
        for info, (_, data, mimetype, _, _) in zip(infos, sent, strict=True):
            assert (info["mimetype"], info["size"]) == (mimetype, len(data))
        assert [(i["w"], i["h"]) for i in infos] == [(1000, 700), (30, 40), (33, 17), (320, 240)]
        assert infos[3]["duration"] == 4500
        # The large image's thumbnail: at most 800x600, its info true to its bytes.
        thumb = await download(alice, infos[0]["thumbnail_url"])
        assert decoded_size(thumb) == (800, 560)
        assert infos[0]["thumbnail_info"] == {
            "mimetype": "image/jpeg",
            "size": len(thumb),
            "w": 800,
            "h": 560,
        }
        assert await download(alice, events[0]["content"]["url"]) == large
        # Small images are their own thumbnail.
        assert all("thumbnail_url" not in i for i in infos[1:])
    await native.close()
