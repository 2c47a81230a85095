"""From YAML to a validated Config: the file read, `a.b=value` overrides applied, the model section
resolved (a preset overlaid by what the user set, or a checkpoint's config.json), every section
built with its types checked (unknown keys and wrong types refused, naming the key), then the
relations between fields checked (validate).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Optional

import yaml

from hpcmoe.config.model_checks import validate_model
from hpcmoe.config.parallel_checks import validate_parallel
from hpcmoe.config.presets import PRESETS
from hpcmoe.config.run_checks import validate_run
from hpcmoe.config.schema import Config, require


def load_config(path: Optional[str], overrides: list[str] = ()) -> Config:
    """Read a YAML file (or nothing), apply `a.b=value` overrides, validate, return the Config."""
    raw: dict = {}
    if path is not None:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except OSError as e:
            raise ValueError(f"cannot read config {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ValueError(f"config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"config {path}: expected a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return build_config(raw)


def apply_override(raw: dict, item: str) -> None:
    """Apply one `a.b=value` override in place; the value is parsed as YAML."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. model.num_experts=8")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise ValueError(f"--set {key}: value {text!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"--set {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def build_config(raw: dict) -> Config:
    """Turn the raw nested dict into a validated Config (unknown keys and wrong types rejected)."""
    sections = {f.name: f for f in dataclasses.fields(Config)}
    for name in raw:
        if name not in sections:
            raise ValueError(f"unknown config section {name!r}: expected one of {', '.join(sections)}")
    built = {}
    for name in sections:
        section = raw.get(name) or {}
        if not isinstance(section, dict):
            raise ValueError(f"{name}: expected a mapping, got {section!r}")
        cls = typing.get_type_hints(Config)[name]
        if name == "model":
            section = resolve_model(section)
        built[name] = build_section(cls, section, name)
    config = Config(**built)
    validate(config)
    return config


def resolve_model(section: dict) -> dict:
    """Model fields: a checkpoint's config.json, or a preset overlaid by what the user set."""
    checkpoint, preset = section.get("checkpoint"), section.get("preset")
    if checkpoint is not None:
        if preset is not None:
            raise ValueError("model.preset and model.checkpoint: set one, not both")
        extra = sorted(k for k, v in section.items() if k not in ("checkpoint", "dtype") and v is not None)
        if extra:
            raise ValueError(
                f"model.{extra[0]}: comes from the checkpoint's config.json; with model.checkpoint "
                f"only model.dtype may be set"
            )
        if not isinstance(checkpoint, str):
            raise ValueError(f"model.checkpoint: expected a directory path, got {checkpoint!r}")
        from hpcmoe.model.families import model_fields

        return {**model_fields(checkpoint), **section}
    if preset is None:
        raise ValueError(
            "model.preset: not set; expected one of: " + ", ".join(PRESETS) + " (or model.checkpoint)"
        )
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ValueError(f"model.preset: {preset!r} is not a preset; expected one of: " + ", ".join(PRESETS))
    return {**PRESETS[preset], **section}


def build_section(cls, section: dict, path: str):
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in section.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=3)
            hint = f"did you mean {' or '.join(close)}?" if close else f"expected one of {', '.join(known)}"
            raise ValueError(f"unknown config key {path}.{key}: {hint}")
        values[key] = check_type(value, hints[key], f"{path}.{key}")
    for f in dataclasses.fields(cls):  # a key without a default (run.kill[i].rank) must be given
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        require(
            f.name in values or not required,
            f"{path}.{f.name}: required; expected {expected_of(hints[f.name])}",
        )
    return cls(**values)


def expected_of(annotation) -> str:
    """What a key of this type holds, in the words of check_type's errors."""
    return "a number" if annotation is float else SIMPLE_TYPES.get(annotation, (str(annotation),))[0]


SIMPLE_TYPES = {
    bool: ("true or false", lambda v: isinstance(v, bool)),
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    str: ("a string", lambda v: isinstance(v, str)),
    dict: ("a mapping", lambda v: isinstance(v, dict)),
}


def check_type(value, annotation, path: str):
    """Return `value` as `annotation` or raise naming the path; YAML 1.1 '1e-3' strings become floats."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:  # Optional[X], or X | Y: the first that accepts the value
        if value is None and type(None) in args:
            return None
        choices = [a for a in args if a is not type(None)]
        for choice in choices[:-1]:
            try:
                return check_type(value, choice, path)
            except ValueError:
                pass
        return check_type(value, choices[-1], path)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{path}: expected a list, got {value!r}")
        return [check_type(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if annotation is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if dataclasses.is_dataclass(annotation):
        return build_section(annotation, check_type(value, dict, path), path)
    if annotation in SIMPLE_TYPES:
        expected, accepts = SIMPLE_TYPES[annotation]
        if not accepts(value):
            raise ValueError(f"{path}: expected {expected}, got {value!r}")
        return dict(value) if annotation is dict else value
    raise TypeError(f"{path}: unsupported annotation {annotation}")  # a bug in this file, not user input


def validate(config: Config) -> None:
    """Check relations that hold whatever the rank count (the layout checks the rest): the model
    section, then the parallel section, then the run section; the first broken one raises."""
    validate_model(config.model)
    validate_parallel(config.model, config.parallel)
    validate_run(config.model, config.run)
