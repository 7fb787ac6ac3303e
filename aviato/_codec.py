"""Dataclass trees <-> plain msgpack values, with every field's type checked.

Used by :mod:`aviato.protocol`. Each dataclass gets an encoder and a checking
decoder built once from its annotations (compiled closures), so the per-message
cost is a few dict operations per field rather than a walk over type hints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import operator
import reprlib
import types
import typing
from collections.abc import Callable
from typing import Any

__all__ = [
    "CodecError",
    "Convert",
    "brief",
    "decoder",
    "encode_value",
    "fast_path",
    "generic_decoder",
    "generic_encoder",
]

Convert = Callable[[Any], Any]


class CodecError(ValueError):
    """A value does not match its annotation; ``path`` says where."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.path = path

    def within(self, name: str) -> CodecError:
        path = (
            f"{name}.{self.path}"
            if self.path and not self.path.startswith("[")
            else (f"{name}{self.path}")
        )
        return CodecError(self.message, path)

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class _Brief(reprlib.Repr):
    def __init__(self) -> None:
        super().__init__()
        self.maxstring = self.maxother = 60

    def repr_bytes(self, x: bytes, level: int) -> str:
        return self.repr_str(x, level)  # type: ignore[arg-type]  # slices first: works on bytes


_BRIEF = _Brief()


def brief(value: Any) -> str:
    """``repr(value)`` cut short: a peer's value echoed in an error (and the log) must
    not be its megabytes back again, four times over for bytes."""
    return _BRIEF.repr(value)


def _expected(what: str, value: Any) -> CodecError:
    return CodecError(f"expected {what}, got {type(value).__name__}")


_DECODERS: dict[Any, Convert] = {}
_ENCODERS: dict[type, Convert] = {}


#: Hand-built fast paths (see ``fast_path``), by the type they decode or encode.
_FAST_DECODERS: dict[Any, Callable[[Convert], Convert]] = {}


def decoder(tp: Any) -> Convert:
    """The checking converter for annotation ``tp`` (built once, then cached)."""
    found = _DECODERS.get(tp)
    if found is None:
        found = _build_decoder(tp)
        fast = _FAST_DECODERS.get(tp)
        if fast is not None:
            found = fast(found)
        _DECODERS[tp] = found
    return found


def fast_path(cls: type, *, decode: Callable[[Convert], Convert], encode: Convert) -> None:
    """Hand-built converters for a record on every message's path (a call's header and
    outcome), for a fraction of the generic walk's cost. ``decode(checked)`` returns the
    decoder: it reads the one shape the sender makes and hands any other value to
    ``checked``, the generic decoder, to accept or refuse; ``encode`` gives what the
    generic encoder gives. Both must agree with the generic ones exactly (their tests
    check it). Called where ``cls`` is defined, before any message is decoded."""
    _FAST_DECODERS[cls] = decode
    _DECODERS.pop(cls, None)
    _ENCODERS[cls] = encode


def generic_decoder(tp: Any) -> Convert:
    """The generic checking converter for ``tp``, fast path or not (for tests)."""
    return _build_decoder(tp)


def generic_encoder(cls: type) -> Convert:
    """The generic encoder for ``cls``, fast path or not (for tests)."""
    return _build_encoder(cls)


