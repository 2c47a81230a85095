"""hpcmoe: Mixture-of-Experts inference at large expert parallelism over MPI."""
__version__ = "0.1.0"
