"""FP8 checkpoints in DeepSeek-V3's format (float8_e4m3fn weights, one float32 scale per block).

The tiny checkpoint is block-quantized by tools/make_tiny_checkpoint.py (blocks of 16 x 16, so
most matrices have several blocks and partial edge blocks). The oracle is transformers on the same
checkpoint dequantized here, in float32, with the same block recipe: hpcmoe computes in float32
from exactly those weights, so the usual float32 tolerance holds.
"""

import json
import os
import shutil
import sys

import pytest
import torch

from tests.conftest import ROOT, run_job
from tests.test_checkpoint import PROMPTS, STEPS, assert_job_equals_transformers, transformers_greedy

sys.path.insert(0, os.path.join(ROOT, "tools"))
from make_tiny_checkpoint import make, quantize_fp8  # noqa: E402

BLOCK = [16, 16]


def dequantized(directory: str) -> dict:
    """The checkpoint's tensors with every FP8 weight times its block scales, in float32 (the oracle's own
    code)."""
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(directory, "model.safetensors"))
    weights = {}
    for name, tensor in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        if tensor.dtype == torch.float8_e4m3fn:
            scale = tensors[name + "_scale_inv"]
            rows, columns = tensor.shape
            full = scale.repeat_interleave(BLOCK[0], 0).repeat_interleave(BLOCK[1], 1)[:rows, :columns]
            tensor = tensor.float() * full
        weights[name] = tensor.float()
    return weights


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    directory = str(tmp_path_factory.mktemp("fp8"))
    make("deepseek_v3", directory)
    quantize_fp8(directory, BLOCK)
    plain = str(tmp_path_factory.mktemp("fp8_dequantized"))  # the same weights, unquantized, for transformers
    config = json.load(open(os.path.join(directory, "config.json")))
    del config["quantization_config"]
    json.dump(config, open(os.path.join(plain, "config.json"), "w"))
    save_file(dequantized(directory), os.path.join(plain, "model.safetensors"), metadata={"format": "pt"})
    oracle = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32).eval()
    return directory, *transformers_greedy(oracle, PROMPTS, STEPS)


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_fp8_checkpoint_equals_transformers_on_its_dequantized_weights(fp8_checkpoint, tmp_path, ranks):
    assert_job_equals_transformers(fp8_checkpoint, tmp_path, ranks, {})


def test_routed_experts_stay_one_byte_per_weight(fp8_checkpoint):
    from hpcmoe.config import load_config
    from hpcmoe.model.build import build_experts
    from hpcmoe.model.checkpoint import check_tensors, tensor_loader
    from hpcmoe.model.sizes import expected_tensors, parameter_bytes

    directory = fp8_checkpoint[0]
    m = load_config(None, [f"model.checkpoint={directory}"]).model
    assert m.fp8_block == BLOCK
    reads = []
    experts = build_experts(
        m, [1, 4], tensor_loader(directory, check_tensors(directory, expected_tensors(m), BLOCK), reads)
    )
    weights = [p for n, p in experts.named_parameters() if n.endswith(".weight")]
    scales = [p for n, p in experts.named_parameters() if n.endswith("_scale_inv")]
    assert weights and all(p.dtype == torch.float8_e4m3fn and p.element_size() == 1 for p in weights)
    held = sum(p.numel() * p.element_size() for p in experts.parameters())
    assert held == sum(p.numel() for p in weights) + 4 * sum(p.numel() for p in scales)
    assert sum(end - start for _, start, end in reads) == held  # read as stored: no dequantized copy
    per_expert = parameter_bytes(m, 1)[1] - parameter_bytes(m, 0)[1]
    assert held == 2 * per_expert


