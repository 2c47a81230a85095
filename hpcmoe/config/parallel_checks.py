"""The parallel section's checks that hold whatever the rank count: attention/MoE separation (ma)
and tensor parallelism inside experts. The checks against the rank count are the layout's
(hpcmoe.parallel.layout).
"""

from __future__ import annotations

import os

from hpcmoe.config.schema import MXFP4_BLOCK, ModelConfig, ParallelConfig, require


def validate_ma(m: ModelConfig, p: ParallelConfig) -> None:
    """Attention/MoE separation: the relations that do not need the rank count."""
    a, e, r = p.attention_ranks, p.moe_ranks, p.attention_replicas
    if "auto" in (a, e):
        for name, value in (("attention_ranks", a), ("moe_ranks", e)):
            require(
                value in ("auto", None),
                f"parallel.{name}: {value!r} with an auto split; set both to auto "
                f"(the predictor chooses attention_ranks + moe_ranks = world size)",
            )
        require(
            p.predictor is not None,
            "parallel.attention_ranks: auto needs parallel.predictor: PATH, a machine file (every split "
            "simulated on it, e.g. machines/this_box.yaml from `hpcmoe calibrate`) or a predictor made by "
            "`hpcmoe predict train RUN.h5 ... --out PATH` from runs of `hpcmoe predict collect`",
        )
        require(
            os.path.isfile(p.predictor),
            f"parallel.predictor: {p.predictor!r} is not a file; give a machine "
            f"file (`hpcmoe calibrate --output {p.predictor}` for a .yaml) or "
            f"a predictor (`hpcmoe predict train RUN.h5 ... --out {p.predictor}`)",
        )
        return  # the rest is checked once the predictor has chosen (hpcmoe.analysis.predict.choose_split)
    for name, value in (("attention_ranks", a), ("moe_ranks", e)):
        require(
            value is None or isinstance(value, int),
            f"parallel.{name}: expected an integer or auto, got {value!r}",
        )
    require(
        a is not None and a >= 1 and e is not None and e >= 1,
        f"parallel.layout=ma needs parallel.attention_ranks and parallel.moe_ranks >= 1, got {a} and {e}",
    )
    require(
        r >= 1 and a % r == 0,
        f"parallel.attention_ranks ({a}) must be a multiple of parallel.attention_replicas ({r})",
    )
    shards = a // r // (2 if p.attention_standby else 1)
    require(
        not p.attention_standby or (a // r) % 2 == 0,
        f"parallel.attention_standby pairs ranks: attention ranks per replica ({a // r}) must be even",
    )
    require(m.heads >= shards, f"model.heads ({m.heads}) must be >= attention ranks per replica ({shards})")
    require(m.num_experts >= e, f"model.num_experts ({m.num_experts}) must be >= parallel.moe_ranks ({e})")
    require(
        p.dispatch == "flat",
        "parallel.layout=ma sends tokens straight to the MoE ranks: use parallel.dispatch=flat",
    )
    require(
        p.placement in ("auto", "packed"),
        f"parallel.layout=ma packs experts over the MoE ranks: "
        f"parallel.placement must be auto or packed, got {p.placement}",
    )


def validate_expert_tp(m: ModelConfig, p: ParallelConfig) -> None:
    """Tensor parallelism inside experts: the relations that do not need the rank count."""
    t = p.expert_tp
    require(
        p.layout == "ep",
        f"parallel.expert_tp ({t}) splits experts over groups of ep ranks; "
        f"parallel.layout=ma keeps whole experts on its MoE ranks: use expert_tp 1",
    )
    require(
        m.expert_hidden % t == 0,
        f"parallel.expert_tp ({t}) must divide model.expert_hidden ({m.expert_hidden})",
    )
    inner = m.expert_hidden // t
    require(
        not m.fp8_block or (inner % m.fp8_block[0] == 0 and inner % m.fp8_block[1] == 0),
        f"parallel.expert_tp ({t}): each rank's share of model.expert_hidden ({m.expert_hidden} / {t} = "
        f"{inner}) must be whole FP8 blocks ({m.fp8_block}): the block scales are not split",
    )
    require(
        not m.mxfp4 or inner % MXFP4_BLOCK == 0,
        f"parallel.expert_tp ({t}): each rank's share of model.expert_hidden ({m.expert_hidden} / {t} = "
        f"{inner}) must be whole MXFP4 blocks of {MXFP4_BLOCK}: the exponents are not split",
    )
