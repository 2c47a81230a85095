# make run: set up .venv and run the debug model on 4 ranks; make test: set up .venv and run the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RANKS ?= 4

.PHONY: run test test-all setup clean ft
FT_VENV := .venv-ft

$(BIN)/hpcmoe: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $@

setup: $(BIN)/hpcmoe

run: setup
	timeout 300 $(BIN)/mpiexec -n $(RANKS) $(BIN)/hpcmoe run inputs/debug.yaml --overwrite

test: setup
	PATH=$(CURDIR)/$(BIN):$$PATH tools/run_tests.sh

# the longer sweeps: 40 seeded kill points for run.fault_tolerance (make test runs 8)
test-all: setup
	HPCMOE_FT_POINTS=40 PATH=$(CURDIR)/$(BIN):$$PATH tools/run_tests.sh

# make ft: a fault-tolerant MPI from pip (the Open MPI wheel, ULFM built in) in its own venv;
# launch with .venv-ft/bin/mpirun --with-ft ulfm ... (see docs/REFERENCE.md: Surviving a dead rank).
$(FT_VENV)/bin/hpcmoe: setup.py constraints.txt
	$(PYTHON) -m venv $(FT_VENV)
	$(FT_VENV)/bin/pip install -q --upgrade pip
	$(FT_VENV)/bin/pip install -q torch==2.13.0
	$(FT_VENV)/bin/pip install -q -c constraints.txt -e '.[ft]'
	touch $@

ft: $(FT_VENV)/bin/hpcmoe

clean:
	rm -rf $(VENV) $(FT_VENV) runs *.egg-info
