"""Frames to and from a JSON-friendly dict: for the ``frame`` CLI, debugging and test fixtures.

Shape: ``{"header": {...every header field, opcode_name...}, "payload": ...}`` where room_id is
32 hex digits, the signature and every byte field are hex strings, and the payload is a JSON
object for CBOR payloads or a hex string for raw ones (MLS messages, opcodes without a schema).
"""

from __future__ import annotations

from typing import Any

from .errors import PayloadDecodeError, UnsupportedOpcode
from .frame import Frame
from .header import MAGIC, SIGNATURE_SIZE, VERSION, FrameHeader
from .opcodes import opcode_from_name, opcode_name
from .payloads import decode_payload, payload_from_json

_INT_FIELDS = (
    "magic",
    "version",
    "flags",
    "request_id",
    "sender_id",
    "context_id",
    "hlc_timestamp",
    "epoch",
)


def header_to_json(header: FrameHeader) -> dict[str, Any]:
    return {
        "magic": header.magic,
        "version": header.version,
        "flags": int(header.flags),
        "opcode": header.opcode,
        "opcode_name": header.opcode_name,
        "request_id": header.request_id,
        "payload_size": header.payload_size,
        "room_id": f"{header.room_id:032x}",
        "sender_id": header.sender_id,
        "context_id": header.context_id,
        "hlc_timestamp": header.hlc_timestamp,
        "epoch": header.epoch,
        "signature": header.signature.hex(),
    }


def frame_to_json(frame: Frame) -> dict[str, Any]:
    """Decode the payload by opcode; opcodes without a payload type show the raw hex."""
    try:
        payload: Any = decode_payload(frame.header.opcode, frame.payload).to_json()
    except UnsupportedOpcode:
        payload = frame.payload.hex()
    return {"header": header_to_json(frame.header), "payload": payload}


def frame_from_json(obj: Any) -> Frame:
    """Build a frame from :func:`frame_to_json`'s shape. Omitted header fields default like
    ``FrameHeader::new`` (magic, version 1, the rest zero); payload_size is computed."""
    if not isinstance(obj, dict):
        raise PayloadDecodeError("frame: expected a JSON object with 'header' and 'payload'")
    unknown = set(obj) - {"header", "payload"}
    if unknown:
        raise PayloadDecodeError(f"frame: unknown keys {sorted(unknown)}")
    h = obj.get("header")
    if not isinstance(h, dict):
        raise PayloadDecodeError("header: expected a JSON object")
    opcode = _opcode(h)
    payload = payload_from_json(opcode, obj.get("payload", ""))
    fields: dict[str, Any] = {"magic": MAGIC, "version": VERSION}
    for name in _INT_FIELDS:
        if name in h:
            value = h[name]
            if isinstance(value, bool) or not isinstance(value, int):
                raise PayloadDecodeError(f"header.{name}: expected an integer")
            fields[name] = value
    room = h.get("room_id", "0" * 32)
    if not isinstance(room, str) or len(room) != 32:
        raise PayloadDecodeError("header.room_id: expected 32 hex digits")
    sig = h.get("signature", "00" * SIGNATURE_SIZE)
    if not isinstance(sig, str) or len(sig) != 2 * SIGNATURE_SIZE:
        raise PayloadDecodeError(f"header.signature: expected {2 * SIGNATURE_SIZE} hex digits")
    try:
        fields["room_id"] = int(room, 16)
        fields["signature"] = bytes.fromhex(sig)
    except ValueError:
        raise PayloadDecodeError("header: room_id and signature must be hex") from None
    try:
        header = FrameHeader(opcode, **fields)
    except ValueError as exc:
        raise PayloadDecodeError(f"header: {exc}") from None
    frame = Frame.build(header, payload)
    declared = h.get("payload_size")
    if declared is not None and declared != len(frame.payload):
        raise PayloadDecodeError(
            f"header.payload_size: {declared} does not match the payload ({len(frame.payload)})"
        )
    return frame


def _opcode(h: dict[str, Any]) -> int:
    number = h.get("opcode")
    name = h.get("opcode_name")
    if number is None and name is None:
        raise PayloadDecodeError("header: opcode or opcode_name is required")
    if number is not None and (
        isinstance(number, bool) or not isinstance(number, int) or not 0 <= number <= 0xFFFF
    ):
        raise PayloadDecodeError("header.opcode: expected an integer 0..65535")
    if name is not None:
        if not isinstance(name, str):
            raise PayloadDecodeError("header.opcode_name: expected text")
        if number is None:
            try:
                return int(opcode_from_name(name))
            except ValueError as exc:
                raise PayloadDecodeError(f"header.opcode_name: {exc}") from None
        if opcode_name(number) != name:
            raise PayloadDecodeError(
                f"header: opcode 0x{number:04x} is {opcode_name(number)}, not {name}"
            )
    assert number is not None
    return int(number)
