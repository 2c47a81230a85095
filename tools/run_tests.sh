#!/usr/bin/env bash
# The test suite: the formatter and linter (ruff.toml), then serial tests (pure functions and whole
# jobs that launch mpiexec themselves), then the in-process MPI tests under mpiexec -n 2 and -n 4.
# Every mpiexec runs under timeout.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 PYTHONDONTWRITEBYTECODE=1
echo "== ruff: format check and lint (rules in ruff.toml)"
ruff format --check .
ruff check .
python -m pytest -q -rs --durations=15 tests "$@"
for ranks in 2 4; do
  echo "== in-process MPI tests on $ranks ranks"
  # exit 5 (no test collected) is a failure here too: the MPI session must run tests
  timeout 600 mpiexec -n "$ranks" python -m pytest -q --with-mpi -m mpi -p no:cacheprovider tests
done
