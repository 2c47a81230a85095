#!/usr/bin/env bash
# Every benchmark of docs/PERFORMANCE.md, results as JSON in docs/bench/. Run after `make setup`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$PWD/.venv/bin:$PATH OMP_NUM_THREADS=1
out=docs/bench; mkdir -p "$out"
run() { echo "+ $* --overwrite"; timeout 1800 "$@" --overwrite; }   # docs/bench is regenerated on purpose
run hpcmoe bench control --ranks 16,64,256,1024 --out $out/control.json
for ranks in 2 4; do for hidden in 1024 4096; do for dtype in float32 bfloat16; do
  run mpiexec -n $ranks hpcmoe bench dispatch --tokens 1024 --hidden $hidden --dtype $dtype --out $out/dispatch_n${ranks}_h${hidden}_${dtype}.json
done; done; done
run mpiexec -n 2 hpcmoe bench overlap inputs/bench_overlap.yaml --out $out/overlap_n2.json
run mpiexec -n 4 hpcmoe bench schedule inputs/bench_schedule.yaml --out $out/schedule_n4.json
run mpiexec -n 4 hpcmoe bench dispatch --tokens 32 --hidden 4096 --dtype bfloat16 --out $out/dispatch_decode_n4_h4096_bfloat16.json
run mpiexec -n 4 hpcmoe bench placement inputs/bench_ep.yaml --out $out/placement_n4.json
run mpiexec -n 4 hpcmoe bench skew inputs/bench_ep.yaml --set model.router_skew=4 --out $out/skew_n4.json
run mpiexec -n 4 hpcmoe bench wait inputs/bench_ep.yaml --out $out/wait_n4.json
run mpiexec -n 4 hpcmoe bench dispatch_mode inputs/bench_ep.yaml --set parallel.ranks_per_node=2 \
  --set 'parallel.link={bandwidth_gbps: 1, latency_us: 100}' --out $out/dispatch_mode_n4.json
run mpiexec -n 4 hpcmoe bench ma inputs/bench_ma.yaml --out $out/ma_n4.json
run mpiexec -n 4 hpcmoe bench expert_tp inputs/bench_ep.yaml --out $out/expert_tp_n4.json
run mpiexec -n 4 hpcmoe bench expert_tp inputs/bench_ep.yaml --set parallel.ranks_per_node=2 \
  --set 'parallel.link={bandwidth_gbps: 1, latency_us: 100}' --out $out/expert_tp_link_n4.json
run mpiexec -n 4 hpcmoe bench reduce --tokens 256 --hidden 4096 --ranks-per-node 2 --link-gbps 10 --latency-us 20 \
  --out $out/reduce_n4.json
run mpiexec -n 4 hpcmoe bench reduce --tokens 256 --hidden 4096 --ranks-per-node 2 --link-gbps 1 --latency-us 20 \
  --out $out/reduce_n4_1gbps.json
run mpiexec -n 16 hpcmoe bench reduce --tokens 256 --hidden 4096 --ranks-per-node 4 --link-gbps 10 --latency-us 20 \
  --reps 5 --out $out/reduce_n16.json
run python tools/bench_predict.py --out $out/predict.json --work runs/predict
run python tools/bench_batching.py --prompts 20000 --ranks 4 --max-batch 64 --out $out/batching.json
run python tools/bench_memory.py --output $out/memory.json
run python tools/bench_split.py --output $out/split.json
# One rank against transformers: the tiny checkpoints of the issue (hidden 512, 4 layers, 8 / 16 experts)
checkpoints=$(mktemp -d)
python tools/make_tiny_checkpoint.py mixtral "$checkpoints/mixtral" --set hidden_size=512 --set num_hidden_layers=4 \
  --set num_local_experts=8
python tools/make_tiny_checkpoint.py deepseek_v3 "$checkpoints/deepseek_v3" --set hidden_size=512 \
  --set num_hidden_layers=4 --set n_routed_experts=16
for family in mixtral deepseek_v3; do
  OMP_NUM_THREADS=2 run hpcmoe bench transformers --checkpoint "$checkpoints/$family" --batch 8 --prompt-len 32 \
    --steps 16 --out $out/transformers_$family.json
done
