"""Tensor parallelism inside experts (parallel.expert_tp): each expert slot on a group of T ranks.

Whole jobs must give the 1-rank run's tokens, logits within LOGIT_TOLERANCE (float32: a member's
partial sums add up in another order than one GEMM's), for every way rows reach a group (to every
member, or to a leader that forwards) and with every placement and dispatch; each rank holds and
reads exactly 1/T of its experts; bad layouts fail naming the numbers.
"""

import h5py
import numpy as np
import pytest
import torch

from hpcmoe.config import load_config
from hpcmoe.parallel.layout import ParallelLayout
from tests.conftest import DEBUG_CONFIG, assert_same_run, read_run, run_job
from tests.test_checkpoint import assert_job_equals_transformers, checkpoints  # noqa: F401 (a fixture)
from tests.test_fp8 import BLOCK, fp8_checkpoint  # noqa: F401 (a fixture)

_runs = {}


def finished(tmp_path_factory, ranks, *settings):
    key = (ranks, settings)
    if key not in _runs:
        path = tmp_path_factory.mktemp("tp") / "run.h5"
        result = run_job(ranks, path, "output.save_logits=true", *settings, timeout=240)
        assert result.returncode == 0, result.stderr
        _runs[key] = path
    return _runs[key]


JOBS = [  # (ranks, model settings, parallel settings)
    (8, [], ["parallel.expert_tp=2"]),  # 4 experts x 2, to every member
    (
        8,
        [],
        [
            "parallel.expert_tp=2",
            "parallel.expert_tp_dispatch=leader",
            "run.micro_batches=2",
            "run.decode_micro_batch_min=1",
        ],
    ),
    (8, ["model.num_experts=2"], ["parallel.expert_tp=4"]),  # 2 experts x 4
    (4, [], ["parallel.expert_tp=2", "parallel.placement=packed"]),  # 2 groups of 2, 2 experts each
    (
        8,
        [],
        [
            "parallel.expert_tp=2",
            "parallel.placement=replicated",
            "parallel.experts_per_rank=2",
            "parallel.ranks_per_node=4",
            "parallel.dispatch=two_stage",
            "run.micro_batches=3",
            "run.decode_micro_batch_min=1",
        ],
    ),
]


@pytest.mark.parametrize("ranks, model, parallel", JOBS)
def test_expert_groups_equal_one_rank(tmp_path_factory, ranks, model, parallel):
    run = finished(tmp_path_factory, ranks, *model, *parallel)
    assert_same_run(read_run(run), read_run(finished(tmp_path_factory, 1, *model)))
    tp = int(next(s for s in parallel if s.startswith("parallel.expert_tp=")).split("=")[1])
    with h5py.File(run) as f:
        placement = f["placement"][:]
        assert f["placement"].attrs["expert_tp"] == tp
        assert (placement[placement >= 0] % tp == 0).all()  # each entry is a group's first rank
        received = f["traffic"][:].sum(axis=(0, 1, 2))
        assert (received > 0).all(), "every rank computes a share of the experts"


@pytest.mark.parametrize(
    "ranks, settings", [(4, ["parallel.expert_tp=4", "run.micro_batches=2", "run.decode_micro_batch_min=1"])]
)
def test_expert_groups_are_bit_identical_from_run_to_run(tmp_path, ranks, settings):
    """Partials are summed in member order whatever order they arrive in: two runs, the same bits."""
    runs = []
    for i in range(2):
        result = run_job(
            ranks, tmp_path / f"{i}.h5", "output.save_logits=true", "model.num_experts=2", *settings
        )
        assert result.returncode == 0, result.stderr
        runs.append(read_run(tmp_path / f"{i}.h5"))
    assert np.array_equal(runs[0]["logits"], runs[1]["logits"])


def test_each_member_holds_and_reads_a_slice_of_each_expert(checkpoints):  # noqa: F811
    """Rank 1 of groups of 2 (tiny DeepSeek-V3 checkpoint): the second half of gate/up's rows and of
    down's columns of its group's experts, equal to the whole model's, and only those bytes read."""
    from hpcmoe.model.build import build_model
    from hpcmoe.model.checkpoint import check_tensors, tensor_loader
    from hpcmoe.model.sizes import expected_tensors
    from tests.test_checkpoint import load_local

    directory = checkpoints["deepseek_v3"][0]
    config, whole = load_local(directory)
    m, full = config.model, dict(whole.named_parameters())
    index = check_tensors(directory, expected_tensors(m))
    reads, everything = [], []
    member = build_model(m, [1, 4], tensor_loader(directory, index, reads), expert_shard=(1, 2))
    build_model(m, [], tensor_loader(directory, index, everything))  # fills `everything`
    experts = {n: p for n, p in member.named_parameters() if ".mlp.experts." in n}
    assert len(experts) == 2 * 3 * m.moe_layers
    inner = m.expert_hidden // 2
    for name, param in experts.items():
        dim = 1 if "down_proj" in name else 0
        assert param.numel() * 2 == full[name].numel()  # 1/T of the whole
        assert torch.equal(param, full[name].narrow(dim, inner, inner)), name
    expert_bytes = sum(p.numel() * p.element_size() for p in experts.values())
    assert sum(e - s for _, s, e in reads) - sum(e - s for _, s, e in everything) == expert_bytes


