"""In-process MPI tests: run with `mpiexec -n K python -m pytest --with-mpi -m mpi` (K = 2, 4).

Each holds at any rank count up to the debug model's 4 experts.
"""

import numpy as np
import pytest
import torch

from tests.conftest import DEBUG_CONFIG, assert_same_run, read_run

pytestmark = pytest.mark.mpi(min_size=2)
torch.set_num_threads(1)


def setup_run(comm, *settings, output="unused.h5"):
    from hpcmoe.config import load_config
    from hpcmoe.parallel.layout import ParallelLayout
    from hpcmoe.runtime.topology import build_topology

    config = load_config(DEBUG_CONFIG, list(settings) + [f"output.path={output}"])
    return (
        config,
        build_topology(comm, config.parallel.ranks_per_node),
        ParallelLayout.from_config(config, comm.Get_size()),
    )


def test_moe_layer_over_mpi_equals_all_experts_in_one_process():
    from mpi4py import MPI

    from hpcmoe.model.build import build_model
    from hpcmoe.model.moe import moe_local
    from hpcmoe.runfile.timer import Timer
    from hpcmoe.runtime.ep import EPEngine
    from hpcmoe.runtime.exchange_context import StepStats
    from hpcmoe.runtime.moe_layer import flat
    from hpcmoe.runtime.scheduler import run_concurrently
    from hpcmoe.runtime.waits import Where

    config, topo, layout = setup_run(MPI.COMM_WORLD, "run.micro_batches=2", "run.decode_micro_batch_min=1")
    engine = EPEngine(config, topo, layout.placement(topo.node_of_rank), Timer(topo.rank, 0.0))
    everything = build_model(config.model, list(range(config.model.num_experts)))
    tokens = [0, 7, 1, 30][topo.rank % 4]  # uneven, and one rank sends nothing
    h = torch.randn(tokens, config.model.hidden, generator=torch.Generator().manual_seed(topo.rank))
    stats = StepStats.zeros(2, 4, topo.size)
    for layer in (1, 2):
        halves = h[: len(h) // 2], h[len(h) // 2 :]  # two micro-batches in flight at once
        outs = run_concurrently(
            [
                flat(engine.ctx, engine.model.layers[layer].mlp, Where(0, layer, mb), part, stats)
                for mb, part in enumerate(halves)
            ],
            engine.timer,
            0,
            engine.sender,
        )
        engine.sender.wait(Where())
        out = torch.cat(outs)
        torch.testing.assert_close(out, moe_local(everything.layers[layer].mlp, h), atol=1e-5, rtol=0)
        assert stats.routing[layer - 1].sum() == tokens * config.model.top_k
    engine.close()


def test_node_communicators_follow_ranks_per_node():
    from mpi4py import MPI

    _, topo, _ = setup_run(MPI.COMM_WORLD, "parallel.ranks_per_node=2")
    size, rank = topo.size, topo.rank
    assert topo.num_nodes == (size + 1) // 2 and topo.node_index == rank // 2
    assert topo.node.Get_size() == min(2, size - 2 * (rank // 2))
    assert (topo.leaders is not None) == (rank % 2 == 0)
    if topo.leaders is not None:
        assert topo.leaders.Get_size() == topo.num_nodes
        assert topo.leaders.allgather(rank) == list(range(0, size, 2))


@pytest.mark.parametrize(
    "settings",
    [
        [],
        ["parallel.ranks_per_node=2"],
        ["run.batch=1"],
        [
            "run.micro_batches=3",
            "run.decode_micro_batch_min=1",
            "parallel.ranks_per_node=1",
            "parallel.link={bandwidth_gbps: 10, latency_us: 50}",
        ],
        [
            "parallel.dispatch=two_stage",
            "parallel.ranks_per_node=1",
            "parallel.placement=replicated",
            "parallel.experts_per_rank=2",
        ],
    ],
)
def test_generate_over_the_world_equals_each_rank_alone(mpi_tmp_path, settings):
    """Every rank runs the whole job alone on COMM_SELF, then all run it together."""
    from mpi4py import MPI

    from hpcmoe.runtime.engine import run

    world = MPI.COMM_WORLD
    alone = mpi_tmp_path / f"alone_{world.Get_rank()}.h5"
    one_rank = [s for s in settings if not s.startswith("parallel.")]  # the layout of one rank is its own
    run(*setup_run(MPI.COMM_SELF, *one_rank, "run.max_new_tokens=6", output=str(alone)))
    together = mpi_tmp_path / "together.h5"
    metrics = run(*setup_run(world, *settings, "run.max_new_tokens=6", output=str(together)))
    world.Barrier()
    if world.Get_rank() == 0:
        assert metrics["ttft_ms"] > 0
        assert_same_run(read_run(together), read_run(alone))
    else:
        assert metrics == {}


@pytest.mark.parametrize("ranks_per_node", [2, 3, 4])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hierarchical_sum_equals_flat_allreduce_on_unequal_nodes(dtype, ranks_per_node):
    """Nodes of 3+1, 2+2 and 4 at -n 4; 4+4+4+4 and 3+3+3+3+3+1 at -n 16 (tests/test_jobs.py launches it):
    within rounding of a flat Allreduce in float64, and bit-identical on every rank."""
    from types import SimpleNamespace

    from mpi4py import MPI

    from hpcmoe.runfile.timer import Timer
    from hpcmoe.runtime.comm import Sender
    from hpcmoe.runtime.link import Link
    from hpcmoe.runtime.ma import hierarchical_sum
    from hpcmoe.runtime.scheduler import run_concurrently
    from hpcmoe.runtime.tags import tag_for
    from hpcmoe.runtime.topology import build_topology
    from hpcmoe.runtime.waits import Where

    world = MPI.COMM_WORLD
    topo = build_topology(world, ranks_per_node)
    link = Link(topo.node_of_rank)
    ctx = SimpleNamespace(
        comm=world,
        sender=Sender(world, link),
        link=link,
        topo=topo,
        rank=topo.rank,
        timer=Timer(topo.rank, 0.0),
    )
    x = torch.randn(7, 33, generator=torch.Generator().manual_seed(topo.rank)).to(getattr(torch, dtype))
    flat = np.empty((7, 33))
    world.Allreduce(x.double().numpy(), flat, op=MPI.SUM)
    tag = lambda kind: tag_for(kind, 0, 0, 1)
    [total] = run_concurrently(
        [hierarchical_sum(ctx, x, list(range(topo.size)), tag, Where(0, 0, 0))], Timer(0, 0.0), 0, ctx.sender
    )
    ctx.sender.wait(Where())
    assert total.dtype == x.dtype and total.shape == x.shape
    rounding = 1e-6 if dtype == "float32" else 2**-7 * topo.size  # bfloat16: 8 bits of mantissa per addition
    np.testing.assert_allclose(
        total.double().numpy(), flat, rtol=rounding, atol=rounding * np.abs(flat).max()
    )
    everyone = world.allgather(total.view(torch.int16 if dtype == "bfloat16" else torch.int32).numpy())
    assert all(np.array_equal(everyone[0], other) for other in everyone)  # bit-identical on every rank
