"""Typed config schema over frozen dataclasses: load a TOML dict, report every error at once.

A section is a frozen dataclass whose fields are declared with `setting()`. Field types
supported: str, int, float, bool, Path, Secret, ByteSize, Literal of strings, list[T],
nested dataclasses (TOML tables) and `T | None`. A section may define
`validate(self) -> list[tuple[str, str]]` for cross-field rules; it runs only once the
section's own fields loaded cleanly. Modelled on Mopidy `config/schemas.py` + `types.py`.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")
Check = Callable[[Any], "str | None"]

MASK = "********"

# Distinguishes "this value failed" from a legitimately loaded None.
_INVALID: Any = object()


class ConfigError(ValueError):
    """One or more config errors, each "<key path>: <message>"; str() joins them by newlines."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = list(errors)


class Secret(str):
    """A str whose repr is masked, so a config logged or printed does not leak it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Secret({MASK!r})"


_BYTE_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}  # fmt: skip
_BYTE_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")


class ByteSize(int):
    """A non-negative byte count; built from an int or a string like "512 MiB", "2GB", "0"."""

    __slots__ = ()

    def __new__(cls, value: int | str) -> ByteSize:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"expected a byte size, got {type(value).__name__}")
        if isinstance(value, int):
            if value < 0:
                raise ValueError("must be >= 0")
            return super().__new__(cls, value)
        match = _BYTE_SIZE.fullmatch(value)
        # The "i" is what tells binary from decimal units, so only letter case is forgiven.
        unit = _BYTE_UNITS.get(match.group(2).lower()) if match else None
        if match is None or unit is None:
            raise ValueError(
                f"invalid byte size {value!r}: expected a number with an optional unit "
                "B, kB, MB, GB, TB, KiB, MiB, GiB or TiB"
            )
        try:
            size = Decimal(match.group(1)) * unit
        except InvalidOperation:  # pragma: no cover - the regex admits only decimals
            raise ValueError(f"invalid byte size {value!r}") from None
        if size != size.to_integral_value():
            raise ValueError(f"invalid byte size {value!r}: not a whole number of bytes")
        return super().__new__(cls, int(size))


def setting(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Any = dataclasses.MISSING,
    check: Check | None = None,
    doc: str = "",
) -> Any:
    """A dataclass field with a value check and a one-line doc; checks on list/optional
    fields apply to each item / the non-None value."""
    if check is not None and not callable(check):
        # Typically a field name shadowing the check function inside the class body.
        raise TypeError(f"check must be callable, got {check!r}")
    return dataclasses.field(
        default=default,
        default_factory=default_factory,
        metadata={"check": check, "doc": doc},
    )


# ---------------------------------------------------------------------------- checks
# Each check takes an already-typed value and returns an error message or None.


def in_range(low: float, high: float) -> Check:
    """Check: low <= value <= high."""

    def check(value: float) -> str | None:
        return None if low <= value <= high else f"must be {low}-{high}"

    return check


port_range = in_range(1, 65535)


def positive(value: float) -> str | None:
    """Check: value > 0."""
    return None if value > 0 else "must be > 0"


def non_negative(value: float) -> str | None:
    """Check: value >= 0."""
    return None if value >= 0 else "must be >= 0"


def one_of(*allowed: Any) -> Check:
    """Check: value is one of `allowed` (prefer Literal[...] for fixed string choices)."""

    def check(value: Any) -> str | None:
        if value in allowed:
            return None
        return "must be one of " + ", ".join(repr(a) for a in allowed)

    return check


_AE_CHARS = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")  # 0x20-0x7E minus 0x5C backslash


def ae_title(value: str) -> str | None:
    """Check: a valid AE value (PS3.5 Table 6.2-1: <=16 chars of the default repertoire,
    no backslash or control characters, not empty or only spaces)."""
    # Length counts the spaces too: leading/trailing spaces are non-significant but still
    # part of the 16-byte value, and pynetdicom validates it unstripped.
    if _AE_CHARS.fullmatch(value) and value.strip(" "):
        return None
    return (
        "must be 1-16 characters of the DICOM default repertoire, "
        "no backslash or control characters (PS3.5 AE)"
    )


def ip_address(value: str) -> str | None:
    """Check: an IPv4 or IPv6 address literal."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return "must be an IPv4 or IPv6 address"
    return None


_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _is_hostname(value: str) -> bool:
    name = value[:-1] if value.endswith(".") else value  # a trailing dot marks an FQDN
    labels = name.split(".")
    return (
        0 < len(name) <= 253
        and all(_LABEL.fullmatch(label) for label in labels)
        # RFC 3696 section 2: a TLD is never all-numeric, so "10.0.0.256" is a bad IP,
        # not a hostname.
        and not labels[-1].isdigit()
    )


def hostname_or_ip(value: str) -> str | None:
    """Check: an IPv4/IPv6 literal or an RFC 1123 hostname."""
    if ip_address(value) is None or _is_hostname(value):
        return None
    return "must be an IP address or a hostname (RFC 1123)"


def absolute_path(value: Path) -> str | None:
    """Check: an absolute path (services must not depend on their working directory)."""
    return None if value.is_absolute() else "must be an absolute path"


# ---------------------------------------------------------------------------- load

_EXPECTED = {
    str: "a string",
    Secret: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    Path: "a path string",
}


