"""Continuous batching end to end: requests join as others end, prompts prefilled in chunks inside
decode steps, and still every request's tokens are those of transformers' greedy generation of its
prompt alone; seeded sampling, static batching, a NUL byte in a completion, --resume refusals and
continuation, a job killed with SIGKILL (its .tmp file keeps every finished request), and a long
prompt file streamed.

One tiny Mixtral checkpoint (float32, with a byte-level tokenizer) is built once for the module;
its eos token is chosen so that some requests end early at it. Every job is tiny: the whole file
runs in a few minutes on two cores.
"""

import copy
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch

from tests.conftest import ROOT, run_job

sys.path.insert(0, os.path.join(ROOT, "tools"))
from make_tiny_checkpoint import make, train_tokenizer  # noqa: E402

torch.set_num_threads(1)
CORPUS = os.path.join(ROOT, "tests", "data", "tiny_corpus.txt")
LIMIT = 8  # run.max_new_tokens: the requests that name no max_new_tokens of their own
# (id, text or token ids, max_new_tokens or None for LIMIT): short prompts first, so that some requests
# end (and others join) early, and a long one last, prefilled in many chunks of 4 tokens
PROMPTS = [
    ("ids-short", [1, 5], 6),
    ("attention", "Attention runs", 3),
    ("ends", "Each request ends", None),
    ("expert", "Expert parallelism", 2),
    ("ids-run", [1, 100, 101, 102, 103, 104, 105], 5),
    ("cluster", "The cluster has nodes", 7),
    ("fox", "The quick brown fox", 4),
    ("batch", "A batch of requests is prefilled once", None),
    ("router", "The router chooses the top experts by their scores", 6),
    ("long", "Mixture-of-experts models route each token to a few experts out of many.", None),
]
CHUNKED = ["run.max_batch=2", "run.prefill_chunk=4"]
SAMPLING = "run.sampling={temperature: 0.8, top_k: 20, seed: 5}"
NUL_TEXT = "\x00"


# ---------------------------------------------------------------- helpers


@torch.no_grad()
def greedy(model, prompt, limit, eos):
    """transformers' generate on one prompt alone -> (new tokens, the eos kept; smallest top-2 logit gap)."""
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        max_new_tokens=limit,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0,
        attention_mask=torch.ones_like(ids),
        output_scores=True,
        return_dict_in_generate=True,
    )
    gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    return out.sequences[0, len(prompt) :].tolist(), min(gaps)


def write_prompts(path, prompts):
    with open(path, "w") as f:
        for request_id, prompt, limit in prompts:
            line = {"id": request_id, ("prompt" if isinstance(prompt, str) else "prompt_ids"): prompt}
            if limit is not None:
                line["max_new_tokens"] = limit
            f.write(json.dumps(line) + "\n")


def write_config(path, checkpoint, prompts, **run):
    """A config of the checkpoint (no preset) and the prompt file; run settings on top."""
    path.write_text(
        json.dumps(
            {
                "model": {"checkpoint": str(checkpoint)},
                "run": {"prompts": str(prompts), "max_new_tokens": LIMIT, **run},
            }
        )
    )
    return str(path)


def job(ranks, output, config, *settings, args=(), timeout=120):
    return run_job(ranks, output, *settings, config=config, timeout=timeout, args=args)


def generated(path):
    with h5py.File(path, "r") as f:
        assert f.attrs["complete"], f"{path} is not complete"
        return f["generated"][:]


def request_rows(path) -> dict:
    """/requests as arrays in request (file) order."""
    with h5py.File(path, "r", locking=False) as f:
        rows = {name: f["requests"][name][:] for name in f["requests"]}
    order = np.argsort(rows["index"], kind="stable")
    return {name: values[order] for name, values in rows.items()}


def export(path, out="-"):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.run(
        ["timeout", "60", sys.executable, "-m", "hpcmoe", "export", str(path), "--jsonl", out],
        capture_output=True,
        text=True,
        env=env,
        timeout=90,
    )


def error_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("hpcmoe: error:")]


