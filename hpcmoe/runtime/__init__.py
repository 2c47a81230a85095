"""The MPI engine: the MPI lifecycle and communicators (topology), messaging and the one wait
helper (comm), device staging, the micro-batch scheduler, a MoE layer's token exchange (moe_layer),
the ep and ma rank engines, the generate loop (engine), resuming a partial run, fault tolerance
and online rebalancing.
"""
