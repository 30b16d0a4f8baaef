"""The fields of the frozen config dataclasses (model configs, ``GenerationConfig``, the run config), checked one way.

Does a value fit its field's annotation, as JSON gives values; how the annotation reads in a message; which names
are no field, with their close matches; ``replace`` with names that a config keeps in its ``extra`` mapping; and
the conversions between JSON lists and the tuples that keep a config hashable (configs are static jit arguments).

Each config family raises its own error class with the messages built here, so that a wrong type or a misspelt
name reads alike everywhere: it names the field and what would fit.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

__all__ = ["field_types", "has_type", "type_name", "wrong_type", "check_types", "unknown_names", "replace", "frozen",
           "to_json", "assigned_through_replace"]


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """``field name -> annotated type`` of a dataclass (annotations resolved once per class)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def has_type(value: Any, expected: Any) -> bool:
    """Whether ``value`` fits the annotation ``expected``, as JSON values map to Python: ``int`` excludes bool,
    ``float`` accepts ints (exact), ``X | None`` accepts None, ``list[X]``, ``tuple[X, ...]`` and ``Sequence[X]`` a
    list or tuple of X, ``tuple[X, Y]`` one of two items, ``Mapping[K, V]`` a mapping of K to V."""
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (types.UnionType, typing.Union):
        return any(has_type(value, arg) for arg in args)
    if isinstance(origin, type) and issubclass(origin, Mapping):
        key_type, value_type = args or (Any, Any)
        return isinstance(value, Mapping) and all(has_type(k, key_type) and has_type(v, value_type)
                                                  for k, v in value.items())
    if isinstance(origin, type) and issubclass(origin, Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(has_type(item, arg) for item, arg in zip(value, args))
        return all(has_type(item, args[0] if args else Any) for item in value)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is Any:
        return True
    return isinstance(value, origin or expected)


def type_name(expected: Any) -> str:
    """The annotation as it is written: ``int``, ``int | None``, ``tuple[str, ...]``, ``Mapping[str, float]``."""
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (types.UnionType, typing.Union):
        return " | ".join(type_name(arg) for arg in args)
    if args:
        return f"{origin.__name__}[{', '.join(type_name(arg) for arg in args)}]"
    if expected is type(None):
        return "None"
    if expected is Ellipsis:
        return "..."
    return getattr(expected, "__name__", str(expected))


def wrong_type(name: str, value: Any, expected: Any) -> str:
    """The message for a value of ``name`` that does not fit its annotation ``expected``."""
    return f"{name} must be of type {type_name(expected)}, got {value!r} ({type(value).__name__})"


def check_types(config: Any, error: type[Exception]) -> None:
    """Raises ``error`` naming the first field of the dataclass ``config`` whose value does not fit its annotation."""
    for name, expected in field_types(type(config)).items():
        value = getattr(config, name)
        if not has_type(value, expected):
            raise error(f"field {wrong_type(name, value, expected)}")


def unknown_names(names: Iterable[str], known: Collection[str], show: Callable[[str], str] = repr) -> list[str]:
    """Each of ``names`` that is not in ``known``, written with ``show`` and followed by its closest known names
    (``'hidden_sizee' (did you mean 'hidden_size'?)``): a misspelt name comes with its fix."""
    described = []
    for name in names:
        if name in known:
            continue
        matches = difflib.get_close_matches(name, list(known))
        guess = f" (did you mean {' or '.join(map(show, matches))}?)" if matches else ""
        described.append(show(name) + guess)
    return described


def replace(config: Any, changes: Mapping[str, Any], kept_in_extra: Collection[str]) -> Any:
    """``dataclasses.replace(config, **changes)``, except that names of ``kept_in_extra`` that are no field go into
    the config's ``extra`` mapping. The caller refuses the other unknown names first (:func:`unknown_names`)."""
    names = {f.name for f in dataclasses.fields(config)}
    aside = {k: v for k, v in changes.items() if k not in names and k in kept_in_extra}
    updates = {k: v for k, v in changes.items() if k not in aside}
    if aside:
        updates["extra"] = {**config.extra, **aside}
    return dataclasses.replace(config, **updates)


def frozen(value: Any) -> Any:
    """Lists (JSON's) as tuples, nested ones too, so that a config holding them stays hashable."""
    return tuple(frozen(item) for item in value) if isinstance(value, (list, tuple)) else value


def to_json(value: Any) -> Any:
    """What ``json.dumps`` writes: tuples as lists and mappings as dicts, nested ones too."""
    if isinstance(value, Mapping):
        return {key: to_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(item) for item in value]
    return value


def assigned_through_replace(holder: str) -> Callable[[type], type]:
    """A class decorator for a frozen dataclass (placed above ``@dataclass``): assigning a field raises
    ``dataclasses.FrozenInstanceError`` with the fix, ``<holder> = <holder>.replace(field=value)``, where
    transformers' mutable configs would take the assignment."""

    def refuse(self, name: str, value: Any) -> None:
        kind = type(self).__name__
        raise dataclasses.FrozenInstanceError(
            f"cannot assign {kind}.{name}: jaxencdec's configs are frozen (hashable, so that jitted functions can take "
            f"them as static arguments); use a changed copy: {holder} = {holder}.replace({name}={value!r})")

    def decorate(cls: type) -> type:
        cls.__setattr__ = refuse
        return cls

    return decorate
