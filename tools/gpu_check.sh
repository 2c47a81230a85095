#!/usr/bin/env bash
# The one prepared GPU check: the GPU tests, then the GPU benchmarks, on one GPU in under 8 minutes.
# Results: docs/bench/gpu/*.json (or $OUT/ when set, e.g. on a lent device machine) and a pytest log.
#
#   tools/gpu_check.sh            # after `make setup` with a CUDA build of torch, or with PYTHON=python3
#
# Needs: a CUDA build of torch, mpi4py with an mpiexec (the `mpich` wheel will do; where nothing can be
# downloaded, carry it as a wheel), h5py, pyyaml, pytest, transformers and safetensors (test oracle).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
out=${OUT:-docs/bench/gpu}; mkdir -p "$out"
MPIEXEC=$(command -v mpiexec || echo "$(dirname "$($PYTHON -c 'import sys; print(sys.executable)')")/mpiexec")
hpcmoe() { "$PYTHON" -m hpcmoe "$@"; }
"$PYTHON" - <<'PY'
import torch
assert torch.cuda.is_available(), "tools/gpu_check.sh needs a GPU: torch.cuda.is_available() is False"
print(f"torch {torch.__version__} on {torch.cuda.get_device_name()} ({torch.cuda.device_count()} visible)")
PY
started=$(date +%s)
# 1. correctness on the GPU: equality at -n 1 and -n 2 sharing the GPU, micro-batches, emulated nodes, checkpoints
timeout 300 "$PYTHON" -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$out/pytest_gpu.txt"
# 2. expert GEMMs at the ma-paper expert shape (4096 x 16384), prefill 1024 tokens per expert, decode 4 per expert
timeout 120 hpcmoe bench experts --device cuda --hidden 4096 --inner 16384 --experts 4 --tokens 1024 \
  --decode-tokens 4 --dtype bfloat16 --reps 10 --out "$out/experts.json"
# 3. four micro-batches against one at -n 2 (both ranks on this GPU) over the emulated link: wire_hidden
timeout 150 "$MPIEXEC" -n 2 "$PYTHON" -m hpcmoe bench overlap inputs/bench_overlap.yaml --set run.device=cuda \
  --reps 3 --out "$out/overlap_n2.json"
# 4. one rank against transformers on the GPU (tiny checkpoints of the CPU benchmark, float32)
checkpoints=$(mktemp -d)
"$PYTHON" tools/make_tiny_checkpoint.py mixtral "$checkpoints/mixtral" --set hidden_size=512 --set num_hidden_layers=4 \
  --set num_local_experts=8
timeout 120 hpcmoe bench transformers --checkpoint "$checkpoints/mixtral" --device cuda --batch 8 --prompt-len 32 \
  --steps 16 --reps 3 --out "$out/transformers_mixtral.json"
echo "gpu_check: done in $(( $(date +%s) - started )) s; results in $out"