# ---------------------------------------------------------------- the checkpoint and its oracle


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The checkpoint, its tokenizer, the prompt file and transformers' tokens per request (eos chosen
    so that some requests end at it before their limit, others at their limit)."""
    from tokenizers import Tokenizer

    directory = tmp_path_factory.mktemp("mixtral")
    model = make("mixtral", str(directory), vocab_size=320)
    train_tokenizer(str(directory), CORPUS, 320)
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    ids = [tokenizer.encode(p).ids if isinstance(p, str) else p for _, p, _ in PROMPTS]
    limits = [limit or LIMIT for _, _, limit in PROMPTS]
    free = [greedy(model, p, n, None)[0] for p, n in zip(ids, limits)]

    # eos: the token made (first in file order on a tie) that ends the most requests early after at least one
    # other token of theirs, while at least 4 requests never make it
    def early(candidate):
        return sum(candidate in tokens[1:-1] and tokens.index(candidate) >= 1 for tokens in free)

    candidates = [
        t
        for tokens in free
        for t in tokens
        if t not in (0, 1) and sum(t not in tokens for tokens in free) >= 4
    ]
    eos = max(candidates, key=early)  # max keeps the first of equals
    assert early(eos) >= 1, free
    for name in ("config.json", "generation_config.json"):
        settings = json.loads((directory / name).read_text())
        (directory / name).write_text(json.dumps({**settings, "eos_token_id": eos}))
    tokens = np.full((len(PROMPTS), LIMIT), -1, np.int64)
    for i, (prompt, limit) in enumerate(zip(ids, limits)):
        made, gap = greedy(model, prompt, limit, eos)
        assert gap >= 1e-4, f"request {i}: the oracle's greedy choice is a near tie ({gap})"
        tokens[i, : len(made)] = made
    lengths = (tokens >= 0).sum(1)
    reasons = [b"eos" if tokens[i, n - 1] == eos else b"length" for i, n in enumerate(lengths)]
    assert b"eos" in reasons and reasons.count(b"length") >= 4, reasons
    # one ends at eos, early, after other tokens
    assert any(r == b"eos" and 2 <= n < limit for r, n, limit in zip(reasons, lengths, limits)), (
        eos,
        tokens,
    )
    prompts = directory / "prompts.jsonl"
    write_prompts(prompts, PROMPTS)
    return SimpleNamespace(
        directory=directory,
        model=model,
        tokenizer=tokenizer,
        prompts=prompts,
        eos=eos,
        ids=ids,
        limits=limits,
        tokens=tokens,
        lengths=lengths,
        reasons=reasons,
    )


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """The greedy run on one rank, continuous batching: 2 live requests, prompts prefilled 4 tokens a step."""
    directory = tmp_path_factory.mktemp("reference")
    config = write_config(directory / "config.yaml", tiny.directory, tiny.prompts, stop_at_eos=True)
    result = job(1, directory / "run.h5", config, *CHUNKED)
    assert result.returncode == 0, result.stderr
    return directory / "run.h5"


# ---------------------------------------------------------------- 1. equal to transformers per request


@pytest.mark.parametrize(
    "ranks, settings",
    [
        (1, []),
        (2, ["run.micro_batches=2", "run.decode_micro_batch_min=1"]),
        (4, ["parallel.layout=ma", "parallel.attention_ranks=3", "parallel.moe_ranks=1"]),
    ],
    ids=["n1", "n2-micro2", "ma-3+1"],
)
def test_continuous_batching_equals_transformers_per_request(tiny, reference, tmp_path, ranks, settings):
    if ranks == 1 and not settings:
        path = reference
    else:
        config = write_config(tmp_path / "config.yaml", tiny.directory, tiny.prompts, stop_at_eos=True)
        result = job(ranks, tmp_path / "run.h5", config, *CHUNKED, *settings)
        assert result.returncode == 0, result.stderr
        path = tmp_path / "run.h5"
    np.testing.assert_array_equal(generated(path), tiny.tokens)
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["generated_lengths"][:], tiny.lengths)
        assert [x.decode() for x in f["request_ids"][:]] == [request_id for request_id, _, _ in PROMPTS]
        for row, prompt in zip(f["prompt_ids"][:], tiny.ids):
            assert list(row[row >= 0]) == list(prompt)
    rows = request_rows(path)
    assert rows["index"].tolist() == list(range(len(PROMPTS)))
    assert rows["finish_reason"].tolist() == tiny.reasons
    for i, completion in enumerate(rows["completion_ids"]):
        assert completion.tolist() == tiny.tokens[i, : tiny.lengths[i]].tolist()
        assert rows["prompt_ids"][i].tolist() == list(tiny.ids[i])
        expected = tiny.tokenizer.decode(completion.tolist(), skip_special_tokens=False).encode()
        assert bytes(rows["text"][i]) == expected
        text = PROMPTS[i][1]
        assert bytes(rows["prompt_text"][i]) == (text.encode() if isinstance(text, str) else b"")


def test_requests_join_as_others_end_and_long_prompts_are_prefilled_in_chunks(tiny, reference):
    """One rank, run.max_batch=2: never more than 2 requests live, requests admitted after step 0,
    and a prompt of L tokens takes at least ceil(L / 4) steps before its first token."""
    rows = request_rows(reference)
    admitted, finished = rows["admitted_step"], rows["finished_step"]
    assert (admitted <= finished).all()
    assert (np.diff(admitted) >= 0).all()  # they join in file order
    assert (admitted > 0).sum() >= len(PROMPTS) - 2
    for step in range(int(finished.max()) + 1):
        assert ((admitted <= step) & (step <= finished)).sum() <= 2, step
    for i, prompt in enumerate(tiny.ids):
        steps = int(finished[i] - admitted[i]) + 1
        assert steps >= -(-len(prompt) // 4) + tiny.lengths[i] - 1, (i, steps)
    long = len(PROMPTS) - 1
    assert finished[long] - admitted[long] + 1 >= 10  # 38 prompt tokens, 4 a step
    assert (rows["ttft_s"] >= 0).all() and (rows["first_token_at"] <= rows["finished_at"]).all()


# ---------------------------------------------------------------- 2. sampling does not depend on batching


@pytest.fixture(scope="module")
def sampled(tiny, tmp_path_factory):
    directory = tmp_path_factory.mktemp("sampled")
    config = write_config(directory / "config.yaml", tiny.directory, tiny.prompts, stop_at_eos=True)
    result = job(1, directory / "run.h5", config, *CHUNKED, SAMPLING)
    assert result.returncode == 0, result.stderr
    return generated(directory / "run.h5")


@pytest.mark.parametrize(
    "ranks, settings",
    [(2, CHUNKED), (1, ["run.batching=static", "run.max_batch=10"])],
    ids=["n2-continuous", "n1-static"],
)
def test_sampling_draws_do_not_depend_on_batching(tiny, sampled, reference, tmp_path, ranks, settings):
    assert (sampled != generated(reference)).any()  # it does sample
    config = write_config(tmp_path / "config.yaml", tiny.directory, tiny.prompts, stop_at_eos=True)
    result = job(ranks, tmp_path / "run.h5", config, *settings, SAMPLING)
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(generated(tmp_path / "run.h5"), sampled)


# ---------------------------------------------------------------- 3. continuous vs static


def test_static_batching_gives_the_same_tokens_batch_after_batch(tiny, reference, tmp_path):
    config = write_config(tmp_path / "config.yaml", tiny.directory, tiny.prompts, stop_at_eos=True)
    result = job(1, tmp_path / "run.h5", config, "run.batching=static", "run.max_batch=3")
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(generated(tmp_path / "run.h5"), generated(reference))
    rows = request_rows(tmp_path / "run.h5")
    admitted, finished = rows["admitted_step"], rows["finished_step"]
    for start in range(3, len(PROMPTS), 3):  # a batch starts when the one before it has ended
        assert (admitted[start : start + 3] == admitted[start]).all()
        assert admitted[start] > finished[start - 3 : start].max()


# ---------------------------------------------------------------- 4. a NUL byte in a completion


def test_a_nul_byte_in_a_completion_is_kept_exactly(tiny, tmp_path):
    """The NUL token's LM-head row is made twice the row of the token greedy decoding picks first,
    so that it wins: /requests/text keeps the NUL byte, /generated_text shows U+2400, export keeps it."""
    from safetensors.torch import load_file, save_file

    nul = next(i for i in range(320) if tiny.tokenizer.decode([i]) == NUL_TEXT)
    checkpoint = tmp_path / "nul"
    shutil.copytree(tiny.directory, checkpoint)
    prompt = "The experts compute"
    ids = tiny.tokenizer.encode(prompt).ids
    first = greedy(tiny.model, ids, 1, None)[0][0]
    model = copy.deepcopy(tiny.model)
    with torch.no_grad():
        model.lm_head.weight[nul] = 2 * model.lm_head.weight[first]
    tensors = load_file(str(checkpoint / "model.safetensors"))
    tensors["lm_head.weight"][nul] = 2 * tensors["lm_head.weight"][first]
    save_file(tensors, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})
    made, gap = greedy(model, ids, 6, None)
    assert nul in made and gap >= 1e-4, (made, gap)
    prompts = tmp_path / "prompts.jsonl"
    write_prompts(prompts, [("nul", prompt, None), ("other", [1, 5], 3)])
    config = write_config(tmp_path / "config.yaml", checkpoint, prompts, stop_at_eos=False, max_new_tokens=6)
    result = job(1, tmp_path / "run.h5", config)
    assert result.returncode == 0, result.stderr
    expected = tiny.tokenizer.decode(made, skip_special_tokens=False)
    assert NUL_TEXT in expected
    with h5py.File(tmp_path / "run.h5", "r") as f:
        assert f.attrs["complete"]
        assert f["generated"][0].tolist() == made
        rows = {name: f["requests"][name][:] for name in f["requests"]}
        i = rows["index"].tolist().index(0)
        assert bytes(rows["text"][i]) == expected.encode() and b"\x00" in bytes(rows["text"][i])
        shown = f["generated_text"][0].decode()
        assert shown == expected.replace(NUL_TEXT, "\u2400") and NUL_TEXT not in shown
        nul_total = sum(bytes(text).count(b"\x00") for text in rows["text"])
        assert f["generated_text"].attrs["nul_characters"] == nul_total >= 1
    exported = export(tmp_path / "run.h5", str(tmp_path / "out.jsonl"))
    assert exported.returncode == 0, exported.stderr
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "\\u0000" in lines[0]
    first_line = json.loads(lines[0])
    assert (
        first_line["id"] == "nul"
        and first_line["completion"] == expected
        and "\u0000" in first_line["completion"]
    )
    assert first_line["tokens"] == made and first_line["prompt"] == prompt


# ---------------------------------------------------------------- 5. --resume refusals, then resume

SIGNAL_AT = 8  # stops after step 10: two requests have ended, one is part way, one is prefilling


@pytest.fixture(scope="module")
def stopped(tiny, tmp_path_factory):
    """The reference's run (its own copies of the checkpoint and prompt file) stopped by SIGUSR1 at step
    SIGNAL_AT."""
    directory = tmp_path_factory.mktemp("stopped")
    checkpoint, prompts = directory / "checkpoint", directory / "prompts.jsonl"
    shutil.copytree(tiny.directory, checkpoint)
    shutil.copy(tiny.prompts, prompts)
    config = write_config(directory / "config.yaml", checkpoint, prompts, stop_at_eos=True)
    result = job(1, directory / "run.h5", config, *CHUNKED, f"run.signal_at_step={SIGNAL_AT}")
    assert result.returncode == 0, result.stderr
    partial = directory / "run.partial.h5"
    assert partial.exists() and not (directory / "run.h5").exists(), os.listdir(directory)
    rows = request_rows(partial)
    stopped_rows = rows["finish_reason"] == b"stop"
    assert (~stopped_rows).any(), "the stop should come after a request has ended"
    assert any(len(c) for c in rows["completion_ids"][stopped_rows]), "and while one is part way"
    return SimpleNamespace(
        directory=directory, checkpoint=checkpoint, prompts=prompts, config=config, partial=partial
    )


def resume(stopped, output):
    return job(1, output, stopped.config, *CHUNKED, args=["--resume", str(stopped.partial)])


def test_resume_refuses_changed_prompts(stopped, tmp_path):
    original = stopped.prompts.read_text()
    lines = original.splitlines(keepends=True)
    lines[1] = lines[1].replace("Attention runs", "Attention walks")
    try:
        stopped.prompts.write_text("".join(lines))
        result = resume(stopped, tmp_path / "resumed.h5")
    finally:
        stopped.prompts.write_text(original)
    assert result.returncode == 2, result.stderr
    errors = error_lines(result)
    assert len(errors) == 1 and result.stderr.count("the prompts changed since that run") == 1, result.stderr
    assert f"--resume {stopped.partial}: the prompts changed since that run" in errors[0]
    assert not list(tmp_path.iterdir())


def test_resume_refuses_a_changed_checkpoint(stopped, tmp_path):
    path = stopped.checkpoint / "config.json"
    original = path.read_text()
    try:  # a field hpcmoe does not read: the model's settings are the same, the checkpoint is not
        path.write_text(json.dumps({**json.loads(original), "edited_after_the_stop": True}))
        result = resume(stopped, tmp_path / "resumed.h5")
    finally:
        path.write_text(original)
    assert result.returncode == 2, result.stderr
    errors = error_lines(result)
    assert len(errors) == 1 and result.stderr.count("the checkpoint changed since that run") == 1, (
        result.stderr
    )
    assert f"--resume {stopped.partial}: the checkpoint changed since that run" in errors[0]
    assert not list(tmp_path.iterdir())


def test_resume_of_a_checkpoint_run_with_text_prompts_gives_the_uninterrupted_tokens(
    stopped, reference, tmp_path
):
    result = resume(stopped, tmp_path / "resumed.h5")
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(generated(tmp_path / "resumed.h5"), generated(reference))
    with h5py.File(tmp_path / "resumed.h5", "r") as f:
        assert f.attrs["resumed_at_step"] == SIGNAL_AT + 2
    rows, expected = request_rows(tmp_path / "resumed.h5"), request_rows(reference)
    assert rows["finish_reason"].tolist() == expected["finish_reason"].tolist()
    assert [c.tolist() for c in rows["completion_ids"]] == [c.tolist() for c in expected["completion_ids"]]
    assert [bytes(t) for t in rows["text"]] == [bytes(t) for t in expected["text"]]


# ---------------------------------------------------------------- 6. kill -9 mid-run

KILL_PROMPTS = 30


@pytest.fixture(scope="module")
def kill_workload(tiny, tmp_path_factory):
    directory = tmp_path_factory.mktemp("kill")
    words = open(CORPUS).read().split()
    prompts = [
        (f"k{i}", tiny.tokenizer.encode(" ".join(words[i : i + 1 + i % 4])).ids, 2 + i % 3)
        for i in range(KILL_PROMPTS)
    ]
    write_prompts(directory / "prompts.jsonl", prompts)
    config = write_config(
        directory / "config.yaml", tiny.directory, directory / "prompts.jsonl", stop_at_eos=True
    )
    result = job(2, directory / "reference.h5", config, "run.max_batch=2")
    assert result.returncode == 0, result.stderr
    return directory, config, request_rows(directory / "reference.h5")


def test_a_job_killed_mid_run_keeps_every_finished_request(kill_workload):
    directory, config, expected = kill_workload
    step = int(np.median(expected["finished_step"]))
    output = directory / "killed.h5"
    result = job(
        2, output, config, "run.max_batch=2", f"run.kill=[{{rank: 1, step: {step}, phase: between_steps}}]"
    )
    assert result.returncode != 0, result.stdout
    assert not output.exists()
    leftover = directory / "killed.h5.tmp"
    assert leftover.exists(), os.listdir(directory)
    with h5py.File(leftover, "r", locking=False) as f:
        assert not f.attrs["complete"]
    rows = request_rows(leftover)
    kept = rows["index"].tolist()
    assert 1 <= len(kept) < KILL_PROMPTS, kept
    assert len(set(kept)) == len(kept)
    for k, index in enumerate(kept):
        assert rows["id"][k] == expected["id"][index]
        assert rows["completion_ids"][k].tolist() == expected["completion_ids"][index].tolist(), index
        assert rows["finish_reason"][k] == expected["finish_reason"][index]
        assert rows["finished_step"][k] <= step  # rank 0 cannot finish a step without rank 1
    exported = export(leftover)
    assert exported.returncode == 0, exported.stderr
    lines = [json.loads(line) for line in exported.stdout.splitlines()]
    assert [line["index"] for line in lines] == sorted(kept)
    for line in lines:
        assert line["tokens"] == expected["completion_ids"][line["index"]].tolist()
        assert line["id"] == f"k{line['index']}"


# ---------------------------------------------------------------- 7. a long prompt file, streamed

STREAMED = 3000


def test_a_long_prompt_file_is_streamed_in_file_order(tmp_path):
    with open(tmp_path / "prompts.jsonl", "w") as f:
        for i in range(STREAMED):
            f.write(json.dumps({"id": f"p{i}", "prompt_ids": [1 + i % 97, 2 + i % 89][: 1 + i % 2]}) + "\n")
    result = run_job(
        1,
        tmp_path / "run.h5",
        f"run.prompts={tmp_path / 'prompts.jsonl'}",
        "run.max_new_tokens=1",
        "run.max_batch=64",
        "output.save_logits=false",
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    with h5py.File(tmp_path / "run.h5", "r") as f:
        assert f.attrs["complete"]
        tokens = f["generated"][:]
        assert tokens.shape == (STREAMED, 1) and (tokens >= 0).all()
        assert (f["generated_lengths"][:] == 1).all()
        assert [x.decode() for x in f["request_ids"][:]] == [f"p{i}" for i in range(STREAMED)]
        assert f["requests/index"].shape == (STREAMED,)
        admitted = f["requests/admitted_step"][:]
    assert np.bincount(admitted).max() <= 64  # at most max_batch join a step
