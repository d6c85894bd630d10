#!/usr/bin/env bash
# Submit one `vlt` command as a SLURM batch job (the Makefile's LAUNCH=slurm calls this).
#
#   scripts/slurm/submit.sh fit -c conf/tokenizer/tiny.yaml [--key=value ...]
#
# Settings come from the environment (the Makefile passes its variables of the same names):
#   NODES      nodes (1)                      GPUS     GPUs per node (1); 0 runs on CPUs
#   DEVICES    tasks per node when GPUS=0 (1) CPUS     cpus per task (Slurm's default if empty)
#   TIME       time limit, e.g. 2-00:00:00    PARTITION, ACCOUNT   passed on when set
#   SBATCH_ARGS  further sbatch options       VLT      the vlt executable (.venv/bin/vlt)
#
# Lightning subcommands (fit/validate/test/predict) get conf/trainer/slurm.yaml (slurm_cpu.yaml when
# GPUS=0) right after the stage config, then --trainer.num_nodes/--trainer.devices matching the job.
# Their logs go to the run directory (runs/<name>/slurm-<jobid>.out); for fit the stale-run check runs
# here first, so a job that would be refused is never queued. `vlt sample` and `vlt cache-latents` also run
# one task per device (their predict loops) with --num_nodes/--devices/--accelerator matching the job;
# other tools run one task per node with logs in runs/slurm/. Prints the job id and the run directory.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
NODES="${NODES:-1}"
GPUS="${GPUS:-1}"
DEVICES="${DEVICES:-1}"
VLT="$(realpath "${VLT:-$ROOT/.venv/bin/vlt}")"
PYTHON="$(dirname "$VLT")/python"

[ $# -ge 1 ] || { echo "usage: $0 SUBCOMMAND [ARGS...]" >&2; exit 2; }
sub="$1"
shift
if [ "$GPUS" -gt 0 ]; then TASKS="$GPUS"; TRAINER="$ROOT/conf/trainer/slurm.yaml"
else TASKS="$DEVICES"; TRAINER="$ROOT/conf/trainer/slurm_cpu.yaml"; fi

opts=(--parsable --nodes="$NODES")
[ -n "${CPUS:-}" ] && opts+=(--cpus-per-task="$CPUS")
[ -n "${TIME:-}" ] && opts+=(--time="$TIME")
[ -n "${PARTITION:-}" ] && opts+=(--partition="$PARTITION")
[ -n "${ACCOUNT:-}" ] && opts+=(--account="$ACCOUNT")
[ "$GPUS" -gt 0 ] && opts+=(--gres="gpu:$GPUS")

case "$sub" in
  test|predict)
    echo "submit.sh: vlt $sub is not available (no stage has a ${sub}_step); use validate" >&2
    exit 2
    ;;
  fit|validate)
    # Stage config(s) first, then the SLURM trainer settings, then the user's overrides.
    args=("$sub")
    while [ $# -gt 0 ]; do
      case "$1" in
        -c|--config) args+=("$1" "$2"); shift 2 ;;
        --config=*) args+=("$1"); shift ;;
        *) break ;;
      esac
    done
    args+=(-c "$TRAINER" "$@" "--trainer.num_nodes=$NODES" "--trainer.devices=$TASKS")
    # The resolved config names the run directory (and fit's ckpt_path), exactly as the job will see it.
    resolved="$("$VLT" "${args[@]}" --print_config | "$PYTHON" -c '
import sys, yaml
c = yaml.safe_load(sys.stdin)
print(c["trainer"].get("default_root_dir") or c["runs_dir"] + "/" + c["name"])
print(c.get("ckpt_path") or "")')"
    run_dir="$(sed -n 1p <<<"$resolved")"
    ckpt_path="$(sed -n 2p <<<"$resolved")"
    if [ "$sub" = fit ]; then
      "$PYTHON" -m vlt.runs check "$run_dir" ${ckpt_path:+--ckpt_path="$ckpt_path"}
    fi
    name="vlt-$(basename "$run_dir")"
    opts+=(--ntasks-per-node="$TASKS")
    ;;
  sample|cache-latents)
    # One task per device like fit: these tools run Lightning's predict loop, which reads its rank from
    # srun; the options that must match the allocation come last (Lightning refuses a mismatch).
    accel=gpu; [ "$GPUS" -gt 0 ] || accel=cpu
    args=("$sub" "$@" "--num_nodes=$NODES" "--devices=$TASKS" "--accelerator=$accel")
    run_dir="runs/slurm"
    name="vlt-$sub"
    opts+=(--ntasks-per-node="$TASKS")
    ;;
  *)
    # vlt's other tools (data, curves, ...): one task per node, logs under runs/slurm/.
    args=("$sub" "$@")
    run_dir="runs/slurm"
    name="vlt-$sub"
    opts+=(--ntasks-per-node=1)
    ;;
esac

mkdir -p "$run_dir"
run_dir="$(realpath "$run_dir")"
# shellcheck disable=SC2206
job="$(VLT_BIN="$VLT" sbatch "${opts[@]}" --job-name="$name" --chdir="$(pwd)" \
  --output="$run_dir/slurm-%j.out" ${SBATCH_ARGS:-} "$HERE/vlt.sbatch" "${args[@]}")"
job="${job%%;*}"
echo "submitted job $job"
echo "run directory $run_dir"
echo "log $run_dir/slurm-$job.out"
