# Sourced by jobs/*.sbatch (not a job itself). Defines hpcmoe_job RANKS CONFIG [hpcmoe run args...]:
# runs `hpcmoe run CONFIG ARGS... $HPCMOE_SET --output RUN_DIR/run.h5` on RANKS MPI ranks and
# exits with the launcher's status. The batch script must run from the repository root after
# `make setup` (sbatch copies scripts away, so files are found from $SLURM_SUBMIT_DIR).
#
# Environment (all optional; pass with sbatch's default --export=ALL):
#   HPCMOE_SET       extra `hpcmoe run` arguments appended last (so they win), shell-quoted words,
#                    e.g. "--set run.max_new_tokens=2 --set 'parallel.link={bandwidth_gbps: 5}'"
#   HPCMOE_LAUNCHER  auto (default: srun --mpi=pmi2 when srun lists pmi2, else mpiexec) | srun | mpiexec
#   HPCMOE_RUNS_DIR  where run directories go (default runs)
#   HPCMOE_BIN       directory of hpcmoe and the fallback mpiexec (default .venv/bin)
#   HPCMOE_LAUNCHER_ARGS  extra launcher arguments, shell-quoted words; for run.fault_tolerance with
#                    Open MPI's ULFM: HPCMOE_BIN=.venv-ft/bin HPCMOE_LAUNCHER=mpiexec
#                    HPCMOE_LAUNCHER_ARGS="--with-ft ulfm"
# Run directory: $HPCMOE_RUNS_DIR/$SLURM_JOB_NAME-$SLURM_JOB_ID, or for an array task
# $HPCMOE_RUNS_DIR/$SLURM_JOB_NAME-${SLURM_ARRAY_JOB_ID}_$SLURM_ARRAY_TASK_ID.
# Signals: submit with --signal=B:USR1@SECONDS; the batch shell forwards SIGUSR1 (also from
# `scancel -b -s USR1 JOB`) and SIGTERM (scancel, a time limit) to the launcher as SIGUSR1, which
# every launcher forwards to every rank (Open MPI's mpirun does not forward SIGTERM: it lets the
# job run on, then exits 1; hpcmoe stops alike on either signal); hpcmoe then stops at an agreed step boundary, writes run.partial.h5 and exits 0; this
# script reports the partial file. A requeued job (same run directory) continues from that file with
# `hpcmoe run ... --resume` (the file is kept as run.partial.before-restart-N.h5); after an attempt
# killed without a signal (kill -9, a node lost) it continues from the run.h5.tmp it left (kept as
# run.killed-before-restart-N.h5): every request that attempt had finished is kept.

jobs_fail() { echo "jobs: error: $*" >&2; exit 2; }

cd "${SLURM_SUBMIT_DIR:?run this with sbatch, from the repository root}"
export OMP_NUM_THREADS=1
HPCMOE_BIN=${HPCMOE_BIN:-.venv/bin}
[[ -x $HPCMOE_BIN/hpcmoe ]] || jobs_fail "no $HPCMOE_BIN/hpcmoe under $PWD: submit from the repository root after make setup"

# The world size the config needs (attention + MoE ranks for layout ma; "" for ep, which runs on
# any rank count up to the experts): hpcmoe's own config code, no MPI. Empty on a bad config:
# hpcmoe itself then reports it on every rank.
config_world_size() {
  "$HPCMOE_BIN/python" - "$@" <<'EOF' 2>/dev/null || true
import sys
from hpcmoe.config import load_config
config, sets = sys.argv[1], [a for p, a in zip(sys.argv[2:], sys.argv[3:]) if p == "--set"]
p = load_config(config, sets).parallel
print(p.attention_ranks + p.moe_ranks if p.layout == "ma" else "")
EOF
}

