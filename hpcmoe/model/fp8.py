"""Routed experts kept as an FP8 checkpoint stores them (DeepSeek-V3: float8_e4m3fn weights, one
float32 scale `weight_scale_inv` per block of rows x columns), run without a dequantized copy.

On a CPU each projection is dequantized in chunks of output rows into small reused buffers (one set
per process) and each chunk's GEMM runs while the chunk is still in cache: nothing is allocated per
call and every weight is dequantized once per call. The weights are exactly those of the dequantized
twin (float8 value x its block's scale, rounded once to float32). Where a projection fits one chunk
the GEMMs are the twin's (fused gate/up, then down), so the outputs are its bits; with several chunks
each GEMM covers a range of output rows, which MKL sums alike on every shape measured (bitwise in
tools/bench_fp8.py) but does not promise: at worst float32 rounding in the last bits.

The conversion uses only vectorized integer and float16 kernels (torch's own float8 -> float copy
is a scalar loop, ~3 ns a weight on this box): an e4m3 byte sign-extended to int16, shifted left by
7 and with bit 14 cleared is the float16 whose value is the e4m3 value times 2**-8, subnormals
included (both formats put the same mantissa bits under an exponent offset by 8). float16 ->
float32 is exact, and the 2**8 is folded into the block scale: (v * 2**-8) * (s * 2**8) is the same
real number as v * s, so it rounds to the same float32. The one difference: e4m3's NaN (0x7f, 0xff)
comes out as +-480 times the scale; checkpoints hold no NaN weights.

On a GPU that has FP8 tensor cores (CUDA capability 8.9 or later), in bfloat16 or float16 compute,
the projections run as FP8 GEMMs with the block scales (torch's scaled_mm, activations quantized
per 1 x 128 block as DeepSeek-V3 does: not the dequantized twin's numbers); where that is not
supported (torch restricts these block scales to some GPUs; the first failure marks the device) and
in float32 the dequantized path runs, with whole projections as its chunks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 19  # weights per dequantized chunk on a CPU: 2 MiB of float32, 1 MiB of int16
# (tools/bench_fp8.py --chunks: 2**18..2**20 alike, 2**17 and 2**21 slower)
F16_OF_E4M3_MASK = -16385  # 0xBFFF as int16: clears bit 14 (the sign copy that the shift leaves there)
E4M3_SHIFT = 128  # << 7: e4m3's exponent and mantissa bits under float16's
UNSCALE = 256.0  # 2 ** 8, folded into the block scales


class Scratch:
    """Reused buffers of one process, by name, dtype and device, grown when a call needs more; the
    views of each shape asked for are kept too (a view costs microseconds, small experts many)."""

    def __init__(self):
        self.buffers: dict[tuple, tuple[torch.Tensor, dict]] = {}

    def get(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        key = (name, dtype, device)
        entry = self.buffers.get(key)
        view = entry[1].get(shape) if entry is not None else None
        if view is not None:
            return view
        count = 1
        for n in shape:
            count *= n
        if entry is None or entry[0].numel() < count:
            entry = self.buffers[key] = (torch.empty(count, dtype=dtype, device=device), {})
        view = entry[1][shape] = entry[0][:count].view(shape)
        return view

    def nbytes(self) -> int:
        return sum(buffer.numel() * buffer.element_size() for buffer, _ in self.buffers.values())


SCRATCH = Scratch()


def dequantize(weight, scale, block: list[int], offset: int = 0, dim: int = 0):
    """weight [r, c] float8 -> float32 W = weight x scale of its block; scale [ceil(r / b0), ceil(c / b1)]
    (of a part of the weight that starts `offset` rows or columns into its first block along `dim`)."""
    rows, columns = weight.shape
    # whole blocks: scaled in place
    if (
        offset == 0
        and (rows % block[0], columns % block[1]) == (0, 0)
        and tuple(scale.shape) == (rows // block[0], columns // block[1])
    ):
        blocks = weight.to(torch.float32).view(rows // block[0], block[0], columns // block[1], block[1])
        return blocks.mul_(scale[:, None, :, None]).view(rows, columns)
    expanded = scale.repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)
    expanded = expanded.narrow(dim, offset, weight.shape[dim])
    return weight.float() * expanded[: weight.shape[0], : weight.shape[1]]


def scaled(scale: torch.Tensor, name: str) -> torch.Tensor:
    """The block scales times 2**8 (the float16 trick's offset), in a scratch buffer."""
    return torch.mul(scale, UNSCALE, out=SCRATCH.get(name, tuple(scale.shape), torch.float32, scale.device))


def dequantize_rows(
    weight: torch.Tensor,
    scales: torch.Tensor,
    block: list[int],
    start: int,
    stop: int,
    out: torch.Tensor,
    bits: torch.Tensor,
) -> torch.Tensor:
    """Rows start:stop of an FP8 weight -> out [stop - start, columns] float32, exactly the weight
    times its block scales; scales from `scaled`, bits an int16 scratch of out's shape."""
    bits.copy_(weight[start:stop].view(torch.int8))  # sign-extended
    bits.mul_(E4M3_SHIFT).bitwise_and_(F16_OF_E4M3_MASK)
    out.copy_(bits.view(torch.float16))  # the e4m3 value times 2**-8, exactly
    (b0, b1), columns = block, out.shape[1]
    whole = columns % b1 == 0  # no partial block of columns: scales broadcast by a view
    if whole and start % b0 == 0 and (stop - start) % b0 == 0:
        first, count = start // b0, (stop - start) // b0
        out.view(count, b0, columns // b1, b1).mul_(scales[first : first + count, None, :, None])
        return out
    for b in range(start // b0, -(-stop // b0)):  # a part of a block row, or a partial last one
        low, high = max(start, b * b0), min(stop, (b + 1) * b0)
        piece = out[low - start : high - start]
        if whole:
            piece.view(high - low, columns // b1, b1).mul_(scales[b].view(1, -1, 1))
        else:
            piece.mul_(scales[b].repeat_interleave(b1)[:columns])
    return out


def chunk_rows(columns: int, block_rows: int, total: int) -> int:
    """Output rows per dequantized chunk: about CHUNK_ELEMENTS weights, whole block rows when that
    many fit, else a divisor of the block's rows (a chunk then lies in one block row)."""
    rows = max(1, CHUNK_ELEMENTS // max(columns, 1))
    rows = rows - rows % block_rows if rows >= block_rows else block_rows // -(-block_rows // rows)
    return max(1, min(rows, total))


def mlp_dequantized(
    x: torch.Tensor, gate, up, down, block: list[int], out: torch.Tensor | None
) -> torch.Tensor:
    """SwiGLU of x [m, H] with FP8 projections (weight, scale) -> [m, H] in x's dtype (into `out`
    when given): gate and up dequantized together chunk by chunk, one GEMM per chunk for both,
    then down chunk by chunk (whole projections as one chunk off the CPU)."""
    (gate_w, gate_s), (up_w, up_s), (down_w, down_s) = gate, up, down
    inner, hidden = gate_w.shape
    m, dtype, device = x.shape[0], x.dtype, x.device
    out = torch.empty(m, hidden, dtype=dtype, device=device) if out is None else out
    if m == 0:
        return out
    act = SCRATCH.get("act", (m, inner), dtype, device)
    scales = [scaled(s, f"scales{i}") for i, s in enumerate((gate_s, up_s, down_s))]
    cpu = device.type == "cpu"

    rows = chunk_rows(hidden, block[0], inner) if cpu else inner
    for start in range(0, inner, rows):
        stop = min(inner, start + rows)
        n = stop - start
        bits = SCRATCH.get("bits", (2 * n, hidden), torch.int16, device)
        weights = SCRATCH.get("weights", (2 * n, hidden), torch.float32, device)
        dequantize_rows(gate_w, scales[0], block, start, stop, weights[:n], bits[:n])
        dequantize_rows(up_w, scales[1], block, start, stop, weights[n:], bits[n:])
        if dtype != torch.float32:
            weights = SCRATCH.get("cast", (2 * n, hidden), dtype, device).copy_(weights)
        both = SCRATCH.get("both", (m, 2 * n), dtype, device)
        torch.mm(x, weights.t(), out=both)
        torch.mul(F.silu(both[:, :n], inplace=True), both[:, n:], out=act[:, start:stop])

    rows = chunk_rows(inner, block[0], hidden) if cpu else hidden
    # GEMMs straight into out: one row, or one chunk
    direct = out.is_contiguous() and (m == 1 or rows >= hidden)
    for start in range(0, hidden, rows):
        stop = min(hidden, start + rows)
        n = stop - start
        bits = SCRATCH.get("bits", (n, inner), torch.int16, device)
        weights = dequantize_rows(
            down_w,
            scales[2],
            block,
            start,
            stop,
            SCRATCH.get("weights", (n, inner), torch.float32, device),
            bits,
        )
        if dtype != torch.float32:
            weights = SCRATCH.get("cast", (n, inner), dtype, device).copy_(weights)
        if direct:
            torch.mm(act, weights.t(), out=out[:, start:stop])
        else:
            part = SCRATCH.get("part", (m, n), dtype, device)
            out[:, start:stop].copy_(torch.mm(act, weights.t(), out=part))
    return out


# ---------------------------------------------------------------- FP8 GEMMs on a GPU

SCALED_MM_FAILED: set = set()  # devices where scaled_mm with block scales raised once: dequantized path there


def scaled_mm_usable(x: torch.Tensor, weights, block: list[int]) -> bool:
    """A CUDA device of capability 8.9 or later (FP8 tensor cores), compute in bfloat16 or float16
    (float32 keeps the dequantized path: it equals the dequantized twin there too), blocks of
    128 x 128, whole blocks, and no earlier failure on this device."""
    device = x.device
    if (
        device.type != "cuda"
        or x.dtype == torch.float32
        or device in SCALED_MM_FAILED
        or list(block) != [128, 128]
    ):
        return False
    if not hasattr(torch, "_scaled_mm") or torch.cuda.get_device_capability(device) < (8, 9):
        return False
    return all(w.shape[0] % 128 == 0 and w.shape[1] % 128 == 0 for w, _ in weights)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [m, K] -> (float8_e4m3fn [m, K], float32 scales [m, K / 128] column-major): one scale per
    1 x 128 block, amax / 448, as DeepSeek-V3 quantizes activations."""
    m, k = x.shape
    blocks = x.float().reshape(m, k // 128, 128)
    scale = blocks.abs().amax(-1).clamp_(min=1e-12).div_(448.0)
    quantized = (blocks / scale.unsqueeze(-1)).to(torch.float8_e4m3fn).view(m, k)
    return quantized, scale.t().contiguous().t()


def scaled_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [m, K] @ FP8 weight [N, K].T with weight blocks of 128 x 128 -> [m, N] in x's dtype."""
    m = x.shape[0]
    pad = -m % 4  # the GEMM wants the token count a multiple of 4
    xq, x_scale = quantize_activations(F.pad(x, (0, 0, 0, pad)) if pad else x)
    k_blocks = scale.shape[1]
    w_scale = F.pad(scale, (0, -k_blocks % 4)) if k_blocks % 4 else scale  # K blocks padded to 4
    if hasattr(F, "scaled_mm"):
        y = F.scaled_mm(
            xq,
            weight.t(),
            x_scale,
            F.ScalingType.BlockWise1x128,
            w_scale.t(),
            F.ScalingType.BlockWise128x128,
            output_dtype=torch.bfloat16,
        )
    else:  # older torch: the block recipe is told by the scales' shapes
        y = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=w_scale.t(), out_dtype=torch.bfloat16)
    return y[:m].to(x.dtype)


def mlp_scaled_mm(x: torch.Tensor, gate, up, down, out: torch.Tensor | None) -> torch.Tensor:
    act = F.silu(scaled_linear(x, *gate)) * scaled_linear(x, *up)
    y = scaled_linear(act, *down)
    return y if out is None else out.copy_(y)


def mlp(x: torch.Tensor, gate, up, down, block: list[int], out: torch.Tensor | None = None) -> torch.Tensor:
    """SwiGLU with FP8 projections, each (weight float8_e4m3fn [rows, columns], scale float32 blocks):
    x [m, H] -> [m, H] in x's dtype, into `out` when given."""
    if len(x) and scaled_mm_usable(x, (gate, up, down), block):
        try:
            return mlp_scaled_mm(x, gate, up, down, out)
        except (RuntimeError, ValueError, NotImplementedError, TypeError):
            # not on this device (or this torch): the dequantized path from now on
            SCALED_MM_FAILED.add(x.device)
    return mlp_dequantized(x, gate, up, down, block, out)
