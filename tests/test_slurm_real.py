"""slurm.sh against a real SLURM scheduler: job arrays, the warning signal, requeue, scancel.

Opt-in and slow (a requeued task waits ~2 minutes, Reason=BeginTime, before it starts again):

    PLAINLM_REAL_SLURM=1 python -m pytest -q -rs tests/test_slurm_real.py

It submits from a temporary folder on this machine, so it needs a cluster whose nodes see that
folder: a single-node cluster such as the one `slurm-local.sh start` sets up. The stand-in tests
in test_sweep.py cover the same script without a cluster and run everywhere.
"""
import os
import re
import shutil
import subprocess
import time

import pytest

if os.environ.get("PLAINLM_REAL_SLURM") != "1":
    pytest.skip("real-SLURM tests are opt-in: PLAINLM_REAL_SLURM=1 python -m pytest -q tests/test_slurm_real.py",
                allow_module_level=True)
if shutil.which("sbatch") is None:
    pytest.skip("sbatch is not on PATH: no SLURM here", allow_module_level=True)
_check = subprocess.run(["sbatch", "--test-only", "--wrap=true"], capture_output=True, text=True, timeout=60)
if _check.returncode != 0:
    pytest.skip(f"sbatch does not work here: {_check.stderr.strip()}", allow_module_level=True)

import torch  # noqa: E402  (after the skips: the default suite skips this module quickly)
import yaml  # noqa: E402
from test_sweep import final_checkpoint, train_losses  # noqa: E402  (the stand-in tests' readers)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 500  # long enough to be interrupted mid-run through the scheduler, short on a busy machine


def write_config(folder, data_dir, **extra):
    """Two jobs (lr varies) of a tiny character model on CPU."""
    cfg = {"data_dir": data_dir, "out_dir": "runs", "exp_name": "sweep", "seq_len": 32, "d_model": 32, "n_layers": 1,
           "n_heads": 2, "batch_size": 8, "micro_batch_size": 8, "steps": STEPS, "warmup_steps": 2, "eval_every": 0,
           "eval_tokens": 512, "log_every": 1, "save_every": 0, "sample_tokens": 0, "device": "cpu",
           "lr": [1.0e-3, 3.0e-3]}
    cfg.update(extra)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "sweep.yaml"), "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return "sweep.yaml"


def submit(folder, *args, **settings):
    """`bash slurm.sh ARGS` from folder with only the given settings, as a user types it;
    returns the array job id."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(settings)
    result = subprocess.run(["bash", os.path.join(ROOT, "slurm.sh"), *args], cwd=folder, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return re.search(r"Submitted batch job (\d+)", result.stdout).group(1)


def logs(folder):
    log_dir = os.path.join(folder, "slurm_logs")
    names = sorted(os.listdir(log_dir)) if os.path.isdir(log_dir) else []
    return {name: open(os.path.join(log_dir, name)).read() for name in names}


def show(folder):
    return "\n".join(f"---- {name}\n{text[-4000:]}" for name, text in logs(folder).items())


def wait_for_job(job, folder, timeout=600):
    """Block until no task of the array is pending or running (printing what it waits for)."""
    deadline, last = time.time() + timeout, None
    while time.time() < deadline:
        queue = subprocess.run(["squeue", "-h", "-j", job, "-o", "%i %T %r"], capture_output=True, text=True).stdout
        if not queue.strip():
            return
        if queue != last:
            print(f"waiting for job {job}:\n{queue}", flush=True)
            last = queue
        time.sleep(1)
    subprocess.run(["scancel", job])
    raise AssertionError(f"job {job} still queued after {timeout} s\n{show(folder)}")


def tasks(job):
    """{task id: (state, exit code, restarts)} of a finished array, as SLURM records them."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
    fields = [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines()]
    return {int(f["ArrayTaskId"]): (f["JobState"], f["ExitCode"], int(f["Restarts"])) for f in fields if "ArrayTaskId" in f}


def wait_for_steps(run_dir, n, folder, timeout=300):
    path, deadline = os.path.join(run_dir, "metrics.jsonl"), time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path) and sum(1 for _ in open(path)) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"no progress in {run_dir}\n{show(folder)}")


@pytest.fixture(scope="module")
def finished_sweep(hamlet_data, tmp_path_factory):
    """The README's CPU-only command: GPUS_PER_NODE=0 bash slurm.sh CONFIG."""
    folder = str(tmp_path_factory.mktemp("real_sweep"))
    cfg = write_config(folder, hamlet_data)
    job = submit(folder, cfg, GPUS_PER_NODE="0")
    wait_for_job(job, folder)
    return folder, job


def test_cpu_sweep_submitted_as_the_readme_says_trains_every_job(finished_sweep):
    folder, job = finished_sweep
    assert tasks(job) == {0: ("COMPLETED", "0:0", 0), 1: ("COMPLETED", "0:0", 0)}, show(folder)
    for task, lr in [(0, 1e-3), (1, 3e-3)]:
        run_dir = os.path.join(folder, "runs", "sweep", f"job{task}")
        ckpt = final_checkpoint(run_dir)
        assert ckpt["step"] == STEPS and ckpt["config"]["lr"] == lr and ckpt["config"]["job_idx"] == task
        log = logs(folder)[f"plainlm-sweep_{job}_{task}.out"]
        assert "1 node(s) x 1 process(es) x 2 thread(s)" in log and f"task {job}_{task} finished" in log, log


