#!/bin/bash
# Train every job of a sweep config as one SLURM job array: preemption-safe, resumable.
#
#   bash slurm.sh CONFIG.yaml [--key=value ...]
#   GPUS_PER_NODE=0 bash slurm.sh CONFIG.yaml [--key=value ...]    # on a cluster without GPUs
#
# Outside a SLURM job this script asks `python sweep.py CONFIG --count` for the number of jobs N,
# checks with `sbatch --test-only` that SLURM can run such a job, and submits itself as
# `sbatch --array=0-(N-1) ... slurm.sh CONFIG ...`. Inside array task i it runs
# `train.py CONFIG --job_idx i --key=value ...`, which trains job i in <out_dir>/<exp_name>/job<i>.
# SLURM sends USR1 to this script WARN_SECONDS before the time limit; the training then finishes
# its step, saves a checkpoint and exits, the task requeues itself, and the next start resumes
# from that checkpoint (train.py's resume: auto).
#
# Every setting below can also be given per submission through the environment, e.g.
#   PARTITION=gpu GPUS_PER_NODE=4 TIME=48:00:00 bash slurm.sh configs/x.yaml

# ---- settings --------------------------------------------------------------------------------
PARTITION=${PARTITION:-}          # partition to run in; empty: the cluster's default partition
ACCOUNT=${ACCOUNT:-}              # account to charge; empty: your default account
NODES=${NODES:-1}                 # nodes per job
GPUS_PER_NODE=${GPUS_PER_NODE:-1} # GPUs per node = training processes per node; 0: CPU-only, one process per node
CPUS_PER_PROC=${CPUS_PER_PROC:-}  # CPU cores (and torch threads) per training process; empty: 8 with GPUs, 2 without
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
CPUS_PER_PROC=${CPUS_PER_PROC:-$(( GPUS_PER_NODE > 0 ? 8 : 2 ))}

usage() {
    sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit "$1"
}

# ---- submit: not inside an array task --------------------------------------------------------
if [ -z "${SLURM_ARRAY_TASK_ID:-}" ]; then
    case "${1:-}" in
        -h|--help) usage 0 ;;
        ""|-*) echo "slurm.sh: error: give the config file first: bash slurm.sh CONFIG.yaml [--key=value ...]" >&2
               exit 2 ;;
    esac
    if ! command -v sbatch >/dev/null; then
        echo "slurm.sh: error: sbatch not found: run this on a SLURM login node (without SLURM: python train.py CONFIG --job_idx i)" >&2
        exit 1
    fi
    CONFIG=$1
    # sbatch copies this script to a spool folder, so the job finds the code through PLAINLM_DIR.
    export PLAINLM_DIR
    PLAINLM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
    N=$(python "$PLAINLM_DIR/sweep.py" "$CONFIG" --count) || exit 1  # sweep.py printed why
    # Every job's config must be valid before any is submitted: a typo in one job fails here, not in the queue.
    python "$PLAINLM_DIR/sweep.py" "$CONFIG" --check >/dev/null || exit 1
    ARGS=(--array="0-$(( N - 1 ))${MAX_PARALLEL:+%$MAX_PARALLEL}"
          --job-name="plainlm-$(basename "${CONFIG%.*}")"
          --nodes="$NODES" --ntasks-per-node="$PROCS_PER_NODE" --cpus-per-task="$CPUS_PER_PROC"
          --time="$TIME"
          --signal="B:USR1@$WARN_SECONDS"  # B: to this batch shell only; it forwards (see below)
          --requeue --open-mode=append --output="$LOG_DIR/%x_%A_%a.out"
          --export=ALL)                    # the job sees these settings and PLAINLM_DIR
    [ "$GPUS_PER_NODE" -gt 0 ] && ARGS+=(--gpus-per-node="$GPUS_PER_NODE")
    [ -n "$PARTITION" ] && ARGS+=(--partition="$PARTITION")
    [ -n "$ACCOUNT" ] && ARGS+=(--account="$ACCOUNT")
    [ -n "$MEM" ] && ARGS+=(--mem="$MEM")
    # shellcheck disable=SC2206  # EXTRA_SBATCH is meant to split into several options
    ARGS+=($EXTRA_SBATCH "$PLAINLM_DIR/$(basename "${BASH_SOURCE[0]}")" "$@")
    # A request no node can satisfy (GPUs on a CPU-only cluster, more cores or memory than a node
    # has) would otherwise be accepted and pend forever; --test-only asks the scheduler first.
    if ! CHECK=$(sbatch --test-only "${ARGS[@]}" 2>&1); then
        CHECK=$(printf '%s\n' "$CHECK" | sed -e '/^\s*$/d' -e 's/^sbatch: //' -e 's/^error: //' | head -n 1)
        HINT="GPUS_PER_NODE=0 on a cluster without GPUs"
        [ "$GPUS_PER_NODE" -gt 0 ] || HINT="cores and memory per node: sinfo -o '%P %c %m'"
        echo "slurm.sh: error: SLURM cannot run this job as asked (GPUS_PER_NODE=$GPUS_PER_NODE," \
             "CPUS_PER_PROC=$CPUS_PER_PROC${PARTITION:+, PARTITION=$PARTITION}${MEM:+, MEM=$MEM}, TIME=$TIME):" \
             "$CHECK; change these settings ($HINT)" >&2
        exit 1
    fi
    mkdir -p "$LOG_DIR"
    echo "slurm.sh: submitting $N job(s) of $CONFIG (list them: python sweep.py $CONFIG --list)"
    exec sbatch "${ARGS[@]}"
