"""Benchmarks: ratios measured in one run, medians of interleaved repetitions (`hpcmoe bench ...`).

Each benchmark runs its variants in turn, rep after rep (A B A B ...), so drifting machine load
hits every variant alike; it prints a table and stores it as JSON (`--out`). None is a pass/fail
test: goals are printed beside the measured ratios. Points with more ranks than cores are
labelled oversubscribed.

One module per family of benchmarks:

  scenarios.py            the engine scenarios (placement, overlap, skew, rebalance, wait, ma,
                          expert_tp, schedule, dispatch_mode): their table, check and runner
  figures.py              what a scenario reads from each run: metrics, bytes, overlap, rebalancing
  dispatch.py             `bench dispatch`: dispatch + combine against raw Alltoallv
  reduce.py               `bench reduce`: ma's hierarchical sum against a leader sum and Allreduce
  experts.py              `bench experts`: expert GEMMs against torch.matmul and a copy
  control.py              `bench control`: the host's control path at many ranks, in one process
  versus_transformers.py  `bench transformers`: one rank against transformers' generate
  results.py, timing.py   shared by all: the printed table and JSON; timing variants interleaved

This package's public surface is what `hpcmoe bench` calls, imported below.
"""

from hpcmoe.analysis.bench.control import bench_control
from hpcmoe.analysis.bench.dispatch import bench_dispatch
from hpcmoe.analysis.bench.experts import bench_experts
from hpcmoe.analysis.bench.reduce import bench_reduce
from hpcmoe.analysis.bench.scenarios import SCENARIOS, check_scenario, run_scenario
from hpcmoe.analysis.bench.versus_transformers import bench_transformers

__all__ = [
    "SCENARIOS",
    "bench_control",
    "bench_dispatch",
    "bench_experts",
    "bench_reduce",
    "bench_transformers",
    "check_scenario",
    "run_scenario",
]