def test_warning_signal_requeues_and_the_job_ends_bit_identical(finished_sweep, hamlet_data, tmp_path):
    """`scancel --signal=USR1 --batch` (what the time limit's warning does): the task saves,
    requeues itself, starts again after SLURM's requeue wait, resumes and ends exactly where the
    uninterrupted job of the first sweep ended."""
    reference_folder, _ = finished_sweep
    folder = str(tmp_path)
    cfg = write_config(folder, hamlet_data)
    job = submit(folder, cfg, GPUS_PER_NODE="0")
    run_dir = os.path.join(folder, "runs", "sweep", "job0")
    wait_for_steps(run_dir, 50, folder)
    subprocess.run(["scancel", "--signal=USR1", "--batch", f"{job}_0"], check=True)
    wait_for_job(job, folder, timeout=900)

    assert tasks(job) == {0: ("COMPLETED", "0:0", 1), 1: ("COMPLETED", "0:0", 0)}, show(folder)
    (log,) = [text for name, text in logs(folder).items() if name.endswith(f"_{job}_0.out")]  # one file, appended to
    stopped_at = int(re.search(r"SIGUSR1: saved a checkpoint at step (\d+)", log).group(1))
    assert 50 <= stopped_at < STEPS, log
    assert "stopped after saving a checkpoint: requeueing it to resume" in log and "(start 2)" in log, log
    assert f"resumed from {os.path.join('runs', 'sweep', 'job0')}" in log and f"task {job}_0 finished" in log, log
    assert "Traceback" not in log and "failed" not in log, log

    ours, theirs = final_checkpoint(run_dir), final_checkpoint(os.path.join(reference_folder, "runs", "sweep", "job0"))
    assert ours["step"] == theirs["step"] == STEPS
    assert all(torch.equal(ours["model"][k], theirs["model"][k]) for k in theirs["model"])
    assert train_losses(run_dir) == train_losses(os.path.join(reference_folder, "runs", "sweep", "job0"))


def run_files(folder):
    """{path: (content, mtime of a checkpoint)} of every file in both run folders."""
    files = {}
    for task in (0, 1):
        run_dir = os.path.join(folder, "runs", "sweep", f"job{task}")
        for name in os.listdir(run_dir):
            path = os.path.join(run_dir, name)
            with open(path, "rb") as f:
                files[path] = (f.read(), os.stat(path).st_mtime_ns if name.startswith("ckpt_") else None)
    return files


def test_resubmitting_a_finished_sweep_retrains_nothing_and_writes_new_logs(finished_sweep):
    folder, first_job = finished_sweep
    before = run_files(folder)
    job = submit(folder, "sweep.yaml", GPUS_PER_NODE="0")
    wait_for_job(job, folder)
    assert tasks(job) == {0: ("COMPLETED", "0:0", 0), 1: ("COMPLETED", "0:0", 0)}, show(folder)
    for task in (0, 1):
        log = logs(folder)[f"plainlm-sweep_{job}_{task}.out"]  # a new file: a resubmission is a new job id
        assert f"already trained to step {STEPS} (steps: {STEPS}): nothing to do" in log, log
    assert run_files(folder) == before  # no checkpoint written, no file added or changed
    assert f"plainlm-sweep_{first_job}_0.out" in logs(folder)


def test_scancel_is_a_clean_stop_with_a_checkpoint(hamlet_data, tmp_path):
    """scancel sends SIGTERM to every process of the job: the training saves within KillWait,
    and slurm.sh reports the stop, not a failure."""
    folder = str(tmp_path)
    cfg = write_config(folder, hamlet_data, lr=1.0e-3)  # a single job
    job = submit(folder, cfg, GPUS_PER_NODE="0")
    run_dir = os.path.join(folder, "runs", "sweep", "job0")
    wait_for_steps(run_dir, 50, folder)
    subprocess.run(["scancel", job], check=True)
    wait_for_job(job, folder)
    (log,) = logs(folder).values()
    assert "SIGTERM: saved a checkpoint at step" in log, log
    assert "stopped after saving a checkpoint (SIGTERM from SLURM" in log, log
    assert "Traceback" not in log and "failed" not in log, log
    assert 50 <= final_checkpoint(run_dir)["step"] < STEPS


def test_a_request_no_node_can_run_is_refused_in_one_line(hamlet_data, tmp_path):
    folder = str(tmp_path)
    cfg = write_config(folder, hamlet_data)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(["bash", os.path.join(ROOT, "slurm.sh"), cfg], cwd=folder, capture_output=True, text=True,
                            timeout=120, env=dict(env, GPUS_PER_NODE="0", CPUS_PER_PROC="100000"))
    assert result.returncode == 1 and result.stdout == "", result.stdout + result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("slurm.sh: error: SLURM cannot run this job as asked (GPUS_PER_NODE=0, CPUS_PER_PROC=100000")
    assert not os.path.exists(os.path.join(folder, "slurm_logs"))
    gres = subprocess.run(["sinfo", "-h", "-o", "%G"], capture_output=True, text=True).stdout.split()
    if all(g == "(null)" for g in gres):  # a cluster without GPUs: the GPU default is refused the same way
        result = subprocess.run(["bash", os.path.join(ROOT, "slurm.sh"), cfg], cwd=folder, capture_output=True,
                                text=True, timeout=120, env=env)
        assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
        assert "GPUS_PER_NODE=1" in result.stderr and "GPUS_PER_NODE=0 on a cluster without GPUs" in result.stderr
