"""The engine on a GPU (pytest -m gpu; tools/gpu_check.sh runs these on a lent GPU machine).

Float32 keeps the equality contract on the GPU: n ranks sharing one GPU equal one rank, with
micro-batches, emulated nodes and the staging path forced; the tiny checkpoints equal transformers
on the same GPU. Every test here skips, with its reason, where torch sees no GPU.
"""

import json
import os
import sys

import numpy as np
import pytest
import torch

from tests.conftest import LOGIT_TOLERANCE, ROOT, assert_same_run, read_run, run_job

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU: torch.cuda.is_available() is False"),
]
ON_GPU = ["run.device=cuda", "model.dtype=float32"]


def test_one_rank_on_the_gpu_equals_the_cpu(tmp_path):
    for device in ("cuda", "cpu"):
        result = run_job(
            1, tmp_path / f"{device}.h5", f"run.device={device}", "model.dtype=float32", timeout=300
        )
        assert result.returncode == 0, result.stderr
    gpu, cpu = read_run(tmp_path / "cuda.h5"), read_run(tmp_path / "cpu.h5")
    np.testing.assert_array_equal(gpu["generated"], cpu["generated"])
    np.testing.assert_allclose(gpu["logits"], cpu["logits"], atol=1e-3, rtol=0)  # different kernels, float32


@pytest.mark.parametrize(
    "settings",
    [
        ["run.micro_batches=4"],
        [
            "parallel.ranks_per_node=1",
            "parallel.link={bandwidth_gbps: 10, latency_us: 20}",
            "run.micro_batches=2",
        ],
        ["parallel.cuda_aware_mpi=false", "parallel.dispatch=two_stage", "parallel.ranks_per_node=1"],
    ],
)
def test_two_ranks_sharing_the_gpu_equal_one(tmp_path, settings):
    alone = run_job(1, tmp_path / "alone.h5", *ON_GPU, timeout=300)
    together = run_job(2, tmp_path / "together.h5", *ON_GPU, *settings, timeout=300)
    assert alone.returncode == 0 and together.returncode == 0, alone.stderr + together.stderr
    assert_same_run(read_run(tmp_path / "together.h5"), read_run(tmp_path / "alone.h5"))


def test_attention_moe_separation_sharing_the_gpu_equals_one_rank(tmp_path):
    """ma 2+1 on one GPU over 2 emulated nodes: head slices, vocabulary split, hierarchical sum on the
    device."""
    alone = run_job(1, tmp_path / "alone.h5", *ON_GPU, timeout=300)
    ma = run_job(
        3,
        tmp_path / "ma.h5",
        *ON_GPU,
        "parallel.layout=ma",
        "parallel.attention_ranks=2",
        "parallel.moe_ranks=1",
        "parallel.ranks_per_node=1",
        "run.micro_batches=2",
        timeout=300,
    )
    assert alone.returncode == 0 and ma.returncode == 0, alone.stderr + ma.stderr
    assert_same_run(read_run(tmp_path / "ma.h5"), read_run(tmp_path / "alone.h5"))


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_tiny_checkpoints_equal_transformers_on_the_gpu(tmp_path, family):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from make_tiny_checkpoint import make

    from tests.test_checkpoint import PROMPTS, STEPS, transformers_greedy

    model = make(family, str(tmp_path / family)).to("cuda")
    tokens, logits = transformers_greedy(model, PROMPTS, STEPS)
    config = tmp_path / "config.yaml"
    config.write_text(
        json.dumps(
            {
                "model": {"checkpoint": str(tmp_path / family), "dtype": "float32"},
                "run": {"prompt_ids": PROMPTS, "max_new_tokens": STEPS, "device": "cuda"},
                "output": {"save_logits": True},
            }
        )
    )
    result = run_job(1, tmp_path / "run.h5", config=str(config), timeout=300)
    assert result.returncode == 0, result.stderr
    run = read_run(tmp_path / "run.h5")
    np.testing.assert_array_equal(run["generated"], tokens)
    np.testing.assert_allclose(run["logits"], logits, atol=LOGIT_TOLERANCE, rtol=0)


def test_fp8_experts_on_the_gpu():
    """hpcmoe/model/fp8.py on the GPU: float32 computes with exactly the dequantized weights (as on the CPU);
    bfloat16 runs the FP8 GEMM with the block scales where torch and the GPU support it (activations
    quantized per 1 x 128 block: near the dequantized result, not equal), else the dequantized path."""
    import torch.nn.functional as F

    from hpcmoe.model import fp8
    from hpcmoe.model.fp8 import dequantize

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from make_tiny_checkpoint import block_quantize

    block, hidden, inner = [128, 128], 512, 256
    generator = torch.Generator().manual_seed(0)
    projections = [
        block_quantize(torch.randn(rows, columns, generator=generator) * columns**-0.5, block)
        for rows, columns in ((inner, hidden), (inner, hidden), (hidden, inner))
    ]
    weights = [dequantize(w, s, block).cuda() for w, s in projections]
    projections = [(w.cuda(), s.cuda()) for w, s in projections]
    x = torch.randn(6, hidden, generator=generator).cuda()
    expected = F.linear(F.silu(F.linear(x, weights[0])) * F.linear(x, weights[1]), weights[2])
    torch.testing.assert_close(fp8.mlp(x, *projections, block), expected, rtol=0, atol=1e-4)
    got = fp8.mlp(x.bfloat16(), *projections, block).float()
    path = (
        "dequantized"
        if x.device in fp8.SCALED_MM_FAILED or torch.cuda.get_device_capability() < (8, 9)
        else "scaled_mm"
    )
    error = (got - expected).norm() / expected.norm()
    assert error < 0.05, f"{path}: relative error {error:.4f}"