def _build_decoder(tp: Any) -> Convert:
    if tp is Any:
        return lambda v: v
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _dataclass_decoder(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _union_decoder(typing.get_args(tp))
    if origin is tuple:
        item = decoder(typing.get_args(tp)[0])

        def tuple_(value: Any) -> Any:
            if type(value) is not list and type(value) is not tuple:
                raise _expected("a list", value)
            out = []
            for i, v in enumerate(value):
                try:
                    out.append(item(v))
                except CodecError as exc:
                    raise exc.within(f"[{i}]") from None
            return tuple(out)

        return tuple_
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        key, val = decoder(key_tp), decoder(val_tp)

        def dict_(value: Any) -> Any:
            if type(value) is not dict:
                raise _expected("a map", value)
            out = {}
            for k, v in value.items():
                try:
                    out[key(k)] = val(v)
                except CodecError as exc:
                    raise exc.within(f"[{brief(k)}]") from None
            return out

        return dict_
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        enum_tp = tp
        # A dict lookup first, as ``enum_tp(value)`` starts with (EnumType.__call__
        # costs ~1 us, and enums are in every call's header and outcome); anything it
        # does not find still goes through the call, so what is accepted is unchanged.
        members: dict[Any, Any] = {}
        for member in enum_tp:
            with contextlib.suppress(TypeError):  # an unhashable value: the call finds it
                members[member.value] = member

        def enum_(value: Any) -> Any:
            try:
                found = members.get(value)
            except TypeError:
                found = None
            if found is not None:
                return found
            try:
                return enum_tp(value)
            except ValueError:
                raise CodecError(f"{brief(value)} is not a {enum_tp.__name__}") from None

        return enum_
    if tp is float:

        def float_(value: Any) -> Any:
            if type(value) is float:
                return value
            if type(value) is int:
                return float(value)
            raise _expected("a number", value)

        return float_
    if tp is int:

        def int_(value: Any) -> Any:
            if type(value) is int:
                return value
            raise _expected("an integer", value)

        return int_
    if tp in (str, bool, bytes):
        exact = tp

        def exact_(value: Any) -> Any:
            if type(value) is exact:
                return value
            raise _expected(exact.__name__, value)

        return exact_
    raise TypeError(f"no wire decoder for {tp!r}")


def _union_decoder(args: tuple[Any, ...]) -> Convert:
    optional = type(None) in args
    options = [decoder(a) for a in args if a is not type(None)]

    def union(value: Any) -> Any:
        if value is None and optional:
            return None
        errors = []
        for option in options:
            try:
                return option(value)
            except CodecError as exc:
                errors.append(str(exc))
        raise CodecError("; ".join(errors) or f"unexpected {brief(value)}")

    return union


def _dataclass_decoder(cls: type) -> Convert:
    hints = typing.get_type_hints(cls)
    fields: dict[str, Convert] = {}

    def lazy(name: str) -> Convert:
        # Built on first use: dataclasses may refer to each other.
        def convert(value: Any) -> Any:
            real = decoder(hints[name])
            fields[name] = real
            return real(value)

        return convert

    for f in dataclasses.fields(cls):
        fields[f.name] = lazy(f.name)

    def dataclass_(value: Any) -> Any:
        if type(value) is not dict:
            raise _expected("a map", value)
        kwargs = {}
        for k, v in value.items():
            convert = fields.get(k)
            if convert is None:
                raise CodecError(f"unknown field {brief(k)}")
            try:
                kwargs[k] = convert(v)
            except CodecError as exc:
                raise exc.within(k) from None
        try:
            return cls(**kwargs)
        except TypeError as exc:  # a required field is missing
            raise CodecError(str(exc)) from None

    return dataclass_


_PLAIN = frozenset({str, int, float, bool, bytes, type(None)})
#: An enum member's value: the attribute ``Enum.value`` reads, without its descriptor.
_enum_value = operator.attrgetter("_value_")


def encode_value(value: Any) -> Any:
    """A dataclass tree as plain msgpack-able values (enums become their values)."""
    encoder = _ENCODERS.get(type(value))
    if encoder is None:
        encoder = _ENCODERS[type(value)] = _build_encoder(type(value))
    return encoder(value)


def _build_encoder(cls: type) -> Convert:
    if dataclasses.is_dataclass(cls):
        names = [f.name for f in dataclasses.fields(cls)]

        def dataclass_(value: Any) -> Any:
            out = {}
            for name in names:
                v = getattr(value, name)
                # Most fields are plain values: no lookup, no call (this is per message).
                out[name] = v if type(v) in _PLAIN else encode_value(v)
            return out

        return dataclass_
    if issubclass(cls, enum.Enum):
        return _enum_value
    if cls in (tuple, list):
        return lambda value: [encode_value(v) for v in value]
    if cls is dict:
        return lambda value: {k: encode_value(v) for k, v in value.items()}
    return lambda value: value
