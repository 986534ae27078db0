"""Typed run configuration (DESIGN §7): the schema, how a config is read, how it is checked.

- :mod:`~osmd_ray.config.schema`: one small dataclass per concern, a docstring per field, and
  the choices each string field accepts;
- :mod:`~osmd_ray.config.loading`: defaults, then a YAML file, then ``key.sub=value``
  overrides; YAML out that reads back equal;
- :mod:`~osmd_ray.config.validation`: types, values and contradictions, each error naming the
  dotted key (and the closest valid one, :mod:`~osmd_ray.config.keys`).

The names below are the package's public configuration API.
"""

from osmd_ray.config.loading import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dump_yaml,
    flatten_keys,
    load_config,
    read_text_file,
    save_config,
    saved_config_matches,
    saved_text_matches,
)
from osmd_ray.config.schema import (
    BaselineConfig,
    Config,
    DataConfig,
    LossConfig,
    ModelConfig,
    ScalingConfig,
    StorageConfig,
    TrackingConfig,
    TrainConfig,
)
from osmd_ray.config.validation import check_against_manifest, validate

__all__ = [
    "BaselineConfig",
    "Config",
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "ScalingConfig",
    "StorageConfig",
    "TrackingConfig",
    "TrainConfig",
    "apply_overrides",
    "check_against_manifest",
    "config_from_dict",
    "config_to_dict",
    "dump_yaml",
    "flatten_keys",
    "load_config",
    "read_text_file",
    "save_config",
    "saved_config_matches",
    "saved_text_matches",
    "validate",
]
