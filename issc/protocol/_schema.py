"""Checks wire values against dataclass type annotations, in both directions.

Every message field is described once, by its annotation; this module turns an
annotation into a ``Codec`` that validates a decoded msgpack value (and builds the
dataclass) or validates a dataclass before it is packed. Keeping the rules generic
means a new message or field cannot forget its validation.

Supported annotations: ``str``, ``int`` (not bool), ``float`` (int accepted; bool,
NaN and infinities refused), ``bool``, ``bytes``, ``X | None``, ``list[X]``, a
frozen dataclass whose fields are themselves supported, and ``Any`` (a JSON-like
value). Anything else is a programming error found at import time.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from typing import Any, Final, Union

MAX_STR_LEN: Final = 65_536
"""Longest ``str`` field, in characters (strings inside an ``Any`` value are bounded
only by the frame size)."""

MAX_LIST_LEN: Final = 100_000
"""Most items in a ``list`` field (lists inside an ``Any`` value are bounded only by
the frame size)."""

MAX_JSON_DEPTH: Final = 64
"""Deepest nesting of lists and maps inside an ``Any`` value: a scalar has depth 0,
``[]`` depth 1, ``[[1]]`` depth 2."""

MAX_INT: Final = 2**63 - 1
"""Largest ``int`` field: ids and counts must fit a signed 64-bit database column."""

# The range msgpack can carry at all; ints inside Any values outside it cannot be packed.
_MSGPACK_INT_MIN: Final = -(2**63)
_MSGPACK_INT_MAX: Final = 2**64 - 1

# Attacker-chosen strings end up in error messages and logs; keep them short.
_SHOW_MAX: Final = 60


class SchemaViolation(Exception):
    """A value does not match its declared type.

    ``location`` is filled in innermost-first as the error propagates out of nested
    containers, so the happy path never builds a path string.
    """

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem
        # Path parts, innermost first: a field name, or an already bracketed "[3]" / "['k']".
        self.location: list[str] = []

    def where(self) -> str:
        """The path of the offending value, e.g. ``tasks[3].lease``."""
        text = ""
        for part in reversed(self.location):
            text += part if part.startswith("[") or not text else f".{part}"
        return text


def show(value: object) -> str:
    """A short, safe rendering of a value for an error message."""
    text = repr(value)
    if len(text) > _SHOW_MAX:
        text = text[: _SHOW_MAX - 3] + "..."
    return text


def type_name(value: object) -> str:
    """The type of a value as an error message should name it."""
    name = type(value).__name__
    if name in ("Timestamp", "ExtType"):
        # Say why a msgpack extension value is refused, not just what it is.
        return f"msgpack extension type ({name})"
    return name


def _expected(what: str, value: object) -> SchemaViolation:
    return SchemaViolation(f"expected {what}, got {type_name(value)}")


class Codec:
    """Validates one annotated type; ``decode`` also converts wire form to Python form.

    ``passthrough`` is true when ``decode`` and ``encode`` return their argument
    unchanged, which lets a list of such values be checked without being copied.
    """

    passthrough: bool = True

    def decode(self, value: object) -> object:
        """Check a decoded msgpack value; return the Python value.

        Raises:
            SchemaViolation: the value does not match.
        """
        raise NotImplementedError

    def encode(self, value: object) -> object:
        """Check a Python value about to be packed; return its wire form.

        Raises:
            SchemaViolation: the value does not match.
        """
        raise NotImplementedError


class _StrCodec(Codec):
    def decode(self, value: object) -> object:
        # isinstance, not type(...) is: StrEnum members (ErrorCode) are valid strings.
        if not isinstance(value, str):
            raise _expected("str", value)
        if len(value) > MAX_STR_LEN:
            raise SchemaViolation(f"string of {len(value)} characters exceeds {MAX_STR_LEN}")
        return value

    encode = decode


class _IntCodec(Codec):
    def decode(self, value: object) -> object:
        # bool is an int subclass; a true/false where a count belongs is a bug.
        if not isinstance(value, int) or isinstance(value, bool):
            raise _expected("int", value)
        if not 0 <= value <= MAX_INT:
            raise SchemaViolation(f"int {show(value)} is outside 0..{MAX_INT}")
        return value

    encode = decode


class _FloatCodec(Codec):
    passthrough = False

    def encode(self, value: object) -> object:
        return self._check(value)

    def decode(self, value: object) -> object:
        # msgpack may carry 2.0 as the int 2; the dataclass promises a float.
        return float(self._check(value))

    @staticmethod
    def _check(value: object) -> int | float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _expected("float", value)
        if isinstance(value, float) and not math.isfinite(value):
            raise SchemaViolation(f"float {show(value)} is not finite")
        # Durations and intervals are never negative; refusing early keeps the hub's
        # arithmetic (credit, deadlines) free of surprises.
        if value < 0:
            raise SchemaViolation(f"float {show(value)} is negative")
        return value


class _BoolCodec(Codec):
    def decode(self, value: object) -> object:
        if not isinstance(value, bool):
            raise _expected("bool", value)
        return value

    encode = decode


class _BytesCodec(Codec):
    def decode(self, value: object) -> object:
        if not isinstance(value, bytes):
            raise _expected("bytes", value)
        return value

    encode = decode


class _OptionalCodec(Codec):
    def __init__(self, inner: Codec) -> None:
        self.inner = inner
        self.passthrough = inner.passthrough

    def decode(self, value: object) -> object:
        return None if value is None else self.inner.decode(value)

    def encode(self, value: object) -> object:
        return None if value is None else self.inner.encode(value)


class _ListCodec(Codec):
    def __init__(self, inner: Codec) -> None:
        self.inner = inner
        self.passthrough = inner.passthrough

    def _convert(self, value: object, convert: Callable[[object], object]) -> object:
        if not isinstance(value, list):
            raise _expected("list", value)
        if len(value) > MAX_LIST_LEN:
            raise SchemaViolation(f"list of {len(value)} items exceeds {MAX_LIST_LEN}")
        index = 0
        try:
            if self.passthrough:
                for index, item in enumerate(value):  # noqa: B007  # read in except
                    convert(item)
                return value
            converted: list[object] = []
            for index, item in enumerate(value):  # noqa: B007  # read in except
                converted.append(convert(item))
            return converted
        except SchemaViolation as violation:
            violation.location.append(f"[{index}]")
            raise

    def decode(self, value: object) -> object:
        return self._convert(value, self.inner.decode)

    def encode(self, value: object) -> object:
        return self._convert(value, self.inner.encode)


class _JsonCodec(Codec):
    """``Any``: None, bool, int, float, str, list, or map with str keys, nested <= 64."""

    def decode(self, value: object) -> object:
        _check_json(value, 0)
        return value

    encode = decode


def _check_json(value: object, depth: int) -> None:
    """Raise SchemaViolation unless ``value`` is JSON-like and shallow enough."""
    if value is None or isinstance(value, bool | str):
        return
    if isinstance(value, int):
        if not _MSGPACK_INT_MIN <= value <= _MSGPACK_INT_MAX:
            raise SchemaViolation(f"int {show(value)} does not fit in 64 bits")
        return
    if isinstance(value, float):
        # JSON has no NaN or infinity, and the outbox is JSON.
        if not math.isfinite(value):
            raise SchemaViolation(f"float {show(value)} is not finite")
        return
    if isinstance(value, list | dict):
        if depth >= MAX_JSON_DEPTH:
            raise SchemaViolation(f"value nested deeper than {MAX_JSON_DEPTH} levels")
        _check_json_container(value, depth + 1)
        return
    raise SchemaViolation(f"{type_name(value)} is not a JSON-like value")


def _check_json_container(value: list[object] | dict[object, object], depth: int) -> None:
    key: str | int = 0
    try:
        if isinstance(value, list):
            for key, item in enumerate(value):  # noqa: B007  # read in except
                _check_json(item, depth)
        else:
            for raw_key, item in value.items():
                if not isinstance(raw_key, str):
                    # msgpack's strict_map_key still lets bytes keys through.
                    raise SchemaViolation(f"map key {show(raw_key)} is not a str")
                key = raw_key
                _check_json(item, depth)
    except SchemaViolation as violation:
        violation.location.append(f"[{key if isinstance(key, int) else show(key)}]")
        raise


class StructCodec(Codec):
    """A dataclass, sent as a map of its fields (plus ``"t": tag`` for messages)."""

    passthrough = False

    def __init__(self, cls: type[Any], tag: str | None) -> None:
        self.cls = cls
        self.tag = tag
        hints = typing.get_type_hints(cls)
        self.fields: dict[str, Codec] = {
            field.name: codec_for(hints[field.name]) for field in dataclasses.fields(cls)
        }
        if "t" in self.fields:
            raise TypeError(f"{cls.__name__}: a field may not be called 't' (the tag key)")

    def decode(self, value: object) -> object:
        if not isinstance(value, dict):
            raise _expected("map", value)
        expected_keys = len(self.fields) + (self.tag is not None)
        if len(value) != expected_keys:
            # Name the first offender; which one is found first is the same every time
            # for the same input because dicts keep msgpack's order.
            self._raise_key_mismatch(value)
        kwargs: dict[str, object] = {}
        for name, codec in self.fields.items():
            if name not in value:
                self._raise_key_mismatch(value)
            try:
                kwargs[name] = codec.decode(value[name])
            except SchemaViolation as violation:
                violation.location.append(name)
                raise
        return self.cls(**kwargs)

    def _raise_key_mismatch(self, value: dict[Any, Any]) -> typing.NoReturn:
        for name in self.fields:
            if name not in value:
                raise SchemaViolation(f"missing field {name!r}")
        for key in value:
            if key not in self.fields and not (self.tag is not None and key == "t"):
                raise SchemaViolation(f"unexpected field {show(key)}")
        raise SchemaViolation("malformed map")  # unreachable for a dict; kept for mypy

    def encode(self, value: object) -> object:
        if not isinstance(value, self.cls):
            raise _expected(self.cls.__name__, value)
        wire: dict[str, object] = {} if self.tag is None else {"t": self.tag}
        for name, codec in self.fields.items():
            try:
                wire[name] = codec.encode(getattr(value, name))
            except SchemaViolation as violation:
                violation.location.append(name)
                raise
        return wire


_SCALARS: Final[dict[object, Codec]] = {
    str: _StrCodec(),
    int: _IntCodec(),
    float: _FloatCodec(),
    bool: _BoolCodec(),
    bytes: _BytesCodec(),
}


def codec_for(annotation: object) -> Codec:
    """Build the codec for one resolved type annotation.

    Raises:
        TypeError: the annotation is not one the wire format supports.
    """
    if annotation is Any:
        return _JsonCodec()
    scalar = _SCALARS.get(annotation)
    if scalar is not None:
        return scalar
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        others = [arg for arg in args if arg is not type(None)]
        if len(others) == 1 and len(args) == 2:
            return _OptionalCodec(codec_for(others[0]))
    elif origin is list and len(args) == 1:
        return _ListCodec(codec_for(args[0]))
    elif isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return StructCodec(annotation, tag=None)
    raise TypeError(f"unsupported wire type annotation: {annotation!r}")
