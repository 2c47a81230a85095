"""`hpcmoe bench experts`: the expert GEMMs on one device as the engine runs them, against
torch.matmul on the same shapes (prefill) and against a device-to-device copy of the weight bytes
they stream (decode), with the fraction of the device's bf16 peak.
"""

from __future__ import annotations

import numpy as np

from hpcmoe.analysis.bench.results import store
from hpcmoe.analysis.bench.timing import synchronized_seconds

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, for "fraction of peak".
BF16_PEAK_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "H800": 989.0,
    "A100": 312.0,
    "GB200": 2500.0,
    "B200": 2250.0,
    "L40S": 362.0,
    "A10": 125.0,
}


def device_peak_tflops(name: str) -> float | None:
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def random_experts(device, hidden: int, inner: int, experts: int, dtype: str):
    """A MoE layer's experts [hidden -> inner -> hidden] on the device, without its gate (only the
    experts are measured), weights random at the scale of their inputs."""
    import torch

    from hpcmoe.config import ModelConfig
    from hpcmoe.model.moe import MoE

    torch_dtype = getattr(torch, dtype)
    cfg = ModelConfig(hidden=hidden, expert_hidden=inner, num_experts=experts, top_k=1, dtype=dtype)
    with torch.device("meta"):
        moe = MoE(cfg, list(range(experts)))
    moe.gate = None  # only the experts are measured
    moe.allocate(device, torch_dtype)
    with torch.no_grad():
        for param in moe.parameters():
            param.copy_(torch.randn(param.shape, device=device, dtype=torch_dtype) * param.shape[-1] ** -0.5)
    return moe


def expert_seconds(moe, rows, experts: int, tokens: int, decode_tokens: int, device, reps: int):
    """rows [experts * tokens, hidden] -> (samples, weight bytes, bytes copied): seconds per call of
    ours and torch_matmul on tokens rows per expert (prefill_seconds), of ours on decode_tokens
    (decode_seconds), and of a device copy of half the weight bytes (copy_seconds)."""
    import torch
    import torch.nn.functional as F

    out_rows = torch.empty_like(rows)
    weights = [(e.gate_up, e.down_proj.weight) for e in moe.experts.values()]

    def ours():
        with torch.no_grad():
            moe.run_experts(rows, [tokens] * experts, out_rows)

    def matmul():
        with torch.no_grad():
            for e, (gate_up, down) in enumerate(weights):
                gate, up = torch.matmul(rows[e * tokens : (e + 1) * tokens], gate_up.t()).chunk(2, dim=-1)
                torch.matmul(F.silu(gate) * up, down.t())

    small = rows[: experts * decode_tokens]
    small_out = torch.empty_like(small)

    def decode():
        with torch.no_grad():
            moe.run_experts(small, [decode_tokens] * experts, small_out)

    weight_bytes = sum(g.numel() * g.element_size() + d.numel() * d.element_size() for g, d in weights)
    source = torch.empty(weight_bytes // 2, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    samples = {"ours": {}, "torch_matmul": {}}
    for name, fn in (("ours", ours), ("torch_matmul", matmul)):
        samples[name]["prefill_seconds"] = synchronized_seconds(fn, device, reps)
    samples["ours"]["decode_seconds"] = synchronized_seconds(decode, device, reps)
    samples["ours"]["copy_seconds"] = synchronized_seconds(lambda: target.copy_(source), device, reps)
    return samples, weight_bytes, 2 * source.numel()  # the copy reads and writes


def derived_figures(samples: dict, flops: int, weight_bytes: int, copied_bytes: int, peak) -> dict:
    """From the median seconds: prefill TFLOP/s against torch.matmul's and the bf16 peak (NaN when
    unknown); decode's weight GB/s against the copy's."""
    median = lambda xs: float(np.median(xs))
    prefill = median(samples["ours"]["prefill_seconds"])
    derived = {
        "prefill_tflops": flops / prefill / 1e12,
        "prefill_vs_matmul": median(samples["torch_matmul"]["prefill_seconds"]) / prefill,
        "prefill_fraction_of_bf16_peak": flops / prefill / 1e12 / peak if peak else float("nan"),
        "decode_weight_gbps": weight_bytes / median(samples["ours"]["decode_seconds"]) / 1e9,
        "copy_gbps": copied_bytes / median(samples["ours"]["copy_seconds"]) / 1e9,  # read + write
    }
    derived["decode_vs_copy"] = derived["decode_weight_gbps"] / derived["copy_gbps"]
    return derived


def bench_experts(
    device_name: str,
    hidden: int,
    inner: int,
    experts: int,
    tokens: int,
    decode_tokens: int,
    dtype: str,
    reps: int,
    out: str | None,
):
    """Expert GEMMs as the engine runs them (MoE.run_experts) against torch.matmul on the same shapes
    (prefill) and the weight bytes they stream against a device-to-device copy (decode)."""
    import torch

    from hpcmoe.runtime.device import choose_device, device_kind

    device = choose_device(device_kind(device_name), 0)
    moe = random_experts(device, hidden, inner, experts, dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    rows = torch.randn(
        experts * tokens, hidden, device=device, dtype=getattr(torch, dtype), generator=generator
    )
    samples, weight_bytes, copied_bytes = expert_seconds(
        moe, rows, experts, tokens, decode_tokens, device, reps
    )
    flops = 2 * experts * tokens * 3 * hidden * inner
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = device_peak_tflops(name)
    derived = derived_figures(samples, flops, weight_bytes, copied_bytes, peak)
    result = {
        "benchmark": "experts",
        "device": name,
        "bf16_peak_tflops": peak,
        "what": f"{experts} experts {hidden} x {inner} in {dtype}: prefill {tokens} tokens per expert, "
        f"decode {decode_tokens}",
        "reps": reps,
        "goal": "prefill >= 0.8x torch.matmul and >= 0.5 of the bf16 peak; decode >= 0.7 of copy bandwidth",
        "median": {k: {m: float(np.median(v)) for m, v in d.items()} for k, d in samples.items()},
        "derived": derived,
    }
    print(f"hpcmoe bench experts on {name}: {result['what']}")
    for key, value in derived.items():
        print(f"  {key:<32}{value:10.3f}")
    print(f"  goal: {result['goal']}")
    return store(result, out)
