"""Planning the parallel layout, without MPI and without weights: which ranks do what (ep, or
attention and MoE apart), where each expert lives (placements, replicas, expert groups), the
dispatch tables and plans that say where each token slot goes, and the memory plan of a rank.
"""