@pytest.mark.parametrize(
    "breakage, message",
    [
        (
            "shape",
            "tensor model.layers.1.mlp.experts.3.up_proj.weight_scale_inv has shape [1, 8] (F32), expected "
            "[2, 4]",
        ),
        ("missing", "tensor model.layers.2.self_attn.kv_b_proj.weight_scale_inv (the scales of FP8"),
        ("block", "weight_block_size [16]: expected two positive integers"),
    ],
)
def test_malformed_fp8_checkpoints_fail_naming_the_tensor(fp8_checkpoint, tmp_path, breakage, message):
    from safetensors.torch import load_file, save_file

    directory = str(tmp_path / "broken")
    shutil.copytree(fp8_checkpoint[0], directory)
    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    if breakage == "shape":
        name = "model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"
        tensors[name] = tensors[name].reshape(1, -1)
    elif breakage == "missing":
        del tensors["model.layers.2.self_attn.kv_b_proj.weight_scale_inv"]
    else:
        config = json.load(open(os.path.join(directory, "config.json")))
        config["quantization_config"]["weight_block_size"] = [16]
        json.dump(config, open(os.path.join(directory, "config.json"), "w"))
    save_file(tensors, path, metadata={"format": "pt"})
    (tmp_path / "config.yaml").write_text(json.dumps({"model": {"checkpoint": directory}}))
    result = run_job(2, tmp_path / "run.h5", config=str(tmp_path / "config.yaml"))
    lines = [line for line in result.stderr.splitlines() if line.startswith("hpcmoe: error:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert message in lines[0]


def test_every_e4m3_byte_dequantizes_exactly():
    """hpcmoe/model/fp8.py's integer and float16 conversion gives float8 value x scale, rounded once, for all
    256 bytes but the two NaNs (which checkpoints do not hold)."""
    from hpcmoe.model import fp8

    weight = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).view(16, 16)
    scale = torch.tensor([[0.37]])
    out = fp8.dequantize_rows(
        weight,
        fp8.scaled(scale, "test"),
        [16, 16],
        0,
        16,
        torch.empty(16, 16),
        torch.empty(16, 16, dtype=torch.int16),
    )
    expected = weight.float() * 0.37
    finite = ~expected.isnan()
    assert finite.sum() == 254 and torch.equal(out[finite], expected[finite])


@pytest.mark.parametrize(
    "hidden, inner, block, chunk",
    [
        (64, 32, [16, 16], None),  # the tiny checkpoint's expert, one chunk
        (200, 72, [16, 16], None),  # partial edge blocks
        (256, 384, [128, 128], 128 * 64),  # chunks of a quarter block row
        (200, 300, [128, 128], 256 * 100),  # a partial last block row, partial column blocks
    ],
)
def test_fp8_expert_computes_with_exactly_its_dequantized_weights(monkeypatch, hidden, inner, block, chunk):
    from make_tiny_checkpoint import block_quantize

    from hpcmoe.model import fp8
    from hpcmoe.model.fp8 import dequantize
    from hpcmoe.model.mlp import MLP

    if chunk is not None:
        monkeypatch.setattr(fp8, "CHUNK_ELEMENTS", chunk)
    generator = torch.Generator().manual_seed(hidden + inner)
    with torch.device("meta"):
        quantized, twin = MLP(hidden, inner), MLP(hidden, inner)
    quantized.keep_fp8(block)
    quantized.allocate_fp8("cpu")
    twin.allocate(torch.empty(2 * inner, hidden), torch.empty(hidden, inner))
    with torch.no_grad():
        for name in ("gate_proj", "up_proj", "down_proj"):
            q, t = getattr(quantized, name), getattr(twin, name)
            weight, scale = block_quantize(
                torch.randn(q.weight.shape, generator=generator) * q.weight.shape[1] ** -0.5, block
            )
            q.weight.copy_(weight)
            q.weight_scale_inv.copy_(scale)
            t.weight.copy_(dequantize(weight, scale, block))
            rows = weight.shape[0]
            step = fp8.chunk_rows(weight.shape[1], block[0], rows)
            pieces = [
                fp8.dequantize_rows(
                    weight,
                    fp8.scaled(scale, "test"),
                    block,
                    start,
                    min(rows, start + step),
                    torch.empty(min(rows, start + step) - start, weight.shape[1]),
                    torch.empty(min(rows, start + step) - start, weight.shape[1], dtype=torch.int16),
                ).clone()
                for start in range(0, rows, step)
            ]
            assert torch.equal(torch.cat(pieces), t.weight)  # the same weights, bit for bit
    for m in (1, 5, 40):
        x = torch.randn(m, hidden, generator=generator)
        expected = twin(x)
        got, into = quantized(x), torch.empty(m, hidden)
        quantized(x, out=into)
        assert torch.equal(got, into)
        if chunk is None:  # the same GEMMs on the same weights
            assert torch.equal(got, expected)
        else:  # GEMMs over other column ranges may sum in another order: float32 rounding
            assert (got - expected).abs().max() <= 1e-6 * expected.abs().max()
        assert quantized(x.view(1, m, hidden)).shape == (1, m, hidden)
