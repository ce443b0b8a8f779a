"""Declarative CBOR schemas for payload structs, matching the reference's serde + ciborium output.

A payload class is a dataclass whose fields carry a :class:`Codec` in their metadata. The wire
form is a definite-length CBOR map with text keys in field declaration order (not sorted);
``None`` optional fields are omitted; byte strings are written as arrays of small integers (what
serde does with ``Vec<u8>``) and accepted as arrays or CBOR byte strings; unknown keys are
ignored. The JSON form (for the CLI and logs) writes bytes as hex strings.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping
from typing import Any, Self

import cbor2

from .errors import PayloadDecodeError, PayloadEncodeError


class Codec:
    """How one field travels: to/from the CBOR data model and to/from JSON."""

    def to_wire(self, value: Any, name: str) -> Any:
        raise NotImplementedError

    def from_wire(self, obj: Any, name: str) -> Any:
        raise NotImplementedError

    def to_json(self, value: Any) -> Any:
        return value

    def from_json(self, obj: Any, name: str) -> Any:
        return self.from_wire(obj, name)


class UInt(Codec):
    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.limit = 1 << bits

    def _check(self, value: Any, name: str, err: type[Exception]) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.limit:
            raise err(f"{name}: expected an unsigned {self.bits}-bit integer, got {_show(value)}")
        return value

    def to_wire(self, value: Any, name: str) -> int:
        return self._check(value, name, PayloadEncodeError)

    def from_wire(self, obj: Any, name: str) -> int:
        return self._check(obj, name, PayloadDecodeError)


class Text(Codec):
    def to_wire(self, value: Any, name: str) -> str:
        if not isinstance(value, str):
            raise PayloadEncodeError(f"{name}: expected text, got {_show(value)}")
        return value

    def from_wire(self, obj: Any, name: str) -> str:
        if not isinstance(obj, str):
            raise PayloadDecodeError(f"{name}: expected text, got {_show(obj)}")
        return obj


class Bool(Codec):
    def to_wire(self, value: Any, name: str) -> bool:
        if not isinstance(value, bool):
            raise PayloadEncodeError(f"{name}: expected a boolean, got {_show(value)}")
        return value

    def from_wire(self, obj: Any, name: str) -> bool:
        if not isinstance(obj, bool):
            raise PayloadDecodeError(f"{name}: expected a boolean, got {_show(obj)}")
        return obj


class Bytes(Codec):
    """``Vec<u8>`` / ``[u8; N]``: an array of uints on output; array or byte string on input."""

    def __init__(self, size: int | None = None) -> None:
        self.size = size

    def _check_size(self, data: bytes, name: str, err: type[Exception]) -> bytes:
        if self.size is not None and len(data) != self.size:
            raise err(f"{name}: expected exactly {self.size} bytes, got {len(data)}")
        return data

    def to_wire(self, value: Any, name: str) -> list[int]:
        if not isinstance(value, bytes | bytearray | memoryview):
            raise PayloadEncodeError(f"{name}: expected bytes, got {_show(value)}")
        return list(self._check_size(bytes(value), name, PayloadEncodeError))

    def from_wire(self, obj: Any, name: str) -> bytes:
        if isinstance(obj, bytes):
            data = obj
        elif isinstance(obj, list):
            try:
                data = bytes(obj)
            except (TypeError, ValueError):
                raise PayloadDecodeError(f"{name}: expected an array of bytes (0..255)") from None
        else:
            raise PayloadDecodeError(f"{name}: expected bytes, got {_show(obj)}")
        return self._check_size(data, name, PayloadDecodeError)

    def to_json(self, value: Any) -> str:
        return bytes(value).hex()

    def from_json(self, obj: Any, name: str) -> bytes:
        if not isinstance(obj, str):
            raise PayloadDecodeError(f"{name}: expected a hex string, got {_show(obj)}")
        try:
            data = bytes.fromhex(obj)
        except ValueError:
            raise PayloadDecodeError(f"{name}: not a hex string") from None
        return self._check_size(data, name, PayloadDecodeError)


class ListOf(Codec):
    def __init__(self, item: Codec) -> None:
        self.item = item

    def to_wire(self, value: Any, name: str) -> list[Any]:
        if not isinstance(value, list | tuple):
            raise PayloadEncodeError(f"{name}: expected a list, got {_show(value)}")
        return [self.item.to_wire(v, f"{name}[{i}]") for i, v in enumerate(value)]

    def from_wire(self, obj: Any, name: str) -> list[Any]:
        if not isinstance(obj, list):
            raise PayloadDecodeError(f"{name}: expected an array, got {_show(obj)}")
        return [self.item.from_wire(v, f"{name}[{i}]") for i, v in enumerate(obj)]

    def to_json(self, value: Any) -> list[Any]:
        return [self.item.to_json(v) for v in value]

    def from_json(self, obj: Any, name: str) -> list[Any]:
        if not isinstance(obj, list):
            raise PayloadDecodeError(f"{name}: expected a list, got {_show(obj)}")
        return [self.item.from_json(v, f"{name}[{i}]") for i, v in enumerate(obj)]


class UnitEnum(Codec):
    """A Rust unit-variant enum: the variant name as a text string."""

    def __init__(self, enum_type: type[enum.Enum]) -> None:
        self.enum_type = enum_type

    def to_wire(self, value: Any, name: str) -> str:
        if not isinstance(value, self.enum_type):
            raise PayloadEncodeError(f"{name}: expected {self.enum_type.__name__}")
        return str(value.value)

    def from_wire(self, obj: Any, name: str) -> enum.Enum:
        try:
            return self.enum_type(obj)
        except ValueError:
            choices = ", ".join(str(m.value) for m in self.enum_type)
            raise PayloadDecodeError(
                f"{name}: expected one of {choices}, got {_show(obj)}"
            ) from None

    def to_json(self, value: Any) -> str:
        return str(value.value)


class Nested(Codec):
    def __init__(self, struct_type: type[CborStruct]) -> None:
        self.struct_type = struct_type

    def to_wire(self, value: Any, name: str) -> dict[str, Any]:
        if not isinstance(value, self.struct_type):
            raise PayloadEncodeError(f"{name}: expected {self.struct_type.__name__}")
        return value.to_wire()

    def from_wire(self, obj: Any, name: str) -> CborStruct:
        return self.struct_type.from_wire(obj, name)

    def to_json(self, value: Any) -> dict[str, Any]:
        return value.to_json()  # type: ignore[no-any-return]

    def from_json(self, obj: Any, name: str) -> CborStruct:
        return self.struct_type.from_json(obj, name)


@dataclasses.dataclass(frozen=True, slots=True)
class _FieldSpec:
    name: str
    codec: Codec
    optional: bool  # omitted on output when None; None when absent on input
    default: Any  # used when absent on input (serde default); _REQUIRED if none


_REQUIRED = object()
_SPECS: dict[type, tuple[_FieldSpec, ...]] = {}


def wire(codec: Codec, *, optional: bool = False, absent: Any = _REQUIRED, **kw: Any) -> Any:
    """Declare a payload field: ``epoch: int = wire(UInt(64))``."""
    meta = {"codec": codec, "optional": optional, "absent": absent}
    if optional:
        kw.setdefault("default", None)
    return dataclasses.field(metadata=meta, **kw)


class CborStruct:
    """Base of every CBOR-map payload; subclasses are dataclasses using :func:`wire` fields."""

    __slots__ = ()

    @classmethod
    def _fields(cls) -> tuple[_FieldSpec, ...]:
        # Built once per class on first use (dataclass fields exist only after decoration).
        specs: tuple[_FieldSpec, ...] | None = _SPECS.get(cls)
        if specs is None:
            specs = tuple(
                _FieldSpec(
                    f.name,
                    f.metadata["codec"],
                    bool(f.metadata["optional"]),
                    None if f.metadata["optional"] else f.metadata["absent"],
                )
                for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            )
            _SPECS[cls] = specs
        return specs

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for spec in self._fields():
            value = getattr(self, spec.name)
            if value is None and spec.optional:
                continue
            out[spec.name] = spec.codec.to_wire(value, spec.name)
        return out

    @classmethod
    def from_wire(cls, obj: Any, where: str | None = None) -> Self:
        return cls._build(obj, where, lambda codec, value, name: codec.from_wire(value, name))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for spec in self._fields():
            value = getattr(self, spec.name)
            if value is None and spec.optional:
                continue
            out[spec.name] = spec.codec.to_json(value)
        return out

    @classmethod
    def from_json(cls, obj: Any, where: str | None = None) -> Self:
        return cls._build(obj, where, lambda codec, value, name: codec.from_json(value, name))

    @classmethod
    def _build(
        cls, obj: Any, where: str | None, convert: Callable[[Codec, Any, str], Any]
    ) -> Self:
        label = where or cls.__name__
        if not isinstance(obj, Mapping):
            raise PayloadDecodeError(f"{label}: expected a map, got {_show(obj)}")
        values = _text_keys(obj)
        kwargs: dict[str, Any] = {}
        for spec in cls._fields():
            name = f"{label}.{spec.name}"
            value = values.get(spec.name, _REQUIRED)
            if value is _REQUIRED or (value is None and spec.optional):
                if spec.optional:
                    kwargs[spec.name] = None
                elif spec.default is not _REQUIRED:
                    kwargs[spec.name] = spec.default
                else:
                    raise PayloadDecodeError(f"{name}: missing field")
                continue
            kwargs[spec.name] = convert(spec.codec, value, name)
        return cls(**kwargs)

    # --- bytes ------------------------------------------------------------------------------

    def encode(self) -> bytes:
        try:
            return cbor2.dumps(self.to_wire())
        except PayloadEncodeError:
            raise
        except (cbor2.CBOREncodeError, ValueError, TypeError, OverflowError) as exc:
            raise PayloadEncodeError(f"{type(self).__name__}: {exc}") from None

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> Self:
        return cls.from_wire(load_cbor(data), cls.__name__)


def load_cbor(data: bytes | bytearray | memoryview) -> Any:
    """Decode the first CBOR item of ``data`` (trailing bytes ignored, as ciborium does).

    cbor2 bounds nesting depth and never preallocates from a claimed length, so hostile input
    costs at most a constant factor of its own size. Any failure is a PayloadDecodeError.
    """
    if not data:
        raise PayloadDecodeError("empty payload: expected a CBOR item")
    try:
        # loads is the same decoder at half the cost of one over a BytesIO (a media block).
        return cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise PayloadDecodeError(f"invalid CBOR: {exc}") from None


def _text_keys(obj: Mapping[Any, Any]) -> dict[str, Any]:
    """ciborium accepts byte-string map keys too; normalise them to text."""
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if isinstance(key, bytes):
            try:
                key = key.decode()
            except UnicodeDecodeError:
                continue
        if isinstance(key, str) and key not in out:
            out[key] = value
    return out


def _show(value: Any) -> str:
    """A short description of a wrong value, for an error message. Hostile input must not make
    this fail: containers and tags may nest thousands deep (repr would recurse), and repr
    refuses integers of more than 4300 digits (CBOR bignums)."""
    if isinstance(value, list | tuple | dict):
        return f"{type(value).__name__} of {len(value)} items"
    if isinstance(value, cbor2.CBORTag):
        return f"CBOR tag {value.tag}"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        return type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."
