"""Config schemas as nested dataclasses: one place for names, types, ranges and defaults.

A loader's configuration is a frozen dataclass whose fields carry their YAML names, their
defaults and, in ``metadata``, their checks (``range``, ``positive``, ``choices``, ``pattern``,
``nonempty``, ``min_items``/``max_items``, ``doc``; ``parser``: a block checked by its own
``parser(value, key_path) -> (value, errors)``). Fields may be nested dataclasses, lists of
them (``sources[0].kind``), mappings of them (``fields.<name>.unit``) or a scalar shorthand
beside one (``str | Conversion``: a name or a mapping); a field without a default
(:data:`REQUIRED`) must be given. What a block's options say about each other is its
``problems(path)`` method, run after the fields parsed.
:func:`parse` turns a mapping into that dataclass and returns every problem with its key path
(``gaps.grace_s: must be a number in 0..2592000, got -1``), unknown keys included, so the
loader's ``validate()`` and ``start()`` read the same schema and cannot disagree.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

#: The default of an option that must be given (``option(REQUIRED)``; declare the dataclass
#: ``kw_only`` when such a field follows fields with defaults).
REQUIRED: Any = dataclasses.MISSING


def option(default: Any, *, doc: str = "", **checks: Any) -> Any:
    """A dataclass field with its default and checks (``range=(lo, hi)``, ``positive=True``,
    ``choices=(...)``, ``pattern=r"..."``, ``nonempty=True``, ``min_items``/``max_items`` and
    ``items_doc`` for lists); mutable defaults (mappings) are copied per instance;
    :data:`REQUIRED` makes the option mandatory."""
    meta = {"doc": doc, **checks}
    if default is REQUIRED:
        return dataclasses.field(metadata=meta)
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return dataclasses.field(default_factory=default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def number_error(
    value: Any,
    name: str,
    *,
    integer: bool = False,
    lo: float | None = None,
    hi: float | None = None,
    positive: bool = False,
) -> str | None:
    """The one number check of every config: None when ``value`` is a number (an integer when
    ``integer``; never a bool) within ``lo..hi`` (above 0 when ``positive``), else the error
    naming ``name``."""
    kinds = (int,) if integer else (int, float)
    what = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, kinds):
        return f"{name}: must be {what}, got {value!r}"
    if positive and value <= 0:
        return f"{name}: must be a positive number, got {value!r}"
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        lo_s = "" if lo is None else f"{lo:g}"
        hi_s = "" if hi is None else f"{hi:g}"
        return f"{name}: must be {what} in {lo_s}..{hi_s}, got {value!r}"
    return None


def unknown_options(keys: Iterable[Any], known: Collection[Any], path: str = "") -> list[str]:
    """The one unknown-key check of every config: an error naming the key path of each of
    ``keys`` not in ``known``."""
    prefix = f"{path}." if path else ""
    return [f"{prefix}{k}: unknown option" for k in keys if k not in known]


def mappings(
    items: list[Any], where: str, known: Collection[str], error: type[Exception]
) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Each mapping of a config list with its key path (``<where>[i]``); raises ``error``
    naming the path of an item that is not a mapping or has a key not in ``known``."""
    for i, item in enumerate(items):
        path = f"{where}[{i}]"
        if not isinstance(item, Mapping):
            raise error(f"{path}: must be a mapping")
        unknown = unknown_options(item, known, path)
        if unknown:
            raise error(f"{unknown[0]} (known: {', '.join(known)})")
        yield path, item


