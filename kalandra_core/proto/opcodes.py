"""Opcodes (header bytes 6..7) and flags (header byte 5) of the Kalandra wire protocol."""

from __future__ import annotations

import enum


class Opcode(enum.IntEnum):
    """Every opcode the reference protocol defines; the high byte is the family."""

    # 0x00: session
    HELLO = 0x0001
    HELLO_REPLY = 0x0002
    GOODBYE = 0x0003
    PING = 0x0004
    PONG = 0x0005
    SYNC_REQUEST = 0x0006
    SYNC_RESPONSE = 0x0007
    ERROR = 0x00FF
    # 0x10: MLS
    KEY_PACKAGE = 0x1000
    PROPOSAL = 0x1001
    COMMIT = 0x1002
    WELCOME = 0x1003
    GROUP_INFO = 0x1004
    PSK_PROPOSAL = 0x1005
    REINIT = 0x1006
    EXTERNAL_COMMIT = 0x1007
    # 0x20: application
    APP_MESSAGE = 0x2000
    APP_RECEIPT = 0x2001
    APP_REACTION = 0x2002
    APP_EDIT = 0x2003
    APP_DELETE = 0x2004
    TYPING = 0x2005
    PRESENCE = 0x2006
    # 0x30: moderation
    REDACT = 0x3000
    BAN = 0x3001
    UNBAN = 0x3002
    KICK = 0x3003
    MUTE = 0x3004
    PIN = 0x3005
    REPORT = 0x3006
    # 0x40: federation
    FED_APPEND = 0x4000
    FED_SYNC = 0x4001
    FED_ACK = 0x4002
    FED_NACK = 0x4003
    FED_QUERY = 0x4004
    # 0x50: content-addressed storage
    CAS_PUT = 0x5000
    CAS_GET = 0x5001
    CAS_DELETE = 0x5002
    CAS_PROOF = 0x5003


_WIRE_NAMES: dict[Opcode, str] = {
    Opcode.HELLO: "Hello",
    Opcode.HELLO_REPLY: "HelloReply",
    Opcode.GOODBYE: "Goodbye",
    Opcode.PING: "Ping",
    Opcode.PONG: "Pong",
    Opcode.SYNC_REQUEST: "SyncRequest",
    Opcode.SYNC_RESPONSE: "SyncResponse",
    Opcode.ERROR: "Error",
    Opcode.KEY_PACKAGE: "KeyPackage",
    Opcode.PROPOSAL: "Proposal",
    Opcode.COMMIT: "Commit",
    Opcode.WELCOME: "Welcome",
    Opcode.GROUP_INFO: "GroupInfo",
    Opcode.PSK_PROPOSAL: "PSKProposal",
    Opcode.REINIT: "ReInit",
    Opcode.EXTERNAL_COMMIT: "ExternalCommit",
    Opcode.APP_MESSAGE: "AppMessage",
    Opcode.APP_RECEIPT: "AppReceipt",
    Opcode.APP_REACTION: "AppReaction",
    Opcode.APP_EDIT: "AppEdit",
    Opcode.APP_DELETE: "AppDelete",
    Opcode.TYPING: "Typing",
    Opcode.PRESENCE: "Presence",
    Opcode.REDACT: "Redact",
    Opcode.BAN: "Ban",
    Opcode.UNBAN: "Unban",
    Opcode.KICK: "Kick",
    Opcode.MUTE: "Mute",
    Opcode.PIN: "Pin",
    Opcode.REPORT: "Report",
    Opcode.FED_APPEND: "FedAppend",
    Opcode.FED_SYNC: "FedSync",
    Opcode.FED_ACK: "FedAck",
    Opcode.FED_NACK: "FedNack",
    Opcode.FED_QUERY: "FedQuery",
    Opcode.CAS_PUT: "CASPut",
    Opcode.CAS_GET: "CASGet",
    Opcode.CAS_DELETE: "CASDelete",
    Opcode.CAS_PROOF: "CASProof",
}
_BY_WIRE_NAME = {name: op for op, name in _WIRE_NAMES.items()}


def opcode_name(value: int) -> str:
    """Wire name of an opcode number; unknown (but valid) numbers give ``Unknown(0x....)``."""
    try:
        return _WIRE_NAMES[Opcode(value)]
    except ValueError:
        return f"Unknown(0x{value:04x})"


def opcode_from_name(name: str) -> Opcode:
    """Inverse of :func:`opcode_name` for known opcodes; takes wire or enum names."""
    if name in _BY_WIRE_NAME:
        return _BY_WIRE_NAME[name]
    try:
        return Opcode[name.upper()]
    except KeyError:
        raise ValueError(f"unknown opcode name {name!r}") from None


class Flags(enum.IntFlag):
    """Header flag bits. Parsing keeps unknown bits; the protocol does not act on any yet."""

    NONE = 0
    COMPRESSED = 0x01
    FRAGMENTED = 0x02
    PRIORITY = 0x04
    FEDERATED = 0x08
    EXTERNAL = 0x10
    EPHEMERAL = 0x20
    REDACTABLE = 0x40
    RESERVED = 0x80


# Opcodes whose header context_id is a recipient member id rather than a log index.
RECIPIENT_ADDRESSED = frozenset({Opcode.WELCOME})
