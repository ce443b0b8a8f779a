"""Frames the server writes itself: errors and replies. Unsigned, like the reference's."""

from __future__ import annotations

from ..proto import ErrorCode, ErrorPayload, Frame, FrameHeader, Opcode, Payload


def reply(
    opcode: int,
    payload: Payload | bytes,
    *,
    request_id: int = 0,
    room_id: int = 0,
    context_id: int = 0,
    epoch: int = 0,
) -> bytes:
    header = FrameHeader(
        opcode, request_id=request_id, room_id=room_id, context_id=context_id, epoch=epoch
    )
    return Frame.build(header, payload).encode()


def answer(
    request: FrameHeader,
    opcode: int,
    payload: Payload | bytes = b"",
    *,
    context_id: int = 0,
    epoch: int = 0,
) -> bytes:
    """A reply to a room request: it echoes the request id and the room of ``request``."""
    return reply(
        opcode,
        payload,
        request_id=request.request_id,
        room_id=request.room_id,
        context_id=context_id,
        epoch=epoch,
    )


def error(
    code: int | ErrorCode,
    message: str,
    *,
    request_id: int = 0,
    room_id: int = 0,
    retry_after: int | None = None,
    current_epoch: int | None = None,
    log_index: int | None = None,
) -> bytes:
    """An Error frame echoing the request id and room of the frame it answers."""
    payload = ErrorPayload(
        code=int(code),
        message=message,
        retry_after=retry_after,
        current_epoch=current_epoch,
        log_index=log_index,
    )
    return reply(Opcode.ERROR, payload, request_id=request_id, room_id=room_id)
