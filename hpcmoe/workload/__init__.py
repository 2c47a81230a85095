"""What a run generates for, as pure host code (no MPI, no communicator): its requests (a JSONL
prompt file through the checkpoint's own tokenizer, explicit token ids, or the seeded synthetic
workload), when each one ends (its token limit, end-of-sequence), how the next token is chosen
(greedy, or seeded sampling that gives the same tokens at any rank count, layout or micro-batch
count), and what ties a run file to its inputs (the settings and digests --resume checks). Below
the config, the engine and the run file, which all read it; it imports none of them.
"""

from hpcmoe.workload.identity import (
    TESTING_KEYS,
    checkpoint_sha256,
    flat_settings,
    run_identity,
    saved_settings,
)
from hpcmoe.workload.requests import (
    Done,
    PromptFile,
    Request,
    RequestList,
    check_positions,
    prompt_file,
    requests_of,
    synthetic_prompts,
)
from hpcmoe.workload.sampling import choose, gumbel
from hpcmoe.workload.tokenizer import decode, eos_ids, load_tokenizer, tokenizer_path

__all__ = [
    "Done",
    "PromptFile",
    "Request",
    "RequestList",
    "TESTING_KEYS",
    "check_positions",
    "checkpoint_sha256",
    "choose",
    "decode",
    "eos_ids",
    "flat_settings",
    "gumbel",
    "load_tokenizer",
    "prompt_file",
    "requests_of",
    "run_identity",
    "saved_settings",
    "synthetic_prompts",
    "tokenizer_path",
]
