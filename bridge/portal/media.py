"""Media across the bridge: Kalandra's encrypted blocks <-> Matrix's media repository.

Toward Matrix: the bot's client (a member of every portal's room) reads the blocks of a
message's media reference and streams the plaintext straight into the ghost's upload (the
ghost is the uploader); in an encrypted portal the stream is encrypted on the way (a Matrix
encrypted attachment: AES-256-CTR, SHA-256 of the ciphertext) and the event carries ``file``
instead of ``url``. A retried send uploads again, which is harmless: only the send must happen
once (to_matrix.py). A file that cannot be read (its blocks deleted, a failed integrity
check) or that the homeserver refuses (too large) becomes a notice from the ghost naming the
file, so the portal's queue goes on.

Toward Kalandra: the file of a Matrix message is downloaded by the bot (authenticated media),
decrypted when the event carries an encrypted file, and spooled to a temporary file: its size
and (encrypted) hash are checked before anything is stored. It is then stored as encrypted
blocks in the room through the bot's client; the message itself is the sender's (bridged user
or relay). A file over ``server.media.max_size`` is refused with the limit in the text.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import tempfile
from collections.abc import AsyncIterator
from typing import IO, TYPE_CHECKING, Any, Final, cast

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from mautrix.appservice import IntentAPI
from mautrix.errors import MatrixStandardRequestError
from mautrix.types import (
    AudioInfo,
    ContentURI,
    EncryptedFile,
    EventType,
    FileInfo,
    ImageInfo,
    JSONWebKey,
    MediaMessageEventContent,
    MessageEventContent,
    MessageStatusReason,
    MessageType,
    SpecVersions,
    TextMessageEventContent,
    ThumbnailInfo,
    VideoInfo,
)

from kalandra_core.client.content import Content
from kalandra_core.client.driver import ClientError
from kalandra_core.media.blob import BLOCK_SIZE, MediaError, MediaRef

from ..convert import media_info
from ..encryption import e2ee
from .statuses import Refused

if TYPE_CHECKING:
    from ..context import BridgeContext, PortalFace

log = logging.getLogger("kalandra.bridge.media")

MSGTYPES: Final = {
    "image": MessageType.IMAGE,
    "file": MessageType.FILE,
    "audio": MessageType.AUDIO,
    "video": MessageType.VIDEO,
    "sticker": MessageType.STICKER,
}
KIND_OF: Final = {msgtype: kind for kind, msgtype in MSGTYPES.items()}
_MIB = 1024 * 1024


def is_media(content: MessageEventContent) -> bool:
    return isinstance(content, MediaMessageEventContent) and content.msgtype in KIND_OF


def max_size(bridge: BridgeContext) -> int:
    return int(bridge.config["server.media.max_size"])


def size_text(size: int) -> str:
    if size >= _MIB:
        return f"{size / _MIB:.1f} MiB"
    return f"{size / 1024:.1f} KiB"


def _too_large(limit: int, size: int | None = None) -> Refused:
    which = "the file" if size is None else f"the file ({size_text(size)})"
    return Refused(
        MessageStatusReason.UNSUPPORTED,
        f"{which} is too large: the limit is {size_text(limit)}.",
    )


def _b64decode(text: str) -> bytes:
    text = text.replace("-", "+").replace("_", "/")
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _b64(data: bytes, *, urlsafe: bool = False) -> str:
    encoded = base64.urlsafe_b64encode(data) if urlsafe else base64.b64encode(data)
    return encoded.decode().rstrip("=")


# --- Matrix -> Kalandra ---------------------------------------------------------------------


class _AttachmentDecryptor:
    """A Matrix encrypted attachment, decrypted as it streams in; the SHA-256 of the
    ciphertext is checked at the end (before anything decrypted is used)."""

    def __init__(self, file: EncryptedFile) -> None:
        try:
            key = _b64decode(file.key.key)
            iv = _b64decode(file.iv)
            self.expected = _b64decode(file.hashes["sha256"])
            self._cipher = Cipher(algorithms.AES(key), modes.CTR(iv)).decryptor()
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise Refused(
                MessageStatusReason.UNSUPPORTED, "the encrypted file's key is unreadable."
            ) from exc
        self._hash = hashlib.sha256()

    def update(self, data: bytes) -> bytes:
        self._hash.update(data)
        return self._cipher.update(data)

    def finish(self) -> None:
        if not hmac.compare_digest(self._hash.digest(), self.expected):
            raise Refused(
                MessageStatusReason.UNDECRYPTABLE,
                "the encrypted file does not match its hash.",
                retriable=False,  # (the same file would fail again)
            )


async def _download(
    intent: IntentAPI, url: ContentURI, out: IO[bytes], limit: int, file: EncryptedFile | None
) -> int:
    """The file at ``url`` into ``out`` (decrypted with ``file``); its size. Refused when it is
    over ``limit`` (as soon as that is known) or missing."""
    api = intent.api
    authenticated = (await intent.versions()).supports(SpecVersions.V111)
    address = api.get_download_url(url, authenticated=authenticated)
    params: dict[str, str] = {"allow_redirect": "true"}
    headers: dict[str, str] = {}
    if authenticated:
        headers["Authorization"] = f"Bearer {api.token}"
        if api.as_user_id:
            params["user_id"] = api.as_user_id
    decryptor = _AttachmentDecryptor(file) if file is not None else None
    size = 0
    async with api.session.get(address, params=params, headers=headers) as response:
        if response.status == 404:
            raise Refused(MessageStatusReason.GENERIC_ERROR, "the file is not on the homeserver.")
        response.raise_for_status()
        if response.content_length is not None and response.content_length > limit:
            raise _too_large(limit, response.content_length)
        async for chunk in response.content.iter_chunked(BLOCK_SIZE):
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            out.write(decryptor.update(chunk) if decryptor is not None else chunk)
    if decryptor is not None:
        decryptor.finish()
    return size


download_into = _download  # (room avatars: room_metadata.py)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


async def to_kalandra(portal: PortalFace, content: MediaMessageEventContent) -> Content:
    """The Matrix message's file stored as blocks in the portal's room: the Kalandra content
    that shares it (reply, edit and mentions: relations.py)."""
    bridge = portal.bridge
    kind = KIND_OF[content.msgtype]
    limit = max_size(bridge)
    info = content.info
    declared = _int(getattr(info, "size", None))
    if declared is not None and declared > limit:
        raise _too_large(limit, declared)
    url = content.file.url if content.file is not None else content.url
    if not url:
        raise Refused(MessageStatusReason.UNSUPPORTED, "a media message without a file.")
    client = bridge.bot.client
    assert client is not None
    mimetype = getattr(info, "mimetype", None)
    duration = _int(getattr(info, "duration", None))
    name = content.filename or content.body or kind
    with tempfile.TemporaryFile() as spool:
        await _download(bridge.az.intent, url, spool, limit, content.file)
        spool.seek(0)
        ref = await client.upload_media(
            portal.room_id,
            spool,
            mimetype=mimetype if isinstance(mimetype, str) else "application/octet-stream",
            name=name,
            kind=kind,
            width=_int(getattr(info, "width", None)),
            height=_int(getattr(info, "height", None)),
            duration_ms=duration,
        )
    return Content(body=content.body or name, kind=kind, media=ref)


# --- Kalandra -> Matrix ---------------------------------------------------------------------


class _Source:
    """The plaintext blocks of a reference, encrypted on the way when ``encrypt``; remembers
    why reading failed (the upload only sees its body end early)."""

    def __init__(self, blocks: AsyncIterator[bytes], encrypt: bool, keep: int = 0) -> None:
        self.blocks = blocks
        self.failure: MediaError | ClientError | None = None
        self.file: EncryptedFile | None = None
        self.kept = bytearray()  # the first ``keep`` bytes of the plaintext
        self._encrypt = encrypt
        self._keep = keep

    async def stream(self) -> AsyncIterator[bytes]:
        key, iv = os.urandom(32), os.urandom(8) + bytes(8)
        cipher = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
        digest = hashlib.sha256()
        try:
            async for block in self.blocks:
                if len(self.kept) < self._keep:
                    self.kept += block[: self._keep - len(self.kept)]
                if self._encrypt:
                    block = cipher.update(block)
                    digest.update(block)
                yield block
        except (MediaError, ClientError) as exc:
            self.failure = exc
            raise
        if self._encrypt:
            self.file = EncryptedFile(
                key=JSONWebKey(key=_b64(key, urlsafe=True)),
                iv=_b64(iv),
                hashes={"sha256": _b64(digest.digest())},
            )


def _info(
    ref: MediaRef, size: tuple[int, int] | None = None
) -> FileInfo | ImageInfo | VideoInfo | AudioInfo:
    """``size``: the image's (width, height) read from its file, where the sender gave none."""

    def given(**values: int | None) -> dict[str, Any]:
        return {name: value for name, value in values.items() if value is not None}

    common: dict[str, Any] = {"mimetype": ref.mimetype, "size": ref.size}
    if ref.kind in ("image", "sticker"):
        width, height = ref.width, ref.height
        if (width is None or height is None) and size is not None:
            width, height = size
        return ImageInfo(**common, **given(width=width, height=height))
    if ref.kind == "video":
        sizes = given(width=ref.width, height=ref.height, duration=ref.duration_ms)
        return VideoInfo(**common, **sizes)
    if ref.kind == "audio":
        return AudioInfo(**common, **given(duration=ref.duration_ms))
    return FileInfo(**common)