def _check(value: Any, kind: Any, name: str, meta: Mapping[str, Any]) -> tuple[Any, str | None]:
    """``(converted value, None)`` or ``(None, error)`` for one scalar option."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None, None
        inner = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(inner) == 1:  # ``X | None``: X's own error, with its item's key path
            return _check(value, inner[0], name, meta)
        errors = []
        for arg in (a for a in typing.get_args(kind) if a is not type(None)):
            got, err = _check(value, arg, name, meta)
            if err is None:
                return got, None
            errors.append(err.split(": ", 1)[1].removeprefix("must be "))
        return None, f"{name}: must be " + " or ".join(dict.fromkeys(errors))
    if origin is list:
        (item,) = typing.get_args(kind)
        err = _list_error(value, name, meta)
        if err:
            return None, err
        out = []
        for i, v in enumerate(value):
            got, err = _check(v, item, f"{name}[{i}]", meta)
            if err:
                return None, err
            out.append(got)
        return out, None
    if kind is bool:
        if not isinstance(value, bool):
            return None, f"{name}: must be true or false"
    elif kind in (int, float):
        lo, hi = meta.get("range", (None, None))
        positive = bool(meta.get("positive"))
        err = number_error(value, name, integer=kind is int, lo=lo, hi=hi, positive=positive)
        if err:
            return None, err
        value = kind(value)
    elif kind is str:
        if meta.get("nonempty") and (not isinstance(value, str) or not value):
            return None, f"{name}: must be a non-empty string"
        if not isinstance(value, str):
            return None, f"{name}: must be a string"
        if "pattern" in meta and not re.fullmatch(meta["pattern"], value):
            why = meta.get("pattern_doc", "does not match " + meta["pattern"])
            return None, f"{name}: {why}, got {value!r}"
    elif typing.get_origin(kind) in (dict, Mapping) or kind in (dict, Mapping):
        if not isinstance(value, Mapping):
            return None, f"{name}: must be a mapping"
        value = dict(value)
    if "choices" in meta and value not in meta["choices"]:
        choices = ", ".join(repr(c) for c in meta["choices"])
        return None, f"{name}: must be one of {choices}, got {value!r}"
    return value, None


def _list_error(value: Any, name: str, meta: Mapping[str, Any]) -> str | None:
    """The error of a list option that is not a list or has too few or too many items."""
    lo, hi = meta.get("min_items", 1), meta.get("max_items")
    if isinstance(value, list) and len(value) >= lo and (hi is None or len(value) <= hi):
        return None
    what = f" of {meta['items_doc']}" if "items_doc" in meta else ""
    if hi is not None:
        return f"{name}: must be a list of at most {hi}{what.removeprefix(' of')}"
    return f"{name}: must be a {'non-empty ' if lo else ''}list{what}"


def _has_block(kind: Any) -> bool:
    """Whether ``kind`` is, or holds, a dataclass (parsed by :func:`_value`, not ``_check``)."""
    if dataclasses.is_dataclass(kind):
        return True
    return any(_has_block(a) for a in typing.get_args(kind))


def _value(kind: Any, value: Any, key: str, meta: Mapping[str, Any]) -> tuple[Any, list[str]]:
    """One option's value: ``(converted, [])`` or ``(None, errors)`` naming their key paths."""
    if not _has_block(kind):
        got, err = _check(value, kind, key, meta)
        return got, [err] if err else []
    if dataclasses.is_dataclass(kind):
        return parse(kind, value, key)  # type: ignore[arg-type]
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None, []
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:  # ``list[Block] | None``
            return _value(inner[0], value, key, meta)
        blocks = [a for a in inner if dataclasses.is_dataclass(a)]
        others = [a for a in inner if a not in blocks]
        if isinstance(value, Mapping) or not others:
            return parse(blocks[0], value, key)  # type: ignore[arg-type]
        scalar = others[0] if len(others) == 1 else typing.Union[tuple(others)]  # noqa: UP007
        got, err = _check(value, scalar, key, meta)
        if err and not isinstance(value, str):
            err += " or a mapping"
        return got, [err] if err else []
    if origin is list:
        err = _list_error(value, key, meta)
        if err:
            return None, [err]
        out, errors = [], []
        for i, item in enumerate(value):
            got, errs = _value(args[0], item, f"{key}[{i}]", {})
            out.append(got)
            errors += errs
        return (None if errors else out), errors
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            return None, [f"{key}: must be a mapping"]
        items, errors = {}, []
        for name, item in value.items():
            got, errs = _value(args[1], item, f"{key}.{name}", {})
            items[str(name)] = got
            errors += errs
        return (None if errors else items), errors
    raise TypeError(f"{key}: unsupported option type {kind!r}")


def parse(cls: type[T], data: Any, path: str = "") -> tuple[T | None, list[str]]:
    """``(instance, [])`` or ``(None, errors)``; every error names its key path."""
    where = path or "configuration"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        return None, [f"{where}: must be a mapping"]
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    errors = unknown_options(data, fields, path)
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                errors.append(f"{key}: required")
            continue
        kind = hints[name]
        if "parser" in f.metadata and data[name] is not None:  # a block with its own parser
            value, errs = f.metadata["parser"](data[name], key)
        elif _has_block(kind) and data[name] is None and type(None) not in typing.get_args(kind):
            value, errs = _value(kind, {} if dataclasses.is_dataclass(kind) else None, key, {})
        else:
            value, errs = _value(kind, data[name], key, f.metadata)
        errors += errs
        kwargs[name] = value
    if errors:
        return None, errors
    out = cls(**kwargs)
    problems = getattr(out, "problems", None)
    errors = problems(path) if callable(problems) else []
    return (None, errors) if errors else (out, [])


def parse_items(
    cls: type[T], data: Any, path: str, **checks: Any
) -> tuple[list[T] | None, list[str]]:
    """A list option of ``cls`` blocks on its own (``sources``, ``topics``): the parsed items or
    every problem with its key path (``sources[0].kind: ...``)."""
    return _value(list[cls], data, path, checks)  # type: ignore[valid-type]


def parse_loader_config(cls: type[T], config: Any) -> tuple[T | None, list[str]]:
    """A loader's whole configuration (Salt hands it over as a mapping): :func:`parse`, but
    anything else, None included, is refused."""
    if not isinstance(config, Mapping):
        return None, ["configuration must be a mapping"]
    return parse(cls, config)


def verdict(
    label: str, parse_fn: Callable[[Any], tuple[Any, list[str]]], config: Any
) -> tuple[bool, str]:
    """What a loader's ``validate()`` returns: ``(True, "valid")`` or ``(False, "<label>: <every
    problem with its key path>")``; never raises."""
    try:
        _, errors = parse_fn(config)
    except Exception as exc:  # validate() never raises
        return False, f"{label}: invalid configuration: {exc}"
    if errors:
        return False, f"{label}: " + "; ".join(errors)
    return True, "valid"


def defaults(cls: type[Any]) -> dict[str, Any]:
    """The schema's defaults as the mapping a YAML example would hold."""
    return dataclasses.asdict(cls())


@dataclasses.dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff between retries (shared by the relay and the uplink)."""

    min_s: float = option(0.5, range=(0.01, 3600), doc="first retry delay after a failure")
    max_s: float = option(30.0, range=(0.01, 86400), doc="cap of the exponential backoff")
