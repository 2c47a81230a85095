"""MXFP4 expert weights as gpt-oss publishes them: 4-bit floats (e2m1: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and
their negatives), two to a byte (the even-indexed weight in the low nibble), and one shared 8-bit
exponent per 32 weights of a row (the weight is the 4-bit value times 2 ** (exponent - 127)).

They stay that way in memory (4.25 bits a weight) and are turned into the compute dtype per call, a
projection at a time: no CPU or GPU here multiplies in FP4. Every MXFP4 weight is a float with at
most two significant bits times a power of two, so the conversion is exact in float32 and bfloat16:
the weights are bit for bit those of the dequantized twin checkpoint.
"""

from __future__ import annotations

import torch

BLOCK = 32  # weights per shared exponent
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
EXPONENT_BIAS = 127
TABLES: dict = {}  # (dtype, device) -> [256, 2]: the two weights of every byte


def pair_table(dtype: torch.dtype, device) -> torch.Tensor:
    key = (dtype, device)
    if key not in TABLES:
        values = torch.tensor(E2M1, dtype=torch.float32)
        byte = torch.arange(256)
        TABLES[key] = torch.stack([values[byte & 15], values[byte >> 4]], dim=1).to(
            device=device, dtype=dtype
        )
    return TABLES[key]


def dequantize(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """blocks [rows, columns / 32, 16] uint8, scales [rows, columns / 32] uint8
    -> [rows, columns] in `dtype`."""
    rows, groups, _ = blocks.shape
    values = pair_table(dtype, blocks.device)[blocks.long()]  # [rows, groups, 16, 2]
    powers = torch.exp2(scales.to(torch.float32) - EXPONENT_BIAS).to(dtype)  # exact: a power of two
    return values.view(rows, groups, BLOCK).mul_(powers[..., None]).view(rows, groups * BLOCK)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [rows, columns] (columns a multiple of 32) -> (blocks, scales) as above: per 32 weights
    the smallest exponent that brings the largest magnitude within 6, then each weight to the
    nearest 4-bit value (ties to the lower code). For making test checkpoints."""
    rows, columns = weight.shape
    grouped = weight.float().reshape(rows, columns // BLOCK, BLOCK)
    largest = grouped.abs().amax(-1).clamp(min=2.0**-126)
    exponent = torch.ceil(torch.log2(largest / 6.0)).clamp(-EXPONENT_BIAS, 127)
    scaled = grouped / torch.exp2(exponent)[..., None]
    codes = (scaled[..., None] - torch.tensor(E2M1)).abs().argmin(-1)  # [rows, groups, 32] in 0..15
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return packed, (exponent + EXPONENT_BIAS).to(torch.uint8)