def _unavailable(content: Content, why: str) -> TextMessageEventContent:
    ref = content.media
    assert ref is not None
    name = ref.name or content.body or ref.kind
    return TextMessageEventContent(
        msgtype=MessageType.NOTICE, body=f"{name} ({size_text(ref.size)}): {why}"
    )


async def to_matrix(
    portal: PortalFace, intent: IntentAPI, content: Content
) -> tuple[EventType, TextMessageEventContent]:
    """The message's file uploaded by the ghost (``intent``): the event type and content that
    share it (m.room.message, or m.sticker), or a notice when the file cannot be bridged."""
    ref = content.media
    assert ref is not None
    bridge = portal.bridge
    client = bridge.bot.client
    assert client is not None
    encrypt = portal.row.encrypted and e2ee.manager(bridge) is not None
    image = ref.kind in ("image", "sticker")
    # An image's first bytes tell its size; a whole one (not too large) makes its thumbnail.
    keep = 0
    if image:
        keep = ref.size if ref.size <= media_info.THUMBNAIL_MAX_FILE else media_info.HEAD
    source = _Source(client.stream_media(portal.room_id, ref), encrypt, keep)
    try:
        data: AsyncIterator[bytes] | bytes
        if ref.size:
            data = source.stream()
        else:  # Synapse needs a Content-Length: an empty file goes as bytes
            data = b"".join([block async for block in source.stream()])
        mxc = await intent.upload_media(
            data,
            mime_type="application/octet-stream" if encrypt else ref.mimetype,
            filename=ref.name or None,
            size=ref.size,
        )
    except MatrixStandardRequestError as exc:
        if exc.errcode != "M_TOO_LARGE":
            raise
        why = "too large for this Matrix homeserver."
        return EventType.ROOM_MESSAGE, _unavailable(content, why)
    except Exception:
        failure = source.failure
        if isinstance(failure, MediaError) or (
            isinstance(failure, ClientError) and failure.code != 0
        ):
            log.warning("portal %s: a file could not be read (%s)", portal.hex, failure)
            why = "the file could not be read from Kalandra."
            return EventType.ROOM_MESSAGE, _unavailable(content, why)
        raise
    msgtype = MSGTYPES[ref.kind]
    info = _info(ref, media_info.dimensions(bytes(source.kept[: media_info.HEAD])))
    out = MediaMessageEventContent(
        msgtype=msgtype, body=content.body or ref.name or ref.kind, info=info
    )
    if msgtype == MessageType.IMAGE and len(source.kept) == ref.size and ref.size:
        await _add_thumbnail(portal, intent, bytes(source.kept), info, encrypt)
    if ref.name:
        out.filename = ref.name
    if encrypt:
        assert source.file is not None
        source.file.url = mxc
        out.file = source.file
    else:
        out.url = mxc
    if msgtype == MessageType.STICKER:
        out.msgtype = cast(
            MessageType, None
        )  # (m.sticker is an event type; its content has no msgtype)
        return EventType.STICKER, out
    return EventType.ROOM_MESSAGE, out