def _describe(value: Any, *, reveal: bool = True) -> str:
    """How a wrong value is named in an error; secrets are never echoed."""
    if isinstance(value, bool):
        kind = "boolean"
    elif isinstance(value, int):
        kind = "integer"
    elif isinstance(value, float):
        kind = "float"
    elif isinstance(value, str):
        kind = "string"
    elif isinstance(value, Mapping):
        return "table"
    elif isinstance(value, list | tuple):
        return "array"
    else:
        return type(value).__name__
    if not reveal:
        return kind
    return f"{kind} {str(value).lower() if isinstance(value, bool) else repr(value)}"


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _optional_arg(tp: Any) -> Any:
    """X for `X | None` / `Optional[X]`, else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
        raise TypeError(f"unsupported union in config schema: {tp!r}")
    return None


class _Loader:
    """One load pass: converts values and accumulates errors instead of stopping."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def fail(self, path: str, message: str) -> Any:
        self.errors.append(f"{path or '(root)'}: {message}")
        return _INVALID

    def section(self, cls: type, data: Any, path: str) -> Any:
        if not isinstance(data, Mapping):
            return self.fail(path, f"expected a table, got {_describe(data)}")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        hints = typing.get_type_hints(cls)
        before = len(self.errors)
        for key in data:
            if key not in fields:
                close = difflib.get_close_matches(str(key), list(fields), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.fail(_key(path, str(key)), f"unknown key{hint}")
        values: dict[str, Any] = {}
        for name, field in fields.items():
            key = _key(path, name)
            if name in data:
                values[name] = self.value(hints[name], data[name], key, field.metadata)
            elif field.default is dataclasses.MISSING and (
                field.default_factory is dataclasses.MISSING
            ):
                self.fail(key, "required")
        if len(self.errors) > before:
            return _INVALID
        obj = cls(**values)
        validate = getattr(obj, "validate", None)
        if callable(validate):
            for rel, message in validate():
                self.fail(_key(path, rel) if rel else path, message)
        return _INVALID if len(self.errors) > before else obj

    def value(self, tp: Any, raw: Any, path: str, meta: Mapping[str, Any]) -> Any:
        inner = _optional_arg(tp)
        if inner is not None:
            return None if raw is None else self.value(inner, raw, path, meta)
        if typing.get_origin(tp) is list:
            (item_tp,) = typing.get_args(tp)
            if not isinstance(raw, list | tuple):
                return self.fail(path, f"expected an array, got {_describe(raw)}")
            items = [self.value(item_tp, v, f"{path}[{i}]", meta) for i, v in enumerate(raw)]
            return _INVALID if any(v is _INVALID for v in items) else items
        if dataclasses.is_dataclass(tp):
            return self.section(tp, raw, path)  # a nested section validates itself
        value = self.scalar(tp, raw, path)
        check = meta.get("check")
        if value is not _INVALID and check is not None and (message := check(value)):
            return self.fail(path, message)
        return value

    def scalar(self, tp: Any, raw: Any, path: str) -> Any:
        if typing.get_origin(tp) is Literal:
            choices = typing.get_args(tp)
            if raw in choices and isinstance(raw, str):
                return raw
            names = ", ".join(repr(c) for c in choices)
            close = difflib.get_close_matches(raw, choices, n=1) if isinstance(raw, str) else []
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            return self.fail(path, f"expected one of {names}, got {_describe(raw)}{hint}")
        if tp is ByteSize:
            if isinstance(raw, bool) or not isinstance(raw, int | str):
                return self.fail(path, f"expected a byte size, got {_describe(raw)}")
            try:
                return ByteSize(raw)
            except ValueError as exc:
                return self.fail(path, str(exc))
        if tp not in _EXPECTED:
            raise TypeError(f"unsupported type in config schema at {path}: {tp!r}")
        # bool is an int subclass in Python but a different type in TOML: keep them apart.
        ok = {
            str: isinstance(raw, str),
            Secret: isinstance(raw, str),
            int: isinstance(raw, int) and not isinstance(raw, bool),
            float: isinstance(raw, int | float) and not isinstance(raw, bool),
            bool: isinstance(raw, bool),
            Path: isinstance(raw, str | Path),
        }[tp]
        if not ok:
            got = _describe(raw, reveal=tp is not Secret)
            return self.fail(path, f"expected {_EXPECTED[tp]}, got {got}")
        if tp is float and not math.isfinite(raw):
            return self.fail(path, f"expected a finite number, got {_describe(raw)}")
        return tp(raw)


def load(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Build `cls` from a TOML-like dict; raise ConfigError listing every error found."""
    loader = _Loader()
    obj = loader.section(cls, data, path)
    if loader.errors:
        raise ConfigError(loader.errors)
    return obj


# ---------------------------------------------------------------------------- dump


def _plain(value: Any, mask_secrets: bool) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dump(value, mask_secrets=mask_secrets)
    if isinstance(value, list | tuple):
        return [_plain(v, mask_secrets) for v in value if v is not None]
    if isinstance(value, Secret):
        return MASK if mask_secrets else str(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, ByteSize):
        return int(value)
    return value


def dump(obj: Any, *, mask_secrets: bool = True) -> dict[str, Any]:
    """`obj` as a plain TOML-able dict (None values omitted: TOML has no null)."""
    return {
        f.name: _plain(getattr(obj, f.name), mask_secrets)
        for f in dataclasses.fields(obj)
        if getattr(obj, f.name) is not None
    }


def describe(cls: type, path: str = "") -> list[tuple[str, str]]:
    """(key path, doc) for every setting of `cls`, nested tables included, in order."""
    hints = typing.get_type_hints(cls)
    out: list[tuple[str, str]] = []
    for f in dataclasses.fields(cls):
        key, tp = _key(path, f.name), hints[f.name]
        tp = _optional_arg(tp) or tp
        out.append((key, f.metadata.get("doc", "")))
        if typing.get_origin(tp) is list:
            (tp,) = typing.get_args(tp)
            key += "[]"
        if dataclasses.is_dataclass(tp):
            out.extend(describe(tp, key))
    return out
