"""Real workloads: text prompts through the checkpoint's tokenizer, end-of-sequence, per-request
limits, seeded sampling, clear errors for bad prompt files and checkpoints.

The tokenizer is a byte-level BPE trained here on tests/data/tiny_corpus.txt and saved beside tiny
checkpoints (tools/make_tiny_checkpoint.py); transformers' generate on each prompt alone, with the
same end-of-sequence token, is the oracle.
"""

import json
import os
import shutil
import sys

import h5py
import numpy as np
import pytest
import torch

from tests.conftest import ROOT, run_job

sys.path.insert(0, os.path.join(ROOT, "tools"))
from make_tiny_checkpoint import make, train_tokenizer  # noqa: E402

torch.set_num_threads(1)
CORPUS = os.path.join(ROOT, "tests", "data", "tiny_corpus.txt")
TEXTS = [
    "The experts compute.",
    "Each request ends at its end-of-sequence token",
    "Slurm sends a signal",
    "A batch of requests is prefilled once, then decoded",
]
STEPS = 6


@pytest.fixture(scope="module")
def workloads(tmp_path_factory):
    """family -> (checkpoint dir, prompts.jsonl, eos id, oracle tokens [b, STEPS] padded -1, lengths [b])."""
    from tokenizers import Tokenizer

    built = {}
    for family in ("mixtral", "deepseek_v3"):
        directory = str(tmp_path_factory.mktemp(family))
        model = make(family, directory, vocab_size=320)
        train_tokenizer(directory, CORPUS, 320)
        tokenizer = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
        prompts = [tokenizer.encode(text).ids for text in TEXTS]
        limits = [STEPS, STEPS, 2, STEPS]  # the third request asks for 2 tokens only
        free = [greedy(model, p, STEPS, None) for p in prompts]
        eos = free[0][2]  # the first request ends after 3 tokens; others may end early too
        assert eos not in free[0][:2]
        for name in ("config.json", "generation_config.json"):
            path = os.path.join(directory, name)
            settings = json.load(open(path))
            json.dump({**settings, "eos_token_id": eos}, open(path, "w"))
        tokens = np.full((len(prompts), STEPS), -1, dtype=np.int64)
        for i, (prompt, limit) in enumerate(zip(prompts, limits)):
            made = greedy(model, prompt, limit, eos)
            tokens[i, : len(made)] = made
        lengths = (tokens >= 0).sum(1)
        # some end early, some not
        assert lengths[0] == 3 and lengths[2] <= 2 and lengths.max() == STEPS, lengths
        jsonl = os.path.join(directory, "prompts.jsonl")
        with open(jsonl, "w") as f:
            for i, (text, limit) in enumerate(zip(TEXTS, limits)):
                f.write(
                    json.dumps(
                        {
                            "id": f"req-{i}",
                            "prompt": text,
                            **({"max_new_tokens": limit} if limit != STEPS else {}),
                        }
                    )
                    + "\n"
                )
        built[family] = (directory, jsonl, eos, tokens, lengths, prompts)
    return built


@torch.no_grad()
def greedy(model, prompt, limit, eos):
    """transformers' generate on one prompt alone: -> the new tokens (the eos token kept)."""
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        max_new_tokens=limit,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0,
        attention_mask=torch.ones_like(ids),
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("ranks", [1, 2, 4])
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_text_prompts_end_at_eos_like_transformers(workloads, tmp_path, family, ranks):
    from tokenizers import Tokenizer

    directory, jsonl, eos, tokens, lengths, prompts = workloads[family]
    config = tmp_path / "config.yaml"
    config.write_text(
        json.dumps({"model": {"checkpoint": directory}, "run": {"prompts": jsonl, "max_new_tokens": STEPS}})
    )
    result = run_job(ranks, tmp_path / "run.h5", config=str(config))
    assert result.returncode == 0, result.stderr
    tokenizer = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    with h5py.File(tmp_path / "run.h5") as f:
        assert f.attrs["complete"]
        np.testing.assert_array_equal(f["generated"][:], tokens)
        np.testing.assert_array_equal(f["generated_lengths"][:], lengths)
        assert [x.decode() for x in f["request_ids"][:]] == [f"req-{i}" for i in range(len(TEXTS))]
        for row, prompt in zip(f["prompt_ids"][:], prompts):  # the tokenizer's own encoding, BOS included
            assert list(row[row >= 0]) == prompt and prompt[0] == 1
        texts = [x.decode() for x in f["generated_text"][:]]
        assert texts == [
            tokenizer.decode([int(t) for t in row if t >= 0], skip_special_tokens=False) for row in tokens
        ]
        # after a request ends, no rank routes its tokens to any expert
        routing, top_k, moe_layers = f["routing"][:], 2, f["routing"].shape[1]
        alive = [(lengths > step).sum() for step in range(STEPS)]
        assert routing[0].sum() == sum(map(len, prompts)) * top_k * moe_layers
        for step in range(1, STEPS):
            assert routing[step].sum() == alive[step] * top_k * moe_layers, step
        metrics = f["metrics"].attrs
        decode_tokens = int((tokens[:, 1:] >= 0).sum())
        assert metrics["decode_tokens_per_s"] == pytest.approx(
            decode_tokens / (f["metrics/step_seconds"][1:].sum())
        )


