"""Reading a config: dataclass defaults, then a YAML file, then ``key.sub=value`` overrides
(later wins), each layer type-checked as it is applied and the result validated once; and
writing it back as YAML that reads back equal.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import numbers
import os
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from osmd_ray import storage
from osmd_ray.config.keys import (
    clip,
    field_types,
    join_key,
    show_value,
    type_error,
    type_of,
    unknown_key,
)
from osmd_ray.config.schema import (
    Config,
)
from osmd_ray.config.validation import validate
from osmd_ray.errors import ConfigError


def load_config(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then ``key.sub=value`` overrides."""
    cfg = Config()
    if path is not None:
        cfg = _merge_file(cfg, Path(path))
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """A new validated Config: ``cfg`` with ``key.sub=value`` overrides applied in order.

    Values are parsed as YAML (``[rgb, depth]``, ``true``, ``1e-3``); a string field takes the
    text as written, so ``tracking.group=2024`` is the string "2024".
    """
    if isinstance(overrides, str):  # a lone string would otherwise be read letter by letter
        overrides = [overrides]
    cfg = copy.deepcopy(cfg)
    for text in overrides:
        key, value = _parse_override(text)
        *sections, name = key.split(".")
        nested: Any = {name: value}
        for section in reversed(sections):
            nested = {section: nested}
        with _source(f"override {clip(text)}"):
            cfg = _merge(cfg, nested, "")
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict of python scalars and lists (JSON and YAML serialisable)."""
    return dataclasses.asdict(cfg)


def flatten_keys(tree: Mapping[str, Any], sep: str = ".") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (or "a/b" with ``sep="/"``, as metrics are named)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}{sep}{k}": v for k, v in flatten_keys(value, sep).items()})
        else:
            flat[str(key)] = value
    return flat


def saved_config_matches(path: str | os.PathLike[str], cfg: Config) -> bool | None:
    """Whether the config saved at ``path`` (by :func:`save_config`) is exactly ``cfg``;
    None when there is no file. This is how a run folder is recognised as the same run."""
    try:
        saved = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    return saved_text_matches(saved, cfg)


def saved_text_matches(saved: str, cfg: Config) -> bool:
    """Whether saved config text describes ``cfg``: the same text, or a config that reads back
    equal, so a run folder written before a field was added (at its default) still resumes."""
    if saved == dump_yaml(cfg):
        return True
    try:
        data = yaml.safe_load(saved)
        return isinstance(data, dict) and config_from_dict(data) == cfg
    except (yaml.YAMLError, ConfigError):
        return False


def config_from_dict(d: Mapping[str, Any]) -> Config:
    """A validated Config from a (possibly partial) nested dict; missing keys keep defaults."""
    cfg = _merge(Config(), d, "")
    validate(cfg)
    return cfg


def dump_yaml(cfg: Config) -> str:
    """The config as YAML text that :func:`load_config` reads back to an equal Config."""
    # allow_unicode=False: PyYAML writes some characters (e.g. U+0085, a line break to its
    # reader) raw when allowed to, and the text would not load back equal. Escapes always do.
    return yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, allow_unicode=False)


class _Dumper(yaml.SafeDumper):
    """SafeDumper that writes sections as blocks and lists inline: ``ordinary: [rgb]``."""

    def represent_list(self, data: list[Any]) -> yaml.Node:
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)


_Dumper.add_representer(list, _Dumper.represent_list)


def save_config(cfg: Config, path: str | os.PathLike[str]) -> None:
    """Validate ``cfg`` and write it as YAML to ``path`` whole or not at all
    (:func:`osmd_ray.storage.write_bytes`), so a reader (or a crash) never sees half a file."""
    validate(cfg)
    storage.write_bytes(os.fspath(path), dump_yaml(cfg).encode("utf-8"))


def _merge(obj: Any, updates: Any, prefix: str) -> Any:
    """A copy of dataclass ``obj`` with the nested mapping ``updates`` applied and type-checked."""
    if updates is None:  # an empty section in YAML (`loss:` with every key commented out)
        return obj
    if not isinstance(updates, Mapping):
        where = f"config section {prefix!r}" if prefix else "the top level of a config"
        raise ConfigError(
            f"{where} must be a mapping of keys to values; got {show_value(updates)}", prefix
        )
    types = field_types(type(obj))
    changes = {}
    for name, value in updates.items():
        key = join_key(prefix, str(name))
        if name not in types:
            raise unknown_key(key)
        tp = types[name]
        if dataclasses.is_dataclass(tp):
            changes[name] = _merge(getattr(obj, name), value, key)
        else:
            changes[name] = _convert(value, tp, key)
    return dataclasses.replace(obj, **changes)


def _convert(value: Any, tp: Any, key: str) -> Any:
    """``value`` as the plain python type ``tp``, or a ConfigError naming ``key``."""
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        number = _as_number(value)
        if isinstance(number, int):
            return number
        if isinstance(number, float) and number.is_integer():
            return int(number)
    elif tp is float:
        number = _as_number(value)
        if number is not None:
            try:
                result = float(number)
            except OverflowError:  # an int too large for a float
                result = math.inf
            if math.isfinite(result):
                return result
    elif tp is str:
        if isinstance(value, str):
            return str(value)
    elif isinstance(value, str):  # list[str]: a lone name stands for a one-element list
        return [str(value)]
    elif isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        return [str(item) for item in value]
    raise type_error(key, tp, value)


def _as_number(value: Any) -> int | float | None:
    """Ints and floats as they are; numeric strings parsed (YAML 1.1 reads ``1e-3`` as text)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str) and value.strip().isascii():
        for parse in (int, float):
            with contextlib.suppress(ValueError):
                return parse(value.strip())
    return None


