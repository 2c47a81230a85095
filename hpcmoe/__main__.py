"""`python -m hpcmoe`: the command line (hpcmoe.cli)."""
import sys

from hpcmoe.cli import main

sys.exit(main())
