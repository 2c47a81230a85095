"""What each `hpcmoe` subcommand does once hpcmoe/cli.py has parsed its arguments: check the inputs
(one line and exit 2 on every rank for a bad one, before any communicator or file is made), then
call the layer that does the work (runtime for `run`, analysis for `bench`, `report` and `predict`,
sim for `calibrate` and `simulate`, runfile for `export`). The top of the import graph: nothing
below imports it.
"""