def test_fp8_members_read_their_blocks_as_stored(fp8_checkpoint):  # noqa: F811
    from hpcmoe.model.build import build_model
    from hpcmoe.model.checkpoint import check_tensors, tensor_loader
    from hpcmoe.model.sizes import expected_tensors

    directory = fp8_checkpoint[0]
    m = load_config(None, [f"model.checkpoint={directory}"]).model
    index = check_tensors(directory, expected_tensors(m), BLOCK)
    halves = [
        dict(build_model(m, [3], tensor_loader(directory, index), expert_shard=(j, 2)).named_parameters())
        for j in range(2)
    ]
    whole = dict(build_model(m, [3], tensor_loader(directory, index)).named_parameters())
    for name, param in whole.items():
        if ".mlp.experts.3." in name:
            dim = 1 if "down_proj" in name else 0
            assert param.dtype == (torch.float32 if name.endswith("_scale_inv") else torch.float8_e4m3fn)
            joined = torch.cat(
                [h[name].view(torch.uint8) if h[name].element_size() == 1 else h[name] for h in halves], dim
            )
            assert torch.equal(joined, param.view(torch.uint8) if param.element_size() == 1 else param), name


@pytest.mark.parametrize(
    "name, parallel",
    [("deepseek_v3", {"expert_tp": 2}), ("mixtral", {"expert_tp": 2, "expert_tp_dispatch": "leader"})],
)
def test_checkpoint_in_expert_groups_equals_transformers(checkpoints, tmp_path, name, parallel):  # noqa: F811
    assert_job_equals_transformers(checkpoints[name], tmp_path, 4, parallel)


def test_fp8_checkpoint_in_expert_groups_equals_transformers(fp8_checkpoint, tmp_path):  # noqa: F811
    assert_job_equals_transformers(fp8_checkpoint, tmp_path, 4, {"expert_tp": 2})


@pytest.mark.parametrize(
    "ranks, settings, message",
    [
        (6, ["parallel.expert_tp=4"], r"world size \(6\) must be a multiple of parallel.expert_tp \(4\)"),
        (
            8,
            ["parallel.expert_tp=2", "parallel.placement=one_per_rank", "model.num_experts=8"],
            r"one_per_rank needs model.num_experts \(8\) == expert groups \(world size 8 / "
            r"parallel.expert_tp 2 = 4\)",
        ),
        (4, ["parallel.expert_tp=3"], r"parallel.expert_tp \(3\) must divide model.expert_hidden \(128\)"),
        (
            6,
            ["parallel.expert_tp=2", "parallel.ranks_per_node=3"],
            r"parallel.ranks_per_node \(3\) must be a multiple of parallel.expert_tp \(2\)",
        ),
        (
            4,
            [
                "parallel.expert_tp=2",
                "parallel.layout=ma",
                "parallel.attention_ranks=2",
                "parallel.moe_ranks=2",
            ],
            r"parallel.expert_tp \(2\) splits experts over groups of ep ranks; parallel.layout=ma",
        ),
    ],
)
def test_expert_groups_that_do_not_fit_name_the_numbers(ranks, settings, message):
    with pytest.raises(ValueError, match=message):
        ParallelLayout.from_config(load_config(DEBUG_CONFIG, settings), ranks)


def test_groups_across_real_nodes_are_refused_naming_the_group():
    layout = ParallelLayout.from_config(load_config(DEBUG_CONFIG, ["parallel.expert_tp=2"]), 6)
    with pytest.raises(ValueError, match=r"expert group 1 \(ranks 2..3\) spans nodes \[0, 1\]"):
        layout.placement((0, 0, 0, 1, 1, 1))


def test_fp8_shares_must_be_whole_blocks(fp8_checkpoint):  # noqa: F811
    directory = fp8_checkpoint[0]
    inner = load_config(None, [f"model.checkpoint={directory}"]).model.expert_hidden
    with pytest.raises(
        ValueError, match=rf"model.expert_hidden \({inner} / 4 = {inner // 4}\) must be whole FP8 blocks"
    ):
        load_config(None, [f"model.checkpoint={directory}", "parallel.expert_tp=4"])
