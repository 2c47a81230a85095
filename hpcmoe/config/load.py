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
from hpcmoe.config.parallel_checks import validate_expert_tp, validate_ma
from hpcmoe.config.presets import PRESETS
from hpcmoe.config.run_checks import validate_positions, validate_stop_at_eos
from hpcmoe.config.schema import KILL_PHASES, Config, require


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
        from hpcmoe.model.checkpoint import model_fields

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
    """Check relations that hold whatever the rank count (the layout checks the rest)."""
    m, p, r = config.model, config.parallel, config.run
    validate_model(m)
    require(p.layout in ("ep", "ma"), f"parallel.layout: {p.layout!r} is not supported; expected ep or ma")
    if p.layout == "ma":
        validate_ma(m, p)
    placements = ("auto", "packed", "one_per_rank", "replicated", "topology_aware")
    require(
        p.placement in placements,
        f"parallel.placement: {p.placement!r} is not supported; expected one of {', '.join(placements)}",
    )
    require(
        p.dispatch in ("flat", "two_stage"),
        f"parallel.dispatch: {p.dispatch!r} is not supported; expected flat or two_stage",
    )
    require(
        p.expert_schedule in ("per_layer", "per_source", "auto"),
        f"parallel.expert_schedule: {p.expert_schedule!r} is not supported; expected per_layer, per_source or auto",
    )
    for name in ("experts_per_rank", "ranks_per_node", "threads", "expert_tp"):
        value = getattr(p, name)
        require(value is None or value >= 1, f"parallel.{name}: expected an integer >= 1, got {value}")
    require(
        p.expert_tp_dispatch in ("members", "leader"),
        f"parallel.expert_tp_dispatch: {p.expert_tp_dispatch!r} is not supported; expected members or leader",
    )
    if p.expert_tp > 1:
        validate_expert_tp(m, p)
    if p.rebalance is not None:
        b = p.rebalance
        require(
            p.layout == "ep",
            "parallel.rebalance moves experts between ep ranks; parallel.layout=ma packs them "
            "over its MoE ranks once",
        )
        for name in ("every_steps", "window_steps", "chunk_kib", "chunks_in_flight"):
            require(
                getattr(b, name) >= 1,
                f"parallel.rebalance.{name}: expected an integer >= 1, got {getattr(b, name)}",
            )
        require(
            0 <= b.min_gain < 1, f"parallel.rebalance.min_gain: expected a number in [0, 1), got {b.min_gain}"
        )
    require(
        r.skew_drift is None or r.skew_drift >= 1,
        f"run.skew_drift: expected an integer >= 1, got {r.skew_drift}",
    )
    for i, kill in enumerate(r.kill or []):
        require(
            kill.phase in KILL_PHASES,
            f"run.kill[{i}].phase: {kill.phase!r} is not one of {', '.join(KILL_PHASES)}",
        )
        for name in ("step", "layer"):
            require(
                getattr(kill, name) >= 0,
                f"run.kill[{i}].{name}: expected an integer >= 0, got {getattr(kill, name)}",
            )
    for name in ("stall_at_step", "signal_at_step"):
        value = getattr(r, name)
        require(value is None or value >= 0, f"run.{name}: expected an integer >= 0, got {value}")
    require(r.rebuild_slots >= 0, f"run.rebuild_slots: expected an integer >= 0, got {r.rebuild_slots}")
    require(r.max_new_tokens >= 1, f"run.max_new_tokens: expected an integer >= 1, got {r.max_new_tokens}")
    require(
        r.prompts is None or r.prompt_ids is None,
        "run.prompts and run.prompt_ids: give one of them, not both",
    )
    if r.sampling is not None:
        s = r.sampling
        require(s.temperature >= 0, f"run.sampling.temperature: expected a number >= 0, got {s.temperature}")
        require(
            s.top_k is None or s.top_k >= 1, f"run.sampling.top_k: expected an integer >= 1, got {s.top_k}"
        )
        require(
            s.top_p is None or 0 < s.top_p <= 1,
            f"run.sampling.top_p: expected a number in (0, 1], got {s.top_p}",
        )
    require(
        not (p.layout == "ma" and m.qk_norm_all_heads),
        "parallel.layout: ma splits the heads over ranks, but this model's q/k norm (MiniMax-M2) spans every "
        "head at once; use parallel.layout=ep",
    )
    require(
        r.batching in ("continuous", "static"),
        f"run.batching: {r.batching!r} is not supported; expected continuous or static",
    )
    require(
        r.max_batch is None or r.max_batch >= 1, f"run.max_batch: expected an integer >= 1, got {r.max_batch}"
    )
    require(r.prefill_chunk >= 1, f"run.prefill_chunk: expected an integer >= 1, got {r.prefill_chunk}")
    require(r.micro_batches >= 1, f"run.micro_batches: expected an integer >= 1, got {r.micro_batches}")
    require(
        r.decode_micro_batch_min >= 1,
        f"run.decode_micro_batch_min: expected an integer >= 1, got {r.decode_micro_batch_min}",
    )
    require(r.timeout_s > 0, f"run.timeout_s: expected a number > 0, got {r.timeout_s}")
    require(
        p.wait in ("yield", "spin"), f"parallel.wait: {p.wait!r} is not supported; expected yield or spin"
    )
    require(
        p.cuda_aware_mpi in (True, False, "auto"),
        f"parallel.cuda_aware_mpi: {p.cuda_aware_mpi!r} is not supported; expected auto, true or false",
    )
    require(
        r.device in ("auto", "cpu", "cuda"),
        f"run.device: {r.device!r} is not supported; expected auto, cpu or cuda",
    )
    require(
        p.capacity_factor is None or p.capacity_factor > 0,
        f"parallel.capacity_factor: expected a number > 0, got {p.capacity_factor}",
    )
    if p.link is not None:
        require(
            p.link.bandwidth_gbps > 0,
            f"parallel.link.bandwidth_gbps: expected a number > 0, got {p.link.bandwidth_gbps}",
        )
        require(
            p.link.latency_us >= 0,
            f"parallel.link.latency_us: expected a number >= 0, got {p.link.latency_us}",
        )
    require(
        0 <= r.fail_at_layer < m.num_layers,
        f"run.fail_at_layer: {r.fail_at_layer} must be between 0 and {m.num_layers - 1}",
    )
    require(
        0 <= r.fail_at_step < r.max_new_tokens,
        f"run.fail_at_step: {r.fail_at_step} must be between 0 and {r.max_new_tokens - 1}",
    )
    if r.prompt_ids is not None:
        require(len(r.prompt_ids) >= 1, "run.prompt_ids: expected at least one prompt, got []")
        for i, prompt in enumerate(r.prompt_ids):
            require(len(prompt) >= 1, f"run.prompt_ids[{i}]: expected at least one token, got []")
            bad = [t for t in prompt if not 0 <= t < m.vocab]
            require(not bad, f"run.prompt_ids[{i}]: token {bad[:1]} outside the vocabulary [0, {m.vocab})")
    else:
        require(r.batch >= 1, f"run.batch: expected an integer >= 1, got {r.batch}")
        require(r.prompt_len >= 1, f"run.prompt_len: expected an integer >= 1, got {r.prompt_len}")
        shortest = r.prompt_len_min
        require(
            shortest is None or 1 <= shortest <= r.prompt_len,
            f"run.prompt_len_min: {shortest} must be between 1 and run.prompt_len ({r.prompt_len})",
        )
    validate_positions(m, r)
    validate_stop_at_eos(m, r)
