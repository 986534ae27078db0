"""What the compare and sweep specs share: reading the YAML file, the checks of its top level
(a mapping of known keys with a ``base`` training config) and the key-naming errors."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from osmd_ray.config import read_text_file
from osmd_ray.errors import ConfigError

Fail = Callable[[str, str], ConfigError]


def read_spec(path: str, kind: str, example: str, error: type[ConfigError]) -> Any:
    """The parsed YAML of a ``kind`` spec ("compare spec", "sweep spec"); ``error`` names the
    file when it is missing, unreadable or not YAML."""
    text = read_text_file(path, kind, example, error)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise error(f"{kind} '{path}' is not valid YAML: {e}", "") from None


def spec_base(
    data: Any, path: str, keys: Sequence[str], kind: str, error: type[ConfigError], fail: Fail
) -> str:
    """Check that ``data`` is a mapping of ``keys`` with a ``base`` config; returns the base's
    resolved path."""
    if not isinstance(data, Mapping):
        raise error(
            f"{kind} '{path}' must be a mapping with keys {', '.join(keys)}; "
            f"got {type(data).__name__}",
            "",
        )
    reject_unknown(data, keys, "", fail, kind)
    if "base" not in data:
        raise fail("base", "is missing; name the training config, e.g. base: osmd_synth.yaml")
    return resolve_base(data["base"], path, fail)


def reject_unknown(
    mapping: Mapping[Any, Any], allowed: Sequence[str], prefix: str, fail: Fail, kind: str
) -> None:
    for key in mapping:
        if key not in allowed:
            where = f"{prefix}.{key}" if prefix else str(key)
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise fail(where, f"is not a {kind} key{hint}; valid: {', '.join(allowed)}")


def resolve_base(value: Any, spec_path: str, fail: Fail) -> str:
    """The base config's path: relative to the spec's folder, else to the working directory."""
    if not isinstance(value, str) or not value.strip():
        raise fail("base", f"must be the path of a training config; got {value!r}")
    candidates = [Path(spec_path).parent / value, Path(value)]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    tried = " or ".join(f"'{c}'" for c in candidates)
    raise fail("base", f"names {value!r}, which is not a file (looked for {tried})")
