"""Typed experiment configuration: TOML files plus dotted command-line overrides.

Every component receives only its own section (``cfg.data`` goes to the data sources, ``cfg.optim``
to the optimizer, ...). Every section checks its values when it is built, and ``TrainConfig`` checks
what spans sections, so a bad config - read from a file or built in code - fails identically on every
rank, before any process group, DALI pipeline or file is touched, instead of hanging a collective.

A config file may start from another one: ``base = "_paper.toml"`` (a path relative to the file that
names it; bases may chain). The file's keys override the base's: tables are merged key by key, lists
and scalars replaced. The run is named by the file given (``name``, else its file name), never by a
base. ``--section.key=value`` overrides apply last. ``python -m pipeline.train --help-config`` prints
every key with its default and documentation, as TOML.

Datasets: ``python -m pipeline.tools.prepare`` builds an ImageNet tree (``data.root``, the per-pixel
``data.mean_image``), ``python -m pipeline.tools.validate`` lists the images DALI cannot decode
(``data.exclude_list``).

``schema`` holds the sections and ``TrainConfig``; ``loader`` the generic TOML-to-dataclass machinery they are
built with (it knows no section). ``ConfigError`` lives in ``pipeline.core.errors`` so that core needs no config.
"""

from pipeline.config.loader import (
    apply_override,
    check_numbers,
    describe_fields,
    describe_path,
    doc,
    flatten,
    from_table,
    merge_tables,
    param_value,
    read_config_file,
    read_toml,
    to_toml,
)
from pipeline.config.schema import (
    CheckpointConfig,
    DataConfig,
    DiagnosticsConfig,
    DistributedConfig,
    ModelConfig,
    OptimConfig,
    PrecisionConfig,
    ScheduleConfig,
    TrackingConfig,
    TrainConfig,
    config_from_dict,
    describe,
    load_config,
)
from pipeline.core.errors import ConfigError

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DiagnosticsConfig",
    "DistributedConfig",
    "ModelConfig",
    "OptimConfig",
    "PrecisionConfig",
    "ScheduleConfig",
    "TrackingConfig",
    "TrainConfig",
    "apply_override",
    "check_numbers",
    "config_from_dict",
    "describe",
    "describe_fields",
    "describe_path",
    "doc",
    "flatten",
    "from_table",
    "merge_tables",
    "param_value",
    "load_config",
    "read_config_file",
    "read_toml",
    "to_toml",
]