fi

# ---- run: inside array task i, train sweep job i ---------------------------------------------
# One signal path. USR1 (the time limit is near) comes to this shell alone: it is passed on, as
# USR1, to the training, which saves and exits 75; then the task requeues itself. TERM (scancel,
# preemption, `scontrol requeue`, the time limit itself) reaches every process of the job from
# SLURM directly, so it is only noted here: the training saves if the grace time (KillWait)
# allows, and the task is not requeued (scancel means stop; SLURM requeues preempted jobs itself).
# Passing TERM on would even hurt: srun turns a SIGTERM it receives into SIGKILL for its tasks.
# The traps are set before anything else so that an early signal cannot kill this shell.
GOT_USR1=0
GOT_TERM=0
LAUNCHER=""
FORWARDED=0
# shellcheck disable=SC2317  # the functions run from the traps
forward_usr1() {
    { [ -n "$LAUNCHER" ] && [ "$GOT_USR1" = 1 ] && [ "$FORWARDED" = 0 ]; } || return 0
    FORWARDED=1
    kill -s USR1 "$LAUNCHER" 2>/dev/null
}
trap 'GOT_USR1=1; echo "slurm.sh: got SIGUSR1: asking the training to save a checkpoint and stop"; forward_usr1' USR1
trap 'GOT_TERM=1; echo "slurm.sh: got SIGTERM (it reaches the training directly): waiting for it to save and stop"' TERM

cd "${SLURM_SUBMIT_DIR:-.}" || exit 1  # relative config and data paths mean what they meant at submit
PLAINLM_DIR=${PLAINLM_DIR:-$PWD}
eval "$ENV_SETUP" || { echo "slurm.sh: error: ENV_SETUP failed: $ENV_SETUP" >&2; exit 1; }
CONFIG=$1
shift
TRAIN=("$PLAINLM_DIR/train.py" "$CONFIG" --job_idx "$SLURM_ARRAY_TASK_ID" "$@")
TASK="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
NODES=${SLURM_JOB_NUM_NODES:-$NODES}
# torch starts as many threads as the node has cores unless told otherwise: each process gets
# exactly the cores SLURM gave its task (a value from the submitting shell would not fit here).
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-$CPUS_PER_PROC}
echo "slurm.sh: task $TASK (start $(( ${SLURM_RESTART_COUNT:-0} + 1 ))) on $(hostname): job" \
     "$SLURM_ARRAY_TASK_ID of $CONFIG, $NODES node(s) x $PROCS_PER_NODE process(es) x $OMP_NUM_THREADS thread(s)"

if [ "$GOT_USR1" = 1 ]; then  # the time limit is near already: starting the training is pointless
    echo "slurm.sh: task $TASK got SIGUSR1 before the training started: requeueing it"
    scontrol requeue "$TASK"
    exit 0
fi
if [ $(( NODES * PROCS_PER_NODE )) -eq 1 ]; then
    # One process: train.py itself, so its exit status (75: stopped after a checkpoint) and the
    # signal it got reach this script as they are.
    python "${TRAIN[@]}" &
else
    # One task per process, on one node or several; train.py reads SLURM_PROCID /
    # SLURM_STEP_NUM_TASKS / SLURM_LOCALID. srun passes USR1 on to every task and exits with the
    # highest exit status of its tasks (75 when all stopped after the checkpoint).
    # --kill-on-bad-exit=1: a crashed rank takes the others down at once instead of leaving them
    # blocked until the process-group timeout. A signalled stop is safe with it: every rank waits
    # at a barrier until rank 0 has written the checkpoint, then exits 75.
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))  # from the job id: array tasks may share a node
    export MASTER_ADDR MASTER_PORT
    srun --nodes="$NODES" --ntasks-per-node="$PROCS_PER_NODE" --cpus-per-task="$OMP_NUM_THREADS" \
         --kill-on-bad-exit=1 python "${TRAIN[@]}" &
fi
LAUNCHER=$!

# `wait` returns early (status > 128) when a trapped signal arrives; wait again until the
# launcher has really exited: then its status is the training's.
while true; do
    wait "$LAUNCHER"
    STATUS=$?
    kill -0 "$LAUNCHER" 2>/dev/null || break
done

# train.py exits 0 when training is finished and 75 when it stopped early after a checkpoint;
# anything else is a crash, and stays a failure even when a signal came too. One exception: 138
# (128 + SIGUSR1) means our USR1 came before train.py had set up its handler, so it stopped
# without saving: the requeued task resumes from the checkpoint before.
if [ "$STATUS" -eq 138 ] && [ "$FORWARDED" = 1 ]; then
    echo "slurm.sh: task $TASK got SIGUSR1 while the training was starting up: requeueing it"
    scontrol requeue "$TASK"
    exit 0
fi
if [ "$STATUS" -eq 0 ]; then
    echo "slurm.sh: task $TASK finished"
    exit 0
fi
if [ "$STATUS" -eq 75 ] && [ "$GOT_TERM" = 1 ]; then
    echo "slurm.sh: task $TASK stopped after saving a checkpoint (SIGTERM from SLURM: scancel, preemption," \
         "scontrol requeue or the time limit); a requeued job resumes by itself, else submit again to resume"
    exit 0
fi
if [ "$STATUS" -eq 75 ]; then
    echo "slurm.sh: task $TASK stopped after saving a checkpoint: requeueing it to resume"
    scontrol requeue "$TASK"
    exit 0
fi
echo "slurm.sh: task $TASK failed (exit $STATUS)" >&2
exit "$STATUS"
