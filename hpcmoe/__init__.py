"""hpcmoe: Mixture-of-Experts inference at large expert parallelism over MPI."""

import time

__version__ = "0.1.0"
STARTED = time.time()  # when this process first imported hpcmoe: `wall_with_load_s` counts from here