def read_text_file(
    path: str | os.PathLike[str],
    what: str,
    example: str,
    error: type[ConfigError] = ConfigError,
) -> str:
    """The UTF-8 text of ``path``; a missing or unreadable file is an ``error`` naming it as
    ``what`` (e.g. "config file") with ``example`` as a file to pass instead."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(
            f"{what} '{path}' does not exist; pass a YAML file such as {example}", ""
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{what} '{path}' cannot be read: {e}", "") from None


def _merge_file(cfg: Config, path: Path) -> Config:
    text = read_text_file(path, "config file", "configs/osmd_synth.yaml")
    try:
        duplicate = _find_duplicate_key(yaml.compose(text, Loader=_SafeLoader), "")
        data = yaml.load(text, Loader=_SafeLoader)
    except (yaml.YAMLError, RecursionError, UnicodeError) as e:
        raise ConfigError(
            f"config file '{path}' is not valid YAML: {_describe_yaml_error(e)}", ""
        ) from None
    if duplicate:
        key, line = duplicate
        raise ConfigError(
            f"config file '{path}' sets {key!r} twice (again on line {line}); keep one", key
        )
    with _source(f"config file '{path}'"):
        return _merge(cfg, data, "")


def _parse_override(text: str) -> tuple[str, Any]:
    """``key.sub=value`` -> (key, value parsed as YAML, or the raw text for a string field)."""
    if "=" not in text:
        raise ConfigError(
            f"override {text!r} has no '='; write key.sub=value, e.g. train.lr=1e-3",
            text.strip(),
        )
    key, raw = (part.strip() for part in text.split("=", 1))
    tp = type_of(key)  # unknown keys fail here, before the value is looked at
    try:
        value = yaml.load(raw, Loader=_SafeLoader)
    except (yaml.YAMLError, RecursionError, UnicodeError) as e:
        raise ConfigError(
            f"config key {key!r}: the value {clip(raw)} in override {clip(text)} is not "
            f"valid YAML ({_describe_yaml_error(e)}); quote strings that contain YAML syntax",
            key,
        ) from None
    if tp is str and not isinstance(value, str):
        # `tracking.group=2024` means the text "2024" (the shell ate any quotes), and
        # `model.image_encoder=timm:` the text "timm:", which validation then explains.
        value = raw
    return key, value


# libyaml's loader when PyYAML was built with it: the same safe schema, several times faster.
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _find_duplicate_key(node: yaml.Node | None, prefix: str) -> tuple[str, int] | None:
    """(dotted key, line) of the first key set twice in one mapping; safe_load keeps the last."""
    if not isinstance(node, yaml.MappingNode):
        return None
    seen = set()
    for key_node, value_node in node.value:
        key = join_key(prefix, str(key_node.value))
        if key in seen:
            return key, key_node.start_mark.line + 1
        seen.add(key)
        found = _find_duplicate_key(value_node, key)
        if found:
            return found
    return None


def _describe_yaml_error(e: BaseException) -> str:
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        mark = e.problem_mark
        return f"{e.problem} (line {mark.line + 1}, column {mark.column + 1})"
    if isinstance(e, RecursionError):
        return "nested too deeply"
    if isinstance(e, UnicodeError):
        return "it contains characters that are not valid text (UTF-8)"
    return " ".join(str(e).split())


@contextlib.contextmanager
def _source(where: str) -> typing.Iterator[None]:
    """Append where a value came from to ConfigErrors raised inside the block."""
    try:
        yield
    except ConfigError as e:
        raise ConfigError(f"{e} [in {where}]", e.key) from None
