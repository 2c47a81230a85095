"""Prediction: machine files and their calibration, the cost of each phase, and the simulator
that runs the engine's own schedule (scheduler loop, MoE exchanges, ma sums) on a virtual clock.
"""
