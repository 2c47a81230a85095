"""The run section's checks: the testing knobs, sampling, how the run executes (batching,
micro-batches, the watchdog, the device) and its prompts: explicit ids within the vocabulary, every
prompt within the model's positions, and an end-of-sequence id from the checkpoint where
run.stop_at_eos needs one.
"""

from __future__ import annotations

from hpcmoe.config.schema import KILL_PHASES, ModelConfig, RunConfig, SamplingConfig, require
from hpcmoe.workload import check_positions, eos_ids


def validate_run(m: ModelConfig, r: RunConfig) -> None:
    """The run section, against the model where a value depends on it (layers, vocabulary, positions)."""
    require(r.max_new_tokens >= 1, f"run.max_new_tokens: expected an integer >= 1, got {r.max_new_tokens}")
    validate_testing_knobs(m, r)
    if r.sampling is not None:
        validate_sampling(r.sampling)
    validate_execution(r)
    validate_prompts(m, r)
    validate_positions(m, r)
    validate_stop_at_eos(m, r)


def validate_testing_knobs(m: ModelConfig, r: RunConfig) -> None:
    """Where the tests and benchmarks make a run stall, fail, die or drift, and what survivors rebuild."""
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
    require(
        0 <= r.fail_at_layer < m.num_layers,
        f"run.fail_at_layer: {r.fail_at_layer} must be between 0 and {m.num_layers - 1}",
    )
    require(
        0 <= r.fail_at_step < r.max_new_tokens,
        f"run.fail_at_step: {r.fail_at_step} must be between 0 and {r.max_new_tokens - 1}",
    )


def validate_sampling(s: SamplingConfig) -> None:
    require(s.temperature >= 0, f"run.sampling.temperature: expected a number >= 0, got {s.temperature}")
    require(s.top_k is None or s.top_k >= 1, f"run.sampling.top_k: expected an integer >= 1, got {s.top_k}")
    require(
        s.top_p is None or 0 < s.top_p <= 1,
        f"run.sampling.top_p: expected a number in (0, 1], got {s.top_p}",
    )


def validate_execution(r: RunConfig) -> None:
    """How the run executes: batching, chunked prefill, micro-batches, the watchdog and the device."""
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
        r.device in ("auto", "cpu", "cuda"),
        f"run.device: {r.device!r} is not supported; expected auto, cpu or cuda",
    )


def validate_prompts(m: ModelConfig, r: RunConfig) -> None:
    """run.prompts or run.prompt_ids, not both; explicit ids non-empty and within the vocabulary; the
    synthetic workload's sizes (a prompt file is checked as it is read: hpcmoe.workload.PromptFile)."""
    require(
        r.prompts is None or r.prompt_ids is None,
        "run.prompts and run.prompt_ids: give one of them, not both",
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


def validate_positions(m: ModelConfig, r: RunConfig) -> None:
    """The longest of run.prompt_ids, or the synthetic workload's run.prompt_len, plus run.max_new_tokens
    within model.max_positions (a prompt file is checked line by line: hpcmoe.workload.PromptFile)."""
    if r.prompts is not None:
        return
    if r.prompt_ids is not None:
        i = max(range(len(r.prompt_ids)), key=lambda i: len(r.prompt_ids[i]))
        check_positions(f"run.prompt_ids[{i}]", len(r.prompt_ids[i]), r.max_new_tokens, m.max_positions)
    else:
        check_positions("run.prompt_len", r.prompt_len, r.max_new_tokens, m.max_positions)


def validate_stop_at_eos(m: ModelConfig, r: RunConfig) -> None:
    """run.stop_at_eos: true needs the checkpoint's end-of-sequence id (the default, unset, stops at it
    when there is one); the checkpoint's files that name it are read (and checked) here."""
    if r.stop_at_eos is False or not (r.stop_at_eos or m.checkpoint):
        return
    source = (
        f"model.checkpoint {m.checkpoint}" if m.checkpoint else f"model.preset {m.preset} (random weights)"
    )
    require(
        bool(eos_ids(m.checkpoint)) or not r.stop_at_eos,
        f"run.stop_at_eos needs an end-of-sequence id: a model.checkpoint with eos_token_id in its "
        f"generation_config.json or config.json; {source} has none (set run.stop_at_eos: false)",
    )
