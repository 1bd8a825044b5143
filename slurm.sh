#!/bin/bash
# Train every job of a sweep config as one SLURM job array: preemption-safe, resumable.
#
#   bash slurm.sh CONFIG.yaml [--key=value ...]
#
# Outside a SLURM job this script asks `python sweep.py CONFIG --count` for the number of jobs N
# and submits itself as `sbatch --array=0-(N-1) ... slurm.sh CONFIG ...`. Inside array task i it
# runs `train.py CONFIG --job_idx i --key=value ...`, which trains job i in
# <out_dir>/<exp_name>/job<i>. SLURM sends USR1 to this script WARN_SECONDS before the time
# limit; the training then finishes its step, saves a checkpoint and exits, the task requeues
# itself, and the next start resumes from that checkpoint (train.py's resume: auto).
#
# Every setting below can also be given per submission through the environment, e.g.
#   PARTITION=gpu GPUS_PER_NODE=4 TIME=48:00:00 bash slurm.sh configs/x.yaml

# ---- settings --------------------------------------------------------------------------------
PARTITION=${PARTITION:-}          # partition to run in; empty: the cluster's default partition
ACCOUNT=${ACCOUNT:-}              # account to charge; empty: your default account
NODES=${NODES:-1}                 # nodes per job; more than 1 launches one srun task per GPU
GPUS_PER_NODE=${GPUS_PER_NODE:-1} # GPUs per node = training processes per node (0: one CPU process)
CPUS_PER_GPU=${CPUS_PER_GPU:-8}   # CPU cores per training process
MEM=${MEM:-}                      # memory per node, e.g. 200G; empty: the partition's default
TIME=${TIME:-24:00:00}            # time limit of one run; longer trainings requeue and go on
WARN_SECONDS=${WARN_SECONDS:-300} # USR1 this long before the limit: enough to finish a step and save
MAX_PARALLEL=${MAX_PARALLEL:-}    # run at most this many jobs of the sweep at once; empty: no cap
ENV_SETUP=${ENV_SETUP:-}          # shell command run before training, e.g. "source .venv/bin/activate"
                                  # or "module load cuda/12.4 && conda activate plainlm"
LOG_DIR=${LOG_DIR:-slurm_logs}    # one log file per job, appended to across requeues
EXTRA_SBATCH=${EXTRA_SBATCH:-}    # any other sbatch options, e.g. "--qos=high --constraint=h100"
# -----------------------------------------------------------------------------------------------

PROCS_PER_NODE=$(( GPUS_PER_NODE > 0 ? GPUS_PER_NODE : 1 ))

usage() {
    sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit "$1"
}

# ---- submit: not inside an array task --------------------------------------------------------
if [ -z "${SLURM_ARRAY_TASK_ID:-}" ]; then
    case "${1:-}" in
        -h|--help) usage 0 ;;
        ""|-*) echo "slurm.sh: error: give the config file first: bash slurm.sh CONFIG.yaml [--key=value ...]" >&2
               exit 2 ;;
    esac
    CONFIG=$1
    # sbatch copies this script to a spool folder, so the job finds the code through PLAINLM_DIR.
    export PLAINLM_DIR
    PLAINLM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
    N=$(python "$PLAINLM_DIR/sweep.py" "$CONFIG" --count) || exit 1  # sweep.py printed why
    mkdir -p "$LOG_DIR"
    if [ "$NODES" -gt 1 ]; then  # srun starts one task per GPU, each with its own cores
        LAYOUT=(--ntasks-per-node="$PROCS_PER_NODE" --cpus-per-task="$CPUS_PER_GPU")
    else                         # one task (torchrun) that starts the processes itself
        LAYOUT=(--ntasks-per-node=1 --cpus-per-task=$(( CPUS_PER_GPU * PROCS_PER_NODE )))
    fi
    ARGS=(--array="0-$(( N - 1 ))${MAX_PARALLEL:+%$MAX_PARALLEL}"
          --job-name="plainlm-$(basename "${CONFIG%.*}")"
          --nodes="$NODES" "${LAYOUT[@]}" --time="$TIME"
          --signal="B:USR1@$WARN_SECONDS"  # B: to this batch shell only; it forwards (see below)
          --requeue --open-mode=append --output="$LOG_DIR/%x_%A_%a.out"
          --export=ALL)                    # the job sees these settings and PLAINLM_DIR
    [ "$GPUS_PER_NODE" -gt 0 ] && ARGS+=(--gpus-per-node="$GPUS_PER_NODE")
    [ -n "$PARTITION" ] && ARGS+=(--partition="$PARTITION")
    [ -n "$ACCOUNT" ] && ARGS+=(--account="$ACCOUNT")
    [ -n "$MEM" ] && ARGS+=(--mem="$MEM")
    echo "slurm.sh: submitting $N job(s) of $CONFIG (list them: python sweep.py $CONFIG --list)"
    # shellcheck disable=SC2086  # EXTRA_SBATCH is meant to split into several options
    exec sbatch "${ARGS[@]}" $EXTRA_SBATCH "$PLAINLM_DIR/$(basename "${BASH_SOURCE[0]}")" "$@"
