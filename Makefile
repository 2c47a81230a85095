# make run: set up .venv and run the debug model on 4 ranks; make test: set up .venv and run the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RANKS ?= 4

.PHONY: run test setup clean

$(BIN)/hpcmoe: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $@

setup: $(BIN)/hpcmoe

run: setup
	timeout 300 $(BIN)/mpiexec -n $(RANKS) $(BIN)/hpcmoe run inputs/debug.yaml

test: setup
	PATH=$(CURDIR)/$(BIN):$$PATH tools/run_tests.sh

clean:
	rm -rf $(VENV) runs *.egg-info
