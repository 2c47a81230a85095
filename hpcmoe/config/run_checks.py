"""The run section's checks that read the workload: prompts within the model's positions, and an
end-of-sequence id from the checkpoint where run.stop_at_eos needs one.
"""

from __future__ import annotations

from hpcmoe.config.schema import ModelConfig, RunConfig, require
from hpcmoe.workload import check_positions, eos_ids


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