fi

# ---- run: inside array task i, train sweep job i ---------------------------------------------
# USR1: the time limit is near -> stop, then requeue. TERM: scancel, or preemption by SLURM ->
# stop (with a checkpoint if the grace time allows) but do not requeue: scancel means stop, and
# SLURM requeues preempted jobs itself. The traps are set before anything else so that an early
# signal cannot kill this shell; the launcher is signalled once (see STOP_SIGNAL below).
GOT_USR1=0
GOT_TERM=0
LAUNCHER=""
FORWARDED=0
# shellcheck disable=SC2317  # the functions run from the traps
forward_stop() {
    { [ -n "$LAUNCHER" ] && [ "$FORWARDED" = 0 ]; } || return 0
    FORWARDED=1
    kill -s "$STOP_SIGNAL" "$LAUNCHER" 2>/dev/null
}
# shellcheck disable=SC2317
stop_training() {
    if [ "$1" = USR1 ]; then GOT_USR1=1; else GOT_TERM=1; fi
    echo "slurm.sh: got SIG$1: asking the training to save a checkpoint and stop" \
         "(torchrun then prints a SignalException traceback: that is expected)"
    forward_stop
}
trap 'stop_training USR1' USR1
trap 'stop_training TERM' TERM

cd "${SLURM_SUBMIT_DIR:-.}" || exit 1  # relative config and data paths mean what they meant at submit
PLAINLM_DIR=${PLAINLM_DIR:-$PWD}
eval "$ENV_SETUP" || { echo "slurm.sh: error: ENV_SETUP failed: $ENV_SETUP" >&2; exit 1; }
CONFIG=$1
shift
TRAIN=("$PLAINLM_DIR/train.py" "$CONFIG" --job_idx "$SLURM_ARRAY_TASK_ID" "$@")
TASK="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
NODES=${SLURM_JOB_NUM_NODES:-$NODES}
echo "slurm.sh: task $TASK (start $(( ${SLURM_RESTART_COUNT:-0} + 1 ))) on $(hostname): job" \
     "$SLURM_ARRAY_TASK_ID of $CONFIG, $NODES node(s) x $PROCS_PER_NODE process(es)"

# How to ask the training to checkpoint and stop (train.py does so on SIGTERM, SIGUSR1 and
# SIGINT, then exits 75) depends on the launcher in between:
# - torchrun catches SIGTERM and passes it on to every worker, then waits for them up to
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds before SIGKILL (recent torch; older torchrun waits
#   30 s). It does not catch SIGUSR1: that would kill torchrun itself and orphan the workers.
#   So torchrun gets SIGTERM.
# - srun turns a SIGTERM it receives into SIGKILL for its tasks, but forwards SIGUSR1 as is.
#   So srun gets SIGUSR1.
if [ "$NODES" -gt 1 ]; then
    # One task per GPU on every node; train.py reads SLURM_PROCID / SLURM_STEP_NUM_TASKS /
    # SLURM_LOCALID. --kill-on-bad-exit=1: a crashed rank takes the others down at once instead
    # of leaving them blocked until the process-group timeout. A signalled stop is safe with it:
    # every rank waits at a barrier until rank 0 has written the checkpoint, then exits 75.
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))  # from the job id: array tasks may share a node
    export MASTER_ADDR MASTER_PORT
    STOP_SIGNAL=USR1
    srun --nodes="$NODES" --ntasks-per-node="$PROCS_PER_NODE" --cpus-per-task="$CPUS_PER_GPU" \
         --kill-on-bad-exit=1 python "${TRAIN[@]}" &
else
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-$WARN_SECONDS}
    STOP_SIGNAL=TERM
    torchrun --standalone --nproc_per_node="$PROCS_PER_NODE" "${TRAIN[@]}" &
fi
LAUNCHER=$!
[ $(( GOT_USR1 + GOT_TERM )) -gt 0 ] && forward_stop  # a signal came while starting up

# `wait` returns early (status > 128) when a trapped signal arrives; wait again until the
# launcher has really exited: then its status is the training's.
while true; do
    wait "$LAUNCHER"
    STATUS=$?
    kill -0 "$LAUNCHER" 2>/dev/null || break
done

# train.py exits 0 when training is finished and 75 when it stopped early after a checkpoint;
# torchrun reports 1 for a stopped worker, so the trap having fired counts as much as the code.
if [ "$STATUS" -eq 0 ]; then
    echo "slurm.sh: task $TASK finished"
    exit 0
fi
if [ "$GOT_USR1" = 1 ] || { [ "$GOT_TERM" = 0 ] && [ "$STATUS" -eq 75 ]; }; then
    echo "slurm.sh: task $TASK stopped before the end (exit $STATUS): requeueing it to resume"
    scontrol requeue "$TASK"
    exit 0
fi
echo "slurm.sh: task $TASK failed (exit $STATUS)" >&2
exit "$STATUS"
