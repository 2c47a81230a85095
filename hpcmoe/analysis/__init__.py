"""Looking at runs: reports and plots of run files, the attention:MoE split predictor, and
the benchmark scenarios.
"""