hpcmoe_job() {
  local ranks=$1 config=$2; shift 2
  local extra=() launcher_args=() run_dir launcher status gpus=0 needed early_stop=0
  trap 'early_stop=1' USR1 TERM  # until the launcher runs (bash's default for these would kill the job)
  [[ -n ${HPCMOE_SET:-} ]] && mapfile -d '' -t extra < <(xargs printf '%s\0' <<<"$HPCMOE_SET")
  [[ -n ${HPCMOE_LAUNCHER_ARGS:-} ]] && mapfile -d '' -t launcher_args < <(xargs printf '%s\0' <<<"$HPCMOE_LAUNCHER_ARGS")
  local args=(run "$config" "$@" "${extra[@]}")

  # World size: the launcher starts exactly $ranks ranks inside the allocation's $SLURM_NTASKS.
  (( ranks <= SLURM_NTASKS )) || jobs_fail "$ranks ranks requested but the job has only SLURM_NTASKS=$SLURM_NTASKS tasks"
  needed=$(config_world_size "${args[@]:1}")
  echo "jobs: $ranks MPI ranks (SLURM_NTASKS=$SLURM_NTASKS on $SLURM_JOB_NUM_NODES node(s)), config needs ${needed:-any}"
  [[ -z $needed || $needed == "$ranks" ]] ||
    echo "jobs: warning: the config needs $needed ranks but $ranks will start: hpcmoe will refuse" >&2

  if [[ -n ${SLURM_ARRAY_JOB_ID:-} ]]; then
    run_dir=${HPCMOE_RUNS_DIR:-runs}/$SLURM_JOB_NAME-${SLURM_ARRAY_JOB_ID}_$SLURM_ARRAY_TASK_ID
  else
    run_dir=${HPCMOE_RUNS_DIR:-runs}/$SLURM_JOB_NAME-$SLURM_JOB_ID
  fi
  mkdir -p "$run_dir"
  local output=$run_dir/run.h5 partial=$run_dir/run.partial.h5
  if [[ -e $partial ]]; then  # left by an earlier attempt of this requeued job: continue from it
    local before=$run_dir/run.partial.before-restart-${SLURM_RESTART_COUNT:-0}.h5
    mv "$partial" "$before"
    args+=(--resume "$before")
    echo "jobs: requeued: resuming from $before"
  elif [[ -e $output.tmp ]]; then  # an attempt killed without a signal: keep the requests it finished
    local killed=$run_dir/run.killed-before-restart-${SLURM_RESTART_COUNT:-0}.h5
    mv "$output.tmp" "$killed"
    if "$HPCMOE_BIN/python" -c 'import h5py, sys; h5py.File(sys.argv[1], "r")["requests"]' "$killed" 2>/dev/null; then
      args+=(--resume "$killed")
      echo "jobs: requeued after a kill: resuming from $killed (its finished requests are kept)"
    else
      echo "jobs: warning: $killed (left by a killed attempt) cannot be read: starting afresh" >&2
    fi
  fi
  args+=(--output "$output")

  # One GPU per node-local rank when this node has GPUs (decided here, bound per rank below).
  command -v nvidia-smi >/dev/null && gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  local command=("$HPCMOE_BIN/hpcmoe")
  if (( gpus > 0 )); then
    # node-local rank: hydra's MPI_LOCALRANKID under mpiexec, SLURM_LOCALID under srun; a device
    # list from Slurm's gres (CUDA_VISIBLE_DEVICES) is indexed, else the node's devices 0..gpus-1
    command=(bash -c 'l=${MPI_LOCALRANKID:-${SLURM_LOCALID:-0}}; IFS=, read -ra d <<<"${CUDA_VISIBLE_DEVICES:-}"
      if (( ${#d[@]} )); then export CUDA_VISIBLE_DEVICES=${d[l % ${#d[@]}]}; else export CUDA_VISIBLE_DEVICES=$((l % '"$gpus"')); fi
      exec "$0" "$@"' "$HPCMOE_BIN/hpcmoe")
  fi

  # The launcher is chosen once, up front; a failed run is never retried with the other one.
  launcher=${HPCMOE_LAUNCHER:-auto}
  if [[ $launcher == auto ]]; then
    if srun --mpi=list 2>&1 | grep -qw pmi2; then launcher=srun; else launcher=mpiexec; fi
  fi
  local mpiexec=mpiexec
  [[ -x $HPCMOE_BIN/mpiexec ]] && mpiexec=$HPCMOE_BIN/mpiexec
  local srun_nodes=()  # fewer ranks than tasks (a sweep row): fill whole nodes, not one rank per node
  if (( ranks < SLURM_NTASKS )) && [[ ${SLURM_NTASKS_PER_NODE:-} =~ ^[0-9]+$ ]]; then
    srun_nodes=(--nodes=$(( (ranks + SLURM_NTASKS_PER_NODE - 1) / SLURM_NTASKS_PER_NODE )))
  fi
  case $launcher in
    srun) command=(srun --mpi=pmi2 --ntasks="$ranks" "${srun_nodes[@]}" --kill-on-bad-exit=1 "${launcher_args[@]}"
                   "${command[@]}" "${args[@]}") ;;
    mpiexec) command=("$mpiexec" "${launcher_args[@]}" -n "$ranks" "${command[@]}" "${args[@]}") ;;
    *) jobs_fail "HPCMOE_LAUNCHER=$launcher: expected auto, srun or mpiexec" ;;
  esac
  echo "jobs: GPUs on this node: $gpus; launcher $launcher; run directory $run_dir"
  echo "jobs: ${command[*]}"

  # Background + wait, so that a SIGUSR1 to this shell is forwarded at once (bash runs traps only
  # between commands); wait returns early (>128) on a trapped signal, so wait again.
  if (( early_stop )); then echo "jobs: SIGUSR1 before the launch: hpcmoe not started"; exit 0; fi
  "${command[@]}" &
  local pid=$!
  trap 'echo "jobs: SIGUSR1: forwarding to the $launcher ranks"; kill -USR1 '"$pid"' 2>/dev/null || true' USR1
  trap 'echo "jobs: SIGTERM: forwarding to the $launcher ranks as SIGUSR1"; kill -USR1 '"$pid"' 2>/dev/null || true' TERM
  while kill -0 "$pid" 2>/dev/null; do wait "$pid" || true; done
  trap - USR1 TERM
  status=0; wait "$pid" || status=$?  # bash keeps a reaped job's status for wait

  if [[ -e $partial ]]; then
    echo "jobs: partial file written: $partial (stopped early by a signal)"
  else
    echo "jobs: no partial file written"
  fi
  [[ -e $output ]] && echo "jobs: run file: $output"
  echo "jobs: $launcher exited with status $status"
  exit "$status"
}
