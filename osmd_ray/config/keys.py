"""Dotted config keys: their types and defaults read from the dataclasses, and the messages
that name a key (a wrong type, an unknown key and the closest valid one)."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from collections.abc import Sequence
from typing import Any

from osmd_ray.config.schema import (
    Config,
)
from osmd_ray.errors import ConfigError

_TYPE_NAMES = {
    bool: "true or false",
    int: "an integer",
    float: "a finite number",
    str: "a string",
}


def type_error(key: str, tp: Any, value: Any, fix: str = "") -> ConfigError:
    expected = _TYPE_NAMES.get(tp, "a list of strings, e.g. [rgb, depth]")
    example = format_value(default_of(key))
    if value is None and tp not in _TYPE_NAMES:
        fix += "; write [] for an empty list"
    return ConfigError(
        f"config key {key!r} expects {expected}; got {show_value(value)}. "
        f"Example: {key}={example} (the default){fix}",
        key,
    )


def unknown_key(key: str) -> ConfigError:
    parent, _, leaf = key.rpartition(".")
    # A right name in the wrong section (train.w_jan -> loss.w_jan) beats any near spelling.
    same_leaf = [k for k in all_keys() if k.rpartition(".")[2] == leaf]
    if same_leaf:
        hint = f" (did you mean {same_leaf[0]!r}?)"
    else:
        # Only keys at least as deep: 'loss.zzz' should not be answered with 'loss'.
        deep_enough = [k for k in all_keys() if k.count(".") >= key.count(".")]
        hint = did_you_mean(key, deep_enough)
    if not hint:
        children = [k.rpartition(".")[2] for k in all_keys() if k.rpartition(".")[0] == parent]
        if children:
            where = f"in section {parent!r}" if parent else "at the top level"
            hint = f"; valid keys {where}: {', '.join(children)}"
        else:
            hint = f"; {parent!r} is not a config section"
    return ConfigError(f"unknown config key {key!r}{hint}", key)


def did_you_mean(word: str, choices: Sequence[Any]) -> str:
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type (annotations are strings under ``from __future__``)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


@functools.cache
def all_keys(cls: type = Config, prefix: str = "") -> tuple[str, ...]:
    """Every dotted key, sections included: method, data, data.root, ..."""
    keys: list[str] = []
    for name, tp in field_types(cls).items():
        key = join_key(prefix, name)
        keys.append(key)
        if dataclasses.is_dataclass(tp):
            keys.extend(all_keys(tp, key))
    return tuple(keys)


def type_of(key: str) -> Any:
    """The declared type of a dotted key (a dataclass for a section)."""
    tp: Any = Config
    for depth, name in enumerate(key.split(".")):
        types = field_types(tp) if dataclasses.is_dataclass(tp) else {}
        if name not in types:
            raise unknown_key(".".join(key.split(".")[: depth + 1]))
        tp = types[name]
    return tp


def default_of(key: str) -> Any:
    value: Any = Config()
    for name in key.split("."):
        value = getattr(value, name)
    return value


def join_key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def format_value(value: Any) -> str:
    """A value as one would type it in an override."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return f"[{', '.join(value)}]"
    return str(value)


def show_value(value: Any) -> str:
    return f"{clip(value)} ({type(value).__name__})"


def clip(value: Any, limit: int = 60) -> str:
    """repr of a value, shortened so one pasted blob cannot flood the message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
