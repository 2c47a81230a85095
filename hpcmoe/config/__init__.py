"""Run configuration: one YAML file with sections model / parallel / run / output.

Pure Python (no torch, no MPI) so that a bad config fails in milliseconds, identically on
every rank, before any communicator or file exists. Every user error is a ValueError whose
one line names the key path, the value and what was expected.

The package holds the schema (schema.py: a frozen dataclass per section), the model presets
(presets.py), loading (load.py: YAML, --set overrides, a model resolved from a preset or a
checkpoint's config.json, typed sections) and the checks of relations between fields, one module
per section (model_checks.py, parallel_checks.py, run_checks.py). What the rest of hpcmoe reads
is imported here: `from hpcmoe.config import NAME`.
"""

from hpcmoe.config.load import apply_override, build_config, load_config, validate
from hpcmoe.config.presets import PRESETS
from hpcmoe.config.schema import (
    DTYPES,
    KILL_PHASES,
    LAYER_KILL_PHASES,
    MXFP4_BLOCK,
    Config,
    KillConfig,
    LinkConfig,
    ModelConfig,
    OutputConfig,
    ParallelConfig,
    RebalanceConfig,
    RunConfig,
    SamplingConfig,
    require,
)

__all__ = [
    "DTYPES",
    "KILL_PHASES",
    "LAYER_KILL_PHASES",
    "MXFP4_BLOCK",
    "PRESETS",
    "Config",
    "KillConfig",
    "LinkConfig",
    "ModelConfig",
    "OutputConfig",
    "ParallelConfig",
    "RebalanceConfig",
    "RunConfig",
    "SamplingConfig",
    "apply_override",
    "build_config",
    "load_config",
    "require",
    "validate",
]