SAMPLING = "run.sampling={temperature: 0.8, top_k: 20, top_p: 0.9, seed: 1}"


@pytest.fixture(scope="module")
def sampled_one_rank(tmp_path_factory):
    path = tmp_path_factory.mktemp("sampled") / "one.h5"
    assert run_job(1, path, SAMPLING).returncode == 0
    return h5py.File(path)["generated"][:]


@pytest.mark.parametrize(
    "ranks, settings",
    [
        (2, []),
        (4, []),
        (4, ["run.micro_batches=4"]),
        (4, ["parallel.layout=ma", "parallel.attention_ranks=3", "parallel.moe_ranks=1"]),
    ],
    ids=["n2", "n4", "n4-micro4", "ma-3+1"],
)
def test_sampling_gives_the_same_tokens_at_any_rank_count_and_layout(
    tmp_path, sampled_one_rank, ranks, settings
):
    result = run_job(ranks, tmp_path / "run.h5", SAMPLING, *settings)
    assert result.returncode == 0, result.stderr
    with h5py.File(tmp_path / "run.h5") as f:
        np.testing.assert_array_equal(f["generated"][:], sampled_one_rank)


def test_sampling_seeds_differ_and_temperature_zero_is_greedy(tmp_path, sampled_one_rank):
    runs = {
        "other_seed": "run.sampling={temperature: 0.8, top_k: 20, top_p: 0.9, seed: 2}",
        "zero": "run.sampling={temperature: 0}",
        "greedy": "run.seed=0",
    }
    tokens = {}
    for name, setting in runs.items():
        assert run_job(1, tmp_path / f"{name}.h5", setting).returncode == 0
        tokens[name] = h5py.File(tmp_path / f"{name}.h5")["generated"][:]
    assert (tokens["other_seed"] != sampled_one_rank).any()
    assert (sampled_one_rank != tokens["greedy"]).any()  # sampling does sample
    np.testing.assert_array_equal(tokens["zero"], tokens["greedy"])


def test_choice_rules_on_constructed_logits():
    """Top-k keeps exactly k candidates, top-p the smallest likely set, and the draw depends only on
    (seed, request id, step)."""
    from types import SimpleNamespace

    from hpcmoe.workload import choose

    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 400, dtype=np.float32))
    ids = [str(i) for i in range(400)]
    draw = lambda **s: choose(
        logits,
        ids,
        [3] * len(ids),
        SimpleNamespace(**{"temperature": 1.0, "top_k": None, "top_p": None, "seed": 0, **s}),
    )
    assert set(draw(top_k=2)) == {0, 1}
    assert set(draw(top_p=0.7)) == {0, 1} and set(draw(top_p=0.5)) == {0}
    free = draw()
    assert set(free) == {0, 1, 2, 3} and abs((free == 0).mean() - 0.5) < 0.1
    # order of the batch does not matter
    np.testing.assert_array_equal(
        choose(
            logits[::-1],
            ids[::-1],
            [3] * len(ids),
            SimpleNamespace(temperature=1.0, top_k=None, top_p=None, seed=0),
        )[::-1],
        free,
    )
    assert choose(logits, ids, [3] * len(ids), None).tolist() == [0] * 400


BAD_LINES = [
    ('{"id": "a", "prompt_ids": [1, 2]}\n{not json}\n', "prompts.jsonl:2: not valid JSON"),
    ('{"prompt_ids": [1, 2]}\n', "prompts.jsonl:1: missing field 'id'"),
    ('{"id": "a", "prompt_ids": []}\n', "prompts.jsonl:1: empty prompt"),
    (
        '{"id": "a", "prompt_ids": [1, 2], "prompt": "x"}\n',
        "prompts.jsonl:1: expected exactly one of 'prompt'",
    ),
    (
        '{"id": "a", "prompt_ids": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]}\n',
        "prompts.jsonl:1: prompt of 10 tokens + 8 new tokens exceeds the model's 16 positions",
    ),
    ('{"id": "a", "prompt": "text"}\n', "prompts.jsonl:1: a text prompt needs a tokenizer"),
    ('{"id": "a", "prompt_ids": [1, "x"]}\n', "prompts.jsonl:1: 'prompt_ids' must be a list of token ids"),
]


