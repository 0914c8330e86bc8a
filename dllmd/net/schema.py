"""Typed wire payloads: each operation's arguments *and* its reply are dataclasses, checked field by field.

``parse_args(SomeArgs, header["args"])`` rejects unknown fields, missing required fields, wrong
types (a bool is not an int; an int is accepted where a float is expected) and values outside the
bounds a field declares with ``bounded(lo, hi)`` (numbers) or ``max_len`` (strings and lists). A
node parses what a caller sends with it, and a caller parses the reply with it (``parse_reply``):
a client trusts a node no more than a node trusts a client.

An :class:`Op` declares an operation once, for both ends: its name, its arguments and its reply.
The daemon registers a handler for it, the client calls it (``RpcClient.invoke``).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from dllmd.net.wire import ErrorCode, WireError

T = TypeVar("T")
A = TypeVar("A")
R = TypeVar("R")


@dataclass
class NoArgs:
    """The arguments (or the reply) of an operation that takes (or says) nothing."""


@dataclass(frozen=True)
class Op(Generic[A, R]):
    """One operation of the protocol, declared once: what it is called, takes and answers."""

    name: str
    args: type[A]
    reply: type[R]


def bounded(default: Any = dataclasses.MISSING, *, lo: float | None = None, hi: float | None = None,
            max_len: int | None = None) -> Any:
    """A dataclass field with validation bounds."""
    meta = {"lo": lo, "hi": hi, "max_len": max_len}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _check(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check(value, option, path)
            except WireError as exc:
                errors.append(exc.message)
        raise WireError(ErrorCode.BAD_ARGS, errors[0] if errors else f"{path}: bad value")
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise WireError(ErrorCode.BAD_ARGS, f"{path} must be a boolean, got {type(value).__name__}")
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise WireError(ErrorCode.BAD_ARGS, f"{path} must be an integer, got {type(value).__name__}")
        return value
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise WireError(ErrorCode.BAD_ARGS, f"{path} must be a number, got {type(value).__name__}")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise WireError(ErrorCode.BAD_ARGS, f"{path} must be finite")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise WireError(ErrorCode.BAD_ARGS, f"{path} must be a string, got {type(value).__name__}")
        return value
    if tp is bytes:
        if not isinstance(value, bytes):
            raise WireError(ErrorCode.BAD_ARGS, f"{path} must be binary, got {type(value).__name__}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise WireError(ErrorCode.BAD_ARGS, f"{path} must be a list, got {type(value).__name__}")
        return [_check(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        key_tp, val_tp = typing.get_args(tp) or (str, Any)
        if not isinstance(value, dict):
            raise WireError(ErrorCode.BAD_ARGS, f"{path} must be a map, got {type(value).__name__}")
        return {_check(k, key_tp, f"{path} key"): _check(v, val_tp, f"{path}[{k!r}]") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise WireError(ErrorCode.BAD_ARGS, f"{path} must be a map, got {type(value).__name__}")
        return _parse(tp, value, path + ".")
    raise TypeError(f"schema type {tp!r} is not supported")  # a programming error, not bad input


def _bounds(value: Any, meta: typing.Mapping[str, Any], path: str) -> None:
    lo, hi, max_len = meta.get("lo"), meta.get("hi"), meta.get("max_len")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if lo is not None and value < lo:
            raise WireError(ErrorCode.BAD_ARGS, f"{path} must be >= {lo}, got {value}")
        if hi is not None and value > hi:
            raise WireError(ErrorCode.BAD_ARGS, f"{path} must be <= {hi}, got {value}")
    if max_len is not None and isinstance(value, (str, bytes, list, dict)) and len(value) > max_len:
        raise WireError(ErrorCode.BAD_ARGS, f"{path} is longer than {max_len}")


@functools.cache
def _schema(cls: type) -> tuple[dict[str, Any], dict[str, dataclasses.Field]]:
    """Type hints and fields of a payload class, resolved once (get_type_hints is slow)."""
    return typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}


def _parse(cls: type[T], data: dict, prefix: str) -> T:
    hints, fields = _schema(cls)
    unknown = [str(k) for k in data if k not in fields]
    if unknown:
        raise WireError(ErrorCode.BAD_ARGS, f"unknown argument(s) {', '.join(prefix + u for u in sorted(unknown))}")
    values = {}
    for name, f in fields.items():
        path = prefix + name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise WireError(ErrorCode.BAD_ARGS, f"missing argument {path}")
            continue
        value = _check(data[name], hints[name], path)
        _bounds(value, f.metadata, path)
        values[name] = value
    return cls(**values)


def parse_args(cls: type[T], data: dict) -> T:
    """Build ``cls`` from a wire map, or raise WireError(BAD_ARGS) saying which field is wrong."""
    return _parse(cls, data, "")


def parse_reply(cls: type[T], data: dict) -> T:
    """Build a reply ``cls`` from a node's result map, or raise WireError(BAD_MESSAGE) saying which field is wrong.
    ``dict`` takes the map as it is (operations whose replies are not typed yet)."""
    if cls is dict:
        if not isinstance(data, dict):
            raise WireError(ErrorCode.BAD_MESSAGE, "malformed reply: not a map")
        return data
    try:
        return _parse(cls, data, "")
    except WireError as exc:
        raise WireError(ErrorCode.BAD_MESSAGE, f"malformed reply: {exc.message}") from None


def to_wire(obj: Any) -> dict:
    """A payload dataclass as a plain map for msgpack."""
    return dataclasses.asdict(obj)
