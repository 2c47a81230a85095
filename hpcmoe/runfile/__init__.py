"""The run file: one self-describing HDF5 file per run (timings, routing, traffic, placement,
tokens, metrics), written as the run goes, read back, exported.
"""
