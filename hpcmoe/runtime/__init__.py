"""The MPI engine: the MPI lifecycle and communicators (topology), the one wait helper (waits),
messages (comm, collectives, link, buffers), device staging, the micro-batch scheduler, a MoE
layer's token exchange (moe_layer), the ep and ma rank engines, the generate loop (engine and the
modules it is cut into), resuming a partial run, fault tolerance and online rebalancing.
"""