@pytest.mark.parametrize("content, message", BAD_LINES, ids=[m.split(": ", 1)[1][:20] for _, m in BAD_LINES])
def test_every_bad_prompt_line_fails_on_every_rank_with_one_line(tmp_path, content, message):
    (tmp_path / "prompts.jsonl").write_text(content)
    result = run_job(
        4,
        tmp_path / "out" / "run.h5",
        f"run.prompts={tmp_path / 'prompts.jsonl'}",
        "model.max_positions=16",
        "run.max_new_tokens=8",
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("hpcmoe: error:")]
    assert len(lines) == 1, result.stderr
    assert message in lines[0] and str(tmp_path) in lines[0]
    assert not os.path.exists(tmp_path / "out" / "run.h5")


def test_checkpoint_without_a_field_and_an_unwritable_output_fail_clearly(workloads, tmp_path):
    directory = str(tmp_path / "broken")
    shutil.copytree(workloads["mixtral"][0], directory)
    settings = json.load(open(os.path.join(directory, "config.json")))
    del settings["num_attention_heads"]
    json.dump(settings, open(os.path.join(directory, "config.json"), "w"))
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"model": {"checkpoint": directory}}))
    result = run_job(4, tmp_path / "run.h5", config=str(config))
    lines = [line for line in result.stderr.splitlines() if line.startswith("hpcmoe: error:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "field 'num_attention_heads' is missing" in lines[0] and "config.json" in lines[0]
    (tmp_path / "a_file").write_text("")
    result = run_job(4, tmp_path / "a_file" / "run.h5")
    lines = [line for line in result.stderr.splitlines() if line.startswith("hpcmoe: error:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "output.path" in lines[0] and "cannot write in" in lines[0]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    directory = tmp_path_factory.mktemp("uninterrupted")
    runs = {}
    for name, settings in {"greedy": [], "sampled": [SAMPLING]}.items():
        assert run_job(2, directory / f"{name}.h5", *settings).returncode == 0
        runs[name] = h5py.File(directory / f"{name}.h5")["generated"][:]
    return runs


@pytest.mark.parametrize("k, kind", [(0, "greedy"), (1, "greedy"), (4, "greedy"), (2, "sampled")])
def test_a_stopped_run_resumes_to_the_uninterrupted_tokens(tmp_path, uninterrupted, k, kind):
    """The last rank gets SIGUSR1 as step k starts (0: during the prefill); the ranks stop at an agreed
    boundary, and --resume re-prefills each unfinished request and continues."""
    settings = [SAMPLING] if kind == "sampled" else []
    stopped = run_job(2, tmp_path / "run.h5", *settings, f"run.signal_at_step={k}")
    assert stopped.returncode == 0, stopped.stderr
    partial = tmp_path / "run.partial.h5"
    with h5py.File(partial) as f:
        done = int(f.attrs["stopped_at_step"])
        # the prefill's vote is waited for; later ones are read a step late
        assert done == (1 if k == 0 else k + 2)
        np.testing.assert_array_equal(f["generated"][:, :done], uninterrupted[kind][:, :done])
    resumed = run_job(2, tmp_path / "resumed.h5", *settings, args=["--resume", str(partial)])
    assert resumed.returncode == 0, resumed.stderr
    with h5py.File(tmp_path / "resumed.h5") as f:
        assert f.attrs["complete"] and f.attrs["resumed_at_step"] == done
        np.testing.assert_array_equal(f["generated"][:], uninterrupted[kind])


def test_resuming_with_another_config_names_the_differing_keys(tmp_path):
    assert run_job(2, tmp_path / "run.h5", "run.signal_at_step=1").returncode == 0
    result = run_job(
        2,
        tmp_path / "resumed.h5",
        "model.num_experts=8",
        "run.max_new_tokens=12",
        args=["--resume", str(tmp_path / "run.partial.h5")],
    )
    lines = [line for line in result.stderr.splitlines() if line.startswith("hpcmoe: error:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert (
        "that run had another config: model.num_experts (4 there, 8 here), run.max_new_tokens (16 there, 12 "
        "here)" in lines[0]
    )