async def _add_thumbnail(
    portal: PortalFace, intent: IntentAPI, image: bytes, info: Any, encrypt: bool
) -> None:
    """A thumbnail of ``image`` uploaded by the ghost into ``info`` (an encrypted attachment
    in an encrypted portal); nothing when there is none to make or it cannot be uploaded."""
    thumb = await asyncio.to_thread(media_info.thumbnail, image)
    if thumb is None:
        return
    source = _Source(_once(thumb.data), encrypt)
    try:
        data = b"".join([block async for block in source.stream()])
        mxc = await intent.upload_media(
            data,
            mime_type="application/octet-stream" if encrypt else thumb.mimetype,
            filename="thumbnail.jpg" if thumb.mimetype == "image/jpeg" else "thumbnail.png",
            size=len(data),
        )
    except MatrixStandardRequestError as exc:  # (the image itself went: it stands in)
        log.warning("portal %s: thumbnail not uploaded (%s)", portal.hex, exc.errcode)
        return
    info.thumbnail_info = ThumbnailInfo(
        mimetype=thumb.mimetype, size=len(thumb.data), width=thumb.width, height=thumb.height
    )
    if encrypt:
        assert source.file is not None
        source.file.url = mxc
        info.thumbnail_file = source.file
    else:
        info.thumbnail_url = mxc


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data
