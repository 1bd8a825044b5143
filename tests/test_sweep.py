"""Sweeps: grid expansion (sweep.py), job arrays on SLURM (slurm.sh) and HTCondor (condor.sub).

No cluster here: stand-in `sbatch`, `srun` and `scontrol` scripts on PATH record their arguments
and run the array tasks locally with the SLURM variables set, so slurm.sh runs unchanged.
"""
import contextlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import yaml

import sweep
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# sweep.py: grid order, literal lists, zipped axes, errors

GRID = {"lr": [1, 2], "seed": 7, "n_layers": [10, 20, 30]}


def test_grid_is_the_product_in_file_order_last_key_fastest():
    jobs = sweep.expand(GRID)
    assert sweep.count(GRID) == 6
    assert [(j["lr"], j["n_layers"]) for j in jobs] == [(1, 10), (1, 20), (1, 30), (2, 10), (2, 20), (2, 30)]
    assert all(j["seed"] == 7 and list(j) == ["lr", "seed", "n_layers"] for j in jobs)
    assert sweep.job_config(GRID, 4) == jobs[4] == {"lr": 2, "seed": 7, "n_layers": 20}
    assert sweep.varying(GRID, 4) == {"lr": 2, "n_layers": 20}
    # Swapping the keys in the file swaps which one varies fastest.
    swapped = {"n_layers": [10, 20, 30], "lr": [1, 2]}
    assert [(j["lr"], j["n_layers"]) for j in sweep.expand(swapped)][:3] == [(1, 10), (2, 10), (1, 20)]


def test_a_config_without_lists_is_one_job():
    raw = {"lr": 0.1, "steps": 5}
    assert sweep.count(raw) == 1 and sweep.expand(raw) == [raw]
    assert sweep.job_config(raw, 0) == raw and sweep.job_config(raw, None) == raw
    assert sweep.varying(raw, 0) == {}
    assert sweep.count({}) == 1 and sweep.count(None) == 1


def test_literal_lists_are_wrapped_in_one_more_list():
    raw = {"betas": [[0.9, 0.95]], "empty": [[]], "pairs": [[1, 2], [3, 4]], "lr": [1, 2]}
    jobs = sweep.expand(raw)
    assert len(jobs) == 4
    assert all(j["betas"] == [0.9, 0.95] and j["empty"] == [] for j in jobs)
    assert [j["pairs"] for j in jobs] == [[1, 2], [1, 2], [3, 4], [3, 4]]
    # A one-value axis does not vary: it is not in `varying` nor in the --list table.
    assert sweep.varying(raw, 3) == {"pairs": [3, 4], "lr": 2}
    jobs[0]["betas"].append(1)  # each job owns its values
    assert sweep.job_config(raw, 0)["betas"] == [0.9, 0.95]


def test_zipped_axes_vary_together():
    raw = {"lr, warmup_steps": [[1e-3, 100], [3e-3, 200]], "n_layers": [2, 4], "seq_len": 64}
    jobs = sweep.expand(raw)
    assert [(j["lr"], j["warmup_steps"], j["n_layers"]) for j in jobs] == [
        (1e-3, 100, 2), (1e-3, 100, 4), (3e-3, 200, 2), (3e-3, 200, 4)]
    assert list(jobs[0]) == ["lr", "warmup_steps", "n_layers", "seq_len"]  # expanded in place
    assert sweep.varying(raw, 2) == {"lr": 3e-3, "warmup_steps": 200, "n_layers": 2}


def one_line_error(fn, *args):
    with pytest.raises(SystemExit) as e:
        fn(*args)
    message = str(e.value.code)
    assert message.startswith("sweep.py: error: ") and "\n" not in message
    return message


@pytest.mark.parametrize("raw, idx, expected", [
    (GRID, 6, "job_idx 6 is out of range: this sweep has 6 jobs (0 to 5)"),
    (GRID, -1, "job_idx -1 is out of range"),
    ({"lr": 1}, 1, "this sweep has 1 job (0 to 0)"),
    (GRID, None, "this config is a sweep of 6 jobs: choose one with --job_idx 0..5"),
    ({"lr,warmup_steps": [[1, 2], [3]]}, 0, "entry 1 is [3] but should be a list of 2 values, one for each of lr, warmup_steps"),
    ({"lr,warmup_steps": [1, 2]}, 0, "entry 0 is 1 but should be a list of 2 values"),
    ({"lr,warmup_steps": 5}, 0, "zipped axis 'lr,warmup_steps' needs a list of value lists like [[<lr>, <warmup_steps>], ...]"),
    ({"lr": [1], "lr,seed": [[1, 2]]}, 0, "key 'lr' is set twice"),
    ({"lr,": [[1, 2]]}, 0, "zipped key 'lr,' has an empty name"),
    ({"lr": []}, 0, "key 'lr' is an empty list"),
    ([1, 2], 0, "a config must be a YAML mapping"),
])
def test_bad_sweeps_are_one_clear_error(raw, idx, expected):
    assert expected in one_line_error(sweep.job_config, raw, idx)


def run_sweep_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sweep.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_command_line_count_list_and_errors(tmp_path):
    cfg = tmp_path / "grid.yaml"
    cfg.write_text("lr: [1.0e-3, 3.0e-3]\nn_layers: [2, 4]\nbetas: [[0.9, 0.95]]\nqk_norm,seed: [[true, 1], [false, 2]]\n")
    count = run_sweep_cli(str(cfg), "--count")
    assert count.returncode == 0 and count.stdout == "8\n"
    listing = run_sweep_cli(str(cfg), "--list")
    lines = listing.stdout.splitlines()
    assert lines[0].split() == ["job", "lr", "n_layers", "qk_norm", "seed"]
    assert lines[1].split() == ["0", "0.001", "2", "true", "1"]
    assert lines[8].split() == ["7", "0.003", "4", "false", "2"]
    assert lines[9] == "(8 jobs)"
    assert lines[10] == f"curves and a summary table once they run: python plot.py {os.path.join('runs', 'grid')}"
    assert run_sweep_cli(str(cfg)).stdout == listing.stdout  # --list is the default

    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\n")
    for args in [(str(cfg), "--job_idx", "8"), (str(cfg), "--job_idx", "-3"), (str(tmp_path / "missing.yaml"), "--count"),
                 (str(bad), "--count")]:
        result = run_sweep_cli(*args)
        assert result.returncode != 0 and result.stdout == ""
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith("sweep.py: error: ")
    assert "out of range: this sweep has 8 jobs (0 to 7)" in run_sweep_cli(str(cfg), "--job_idx", "8").stderr


def test_command_line_job_idx_prints_the_resolved_config(tmp_path):
    cfg = tmp_path / "grid.yaml"
    cfg.write_text("lr: [1.0e-3, 3.0e-3]\nn_layers: [2, 4]\nout_dir: somewhere\n")
    result = run_sweep_cli(str(cfg), "--job_idx", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"# job 2 of 4; run folder: {os.path.join('somewhere', 'grid', 'job2')}\n")
    resolved = yaml.safe_load(result.stdout)
    assert resolved["lr"] == 3e-3 and resolved["n_layers"] == 2
    assert resolved["steps"] is not None and resolved["exp_name"] == "grid"  # defaults filled in
    # block YAML, one key per line, that is itself a config file giving the same config
    assert result.stdout.count("\n") == len(train.CONFIG) + 1 and "{" not in result.stdout
    (tmp_path / "job2.yaml").write_text(result.stdout)
    again = train.load_config(str(tmp_path / "job2.yaml"))
    assert {key: again[key] for key in train.CONFIG} == resolved


# ---------------------------------------------------------------------------------------------
# SLURM with stand-ins for sbatch / srun / scontrol

STANDINS = {
    # sbatch starts every array task at once, as SLURM would on a free cluster, and waits for them.
    # --test-only answers as SLURM does: yes, or (STANDIN_SBATCH_REFUSE set) SLURM's refusal.
    "sbatch": """
        opts, i = {}, 0
        while args[i].startswith("-"):
            key, _, value = args[i].partition("=")
            opts[key], i = value, i + 1
        script, script_args = args[i], args[i + 1:]
        if "--test-only" in opts:
            if os.environ.get("STANDIN_SBATCH_REFUSE"):
                sys.exit("allocation failure: " + os.environ["STANDIN_SBATCH_REFUSE"])
            print("sbatch: Job 1000 to start at 2026-01-01T00:00:00 on nodes localhost", file=sys.stderr)
            sys.exit(0)
        first, last = opts["--array"].split("%")[0].split("-")
        tasks = {}
        for task in range(int(first), int(last) + 1):
            env = dict(os.environ, SLURM_JOB_ID=str(1001 + task), SLURM_ARRAY_JOB_ID="1000",
                       SLURM_ARRAY_TASK_ID=str(task), SLURM_SUBMIT_DIR=os.getcwd(), SLURM_RESTART_COUNT="0",
                       SLURM_JOB_NUM_NODES=opts["--nodes"], SLURM_JOB_NODELIST="localhost",
                       SLURM_CPUS_PER_TASK=opts["--cpus-per-task"])
            log = opts["--output"].replace("%x", opts["--job-name"]).replace("%A", "1000").replace("%a", str(task))
            with open(log, "a") as out:
                tasks[task] = subprocess.Popen(["bash", script, *script_args], env=env, stdout=out, stderr=subprocess.STDOUT)
        for task, proc in tasks.items():
            record({"task": task, "exit": proc.wait()})
        print("Submitted batch job 1000")
    """,
    # srun starts nodes x ntasks-per-node local processes with the task variables, forwards
    # SIGUSR1 to them (a SIGTERM would become SIGKILL, as in SLURM), exits with the highest code.
    "srun": """
        opts, i = {}, 0
        while args[i].startswith("-"):
            key, _, value = args[i].partition("=")
            opts[key], i = value, i + 1
        per_node = int(opts.get("--ntasks-per-node", 1))
        ntasks = int(opts.get("--nodes", 1)) * per_node
        procs = [subprocess.Popen(args[i:], env=dict(os.environ, SLURM_PROCID=str(r), SLURM_LOCALID=str(r % per_node),
                                                      SLURM_NODEID=str(r // per_node), SLURM_STEP_NUM_TASKS=str(ntasks),
                                                      SLURM_NTASKS=str(ntasks)))
                 for r in range(ntasks)]
        signal.signal(signal.SIGUSR1, lambda *_: [p.send_signal(signal.SIGUSR1) for p in procs])
        signal.signal(signal.SIGTERM, lambda *_: [p.kill() for p in procs])
        codes = [p.wait() for p in procs]
        sys.exit(max(c if c >= 0 else 128 - c for c in codes))
    """,
    "scontrol": """
        if args[:2] == ["show", "hostnames"]:
            print("localhost")
    """,
}


def make_standins(tmp_path):
    """A folder of stand-in SLURM commands, and the file where they record their calls."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "slurm_calls.jsonl"
    bin_dir.mkdir()
    for name, body in STANDINS.items():
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\nimport json, os, signal, subprocess, sys\nargs = sys.argv[1:]\n"
                        f"def record(extra):\n    with open({str(calls)!r}, 'a') as f:\n"
                        f"        f.write(json.dumps(dict(cmd={name!r}, args=args, **extra)) + '\\n')\n"
                        f"record({{}})\n" + textwrap.dedent(body))
        path.chmod(0o755)
    # `python` notes the torch thread count it is started with (OMP_NUM_THREADS), then is python.
    python = bin_dir / "python"
    python.write_text(f'#!/bin/sh\necho "$OMP_NUM_THREADS $*" >> {shlex.quote(str(tmp_path / "python_calls.txt"))}\n'
                      f'exec {shlex.quote(sys.executable)} "$@"\n')
    python.chmod(0o755)
    return bin_dir, calls


def training_threads(tmp_path):
    """OMP_NUM_THREADS of every train.py process started through the stand-in `python`."""
    path = tmp_path / "python_calls.txt"
    lines = path.read_text().splitlines() if path.exists() else []
    return [line.split()[0] for line in lines if "train.py" in line]


@pytest.fixture
def slurm_bin(tmp_path):
    return make_standins(tmp_path)


def slurm_env(bin_dir, **extra):
    """Environment for slurm.sh on this CPU machine: stand-ins first on PATH, one thread per
    process (the tiny models are much slower when processes fight over the 2 cores)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", GPUS_PER_NODE="0", CPUS_PER_PROC="1", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def calls_of(calls, cmd):
    if not calls.exists():
        return []
    return [c for c in map(json.loads, calls.read_text().splitlines()) if c["cmd"] == cmd and "task" not in c]


def write_sweep_config(tmp_path, data_dir, steps=200, **extra):
    """Two jobs (lr varies) of a tiny model on CPU."""
    cfg = {"data_dir": data_dir, "out_dir": str(tmp_path / "runs"), "exp_name": "sweep", "seq_len": 32, "d_model": 32,
           "n_layers": 1, "n_heads": 2, "batch_size": 8, "micro_batch_size": 8, "steps": steps, "warmup_steps": 2,
           "eval_every": 0, "eval_tokens": 512, "log_every": 1, "save_every": 0, "device": "cpu", "lr": [1.0e-3, 3.0e-3]}
    cfg.update(extra)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def final_checkpoint(run_dir):
    names = sorted(n for n in os.listdir(run_dir) if re.fullmatch(r"ckpt_\d{7}\.pt", n))
    return torch.load(os.path.join(run_dir, names[-1]), map_location="cpu", weights_only=False)


def train_losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [(r["step"], r["train_loss"]) for r in map(json.loads, f) if "train_loss" in r]


def show_logs(tmp_path):
    """Everything the jobs printed, for the assertion message when a test fails."""
    logs = sorted((tmp_path / "slurm_logs").glob("*.out")) if (tmp_path / "slurm_logs").exists() else []
    return "\n".join(f"---- {p.name}\n{p.read_text()[-3000:]}" for p in logs)


@pytest.fixture(scope="module")
def submitted_sweep(hamlet_data, tmp_path_factory):
    """`bash slurm.sh sweep.yaml` with stand-ins: submits the 2-job array, which trains both.
    The submitting shell's OMP_NUM_THREADS=3 must not reach the 1-core tasks."""
    tmp_path = tmp_path_factory.mktemp("slurm_sweep")
    bin_dir, calls = make_standins(tmp_path)
    cfg = write_sweep_config(tmp_path, hamlet_data)
    env = slurm_env(bin_dir, WARN_SECONDS="120", TIME="1:00:00", OMP_NUM_THREADS="3")
    result = subprocess.run(["bash", os.path.join(ROOT, "slurm.sh"), str(cfg)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env=env)
    return tmp_path, cfg, calls, result


def test_slurm_submits_an_array_sized_by_the_sweep_and_each_job_trains_its_config(submitted_sweep):
    tmp_path, cfg, calls, result = submitted_sweep
    assert result.returncode == 0, result.stdout + result.stderr + show_logs(tmp_path)
    check, sbatch = calls_of(calls, "sbatch")
    assert check["args"] == ["--test-only", *sbatch["args"]]  # SLURM is asked first whether it can run it
    args = sbatch["args"]
    assert "--array=0-1" in args and "--signal=B:USR1@120" in args and "--requeue" in args and "--time=1:00:00" in args
    assert "--ntasks-per-node=1" in args and "--cpus-per-task=1" in args and not any("gpu" in a for a in args if a.startswith("--"))
    assert args[-2:] == [os.path.join(ROOT, "slurm.sh"), str(cfg)]  # it submits itself with the config
    assert training_threads(tmp_path) == ["1", "1"]  # torch threads = the task's cores, not the login shell's
    tasks = [json.loads(line) for line in calls.read_text().splitlines() if '"task"' in line]
    assert [(t["task"], t["exit"]) for t in tasks] == [(0, 0), (1, 0)], show_logs(tmp_path)
    assert calls_of(calls, "scontrol") == []  # finished jobs are not requeued
    for job, lr in [(0, 1e-3), (1, 3e-3)]:
        run_dir = tmp_path / "runs" / "sweep" / f"job{job}"
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert saved["lr"] == lr and saved["job_idx"] == job
        ckpt = final_checkpoint(run_dir)
        assert ckpt["step"] == 200 and ckpt["config"]["lr"] == lr
        assert [s for s, _ in train_losses(run_dir)] == list(range(1, 201))
    assert train_losses(tmp_path / "runs" / "sweep" / "job0") != train_losses(tmp_path / "runs" / "sweep" / "job1")


def test_slurm_refuses_a_bad_sweep_before_submitting(slurm_bin, tmp_path):
    bin_dir, calls = slurm_bin
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr,warmup_steps: [[1.0e-3, 10], [2.0e-3]]\n")
    result = subprocess.run(["bash", os.path.join(ROOT, "slurm.sh"), str(bad)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, env=slurm_env(bin_dir))
    assert result.returncode != 0 and "entry 1 is [0.002] but should be a list of 2 values" in result.stderr
    assert calls_of(calls, "sbatch") == []


def test_a_bad_job_config_is_caught_before_anything_is_submitted(hamlet_data, slurm_bin, tmp_path):
    """sweep.py --check resolves every job as train.py would; slurm.sh runs it first, so one bad job
    (here job 1's negative lr) fails the submission in one line naming that job."""
    bin_dir, calls = slurm_bin
    cfg = write_sweep_config(tmp_path, hamlet_data, lr=[1.0e-3, -3.0e-3])
    check = run_sweep_cli(str(cfg), "--check")
    assert check.returncode == 1 and check.stdout == ""
    assert check.stderr.strip() == "train.py: error: job 1 (lr=-0.003): config key 'lr' must not be negative, got -0.003"
    result = subprocess.run(["bash", os.path.join(ROOT, "slurm.sh"), str(cfg)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env=slurm_env(bin_dir))
    assert result.returncode == 1 and result.stderr.strip() == check.stderr.strip()
    assert calls_of(calls, "sbatch") == [] and not (tmp_path / "slurm_logs").exists()
    good = write_sweep_config(tmp_path, hamlet_data)
    assert run_sweep_cli(str(good), "--check").stdout == f"2 job(s) of {good}: every config is valid\n"


def test_slurm_refuses_a_request_no_node_can_run_before_submitting(hamlet_data, slurm_bin, tmp_path):
    """GPUS_PER_NODE=0 alone is a CPU job with 2 cores; when SLURM answers --test-only with a
    refusal (here: nodes too small), slurm.sh says so in one line instead of submitting a job that
    would pend forever."""
    bin_dir, calls = slurm_bin
    cfg = write_sweep_config(tmp_path, hamlet_data)
    env = slurm_env(bin_dir, STANDIN_SBATCH_REFUSE="Requested node configuration is not available")
    del env["CPUS_PER_PROC"]
    result = subprocess.run(["bash", os.path.join(ROOT, "slurm.sh"), str(cfg)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, env=env)
    assert result.returncode == 1 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("slurm.sh: error: SLURM cannot run this job as asked (GPUS_PER_NODE=0, CPUS_PER_PROC=2,")
    assert "Requested node configuration is not available" in line
    (check,) = calls_of(calls, "sbatch")
    assert check["args"][0] == "--test-only" and "--cpus-per-task=2" in check["args"]
    assert not any("gpu" in a for a in check["args"] if a.startswith("--"))  # options, not paths
    assert not (tmp_path / "slurm_logs").exists()


def test_slurm_without_sbatch_says_so_in_one_line(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    result = subprocess.run([shutil.which("bash"), os.path.join(ROOT, "slurm.sh"), "sweep.yaml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60, env=dict(os.environ, PATH=str(bin_dir)))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("slurm.sh: error: sbatch not found") and result.stderr.count("\n") == 1
    assert not (tmp_path / "slurm_logs").exists()


def start_array_task(bin_dir, tmp_path, cfg, task, **extra):
    """slurm.sh as SLURM starts it for one array task (what sbatch runs)."""
    env = slurm_env(bin_dir, **{"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_JOB_ID": "77", "SLURM_JOB_ID": str(78 + task),
                                "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_JOB_NUM_NODES": "1", "SLURM_CPUS_PER_TASK": "1",
                                "SLURM_JOB_NODELIST": "localhost", "PLAINLM_DIR": ROOT, "WARN_SECONDS": "120", **extra})
    with open(tmp_path / f"task{task}.log", "a") as log:
        proc = subprocess.Popen(["bash", os.path.join(ROOT, "slurm.sh"), str(cfg)], cwd=tmp_path, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    STARTED.append(proc)
    return proc


STARTED = []


@pytest.fixture(autouse=True)
def no_leftover_jobs():
    """A failing test must not leave a job (bash, torchrun, workers) running behind it."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for_training(run_dir, min_steps, proc, timeout=240):
    """Block until metrics.jsonl shows min_steps logged steps (the run is really training)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the job ended before it could be interrupted"
        path = os.path.join(run_dir, "metrics.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                if sum(1 for _ in f) >= min_steps:
                    return
        time.sleep(0.05)
    raise AssertionError(f"no progress in {run_dir}")


def test_warning_signal_checkpoints_requeues_and_resumes_exactly(submitted_sweep, hamlet_data, slurm_bin, tmp_path):
    """USR1 before the time limit: the job saves, requeues itself; its next start resumes, and
    ends exactly where the uninterrupted job of the submitted sweep ended."""
    bin_dir, calls = slurm_bin
    sweep_dir, _, _, _ = submitted_sweep
    cfg = write_sweep_config(tmp_path, hamlet_data)  # the same sweep, in another folder
    run_dir = tmp_path / "runs" / "sweep" / "job1"

    proc = start_array_task(bin_dir, tmp_path, cfg, task=1)
    wait_for_training(run_dir, 20, proc)
    proc.send_signal(signal.SIGUSR1)  # what `sbatch --signal=B:USR1@...` does
    assert proc.wait(timeout=120) == 0, (tmp_path / "task1.log").read_text()
    log = (tmp_path / "task1.log").read_text()
    assert "requeueing it to resume" in log and "SIGUSR1: saved a checkpoint at step" in log, log
    assert "Traceback" not in log and "failed" not in log, log
    assert [c["args"] for c in calls_of(calls, "scontrol")] == [["requeue", "77_1"]]
    stopped_at = final_checkpoint(run_dir)["step"]
    assert 20 <= stopped_at < 200, log

    proc = start_array_task(bin_dir, tmp_path, cfg, task=1, SLURM_RESTART_COUNT="1")  # the requeued job
    assert proc.wait(timeout=240) == 0, (tmp_path / "task1.log").read_text()
    assert f"resumed from {run_dir}" in (tmp_path / "task1.log").read_text()
    assert len(calls_of(calls, "scontrol")) == 1  # finished: no second requeue

    reference = sweep_dir / "runs" / "sweep" / "job1"
    ours, theirs = final_checkpoint(run_dir), final_checkpoint(reference)
    assert ours["step"] == theirs["step"] == 200
    assert ours["model"].keys() == theirs["model"].keys()
    assert all(torch.equal(ours["model"][k], theirs["model"][k]) for k in ours["model"])
    assert train_losses(run_dir) == train_losses(reference)


def test_sigterm_to_the_whole_job_is_a_clean_stop_without_requeue(hamlet_data, slurm_bin, tmp_path):
    """scancel, preemption and the time limit send SIGTERM to every process of the job: the
    training saves and exits 75, and slurm.sh reports a stop, not a failure, and does not requeue."""
    bin_dir, calls = slurm_bin
    cfg = write_sweep_config(tmp_path, hamlet_data)
    proc = start_array_task(bin_dir, tmp_path, cfg, task=0)
    wait_for_training(tmp_path / "runs" / "sweep" / "job0", 10, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    log = (tmp_path / "task0.log").read_text()
    assert "SIGTERM: saved a checkpoint at step" in log and "task 77_0 stopped after saving a checkpoint (SIGTERM" in log
    assert "Traceback" not in log and "failed" not in log, log
    assert calls_of(calls, "scontrol") == []
    assert 10 <= final_checkpoint(tmp_path / "runs" / "sweep" / "job0")["step"] < 200


def signal_when_ready(proc, ready, sig):
    deadline = time.time() + 60
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)


def test_a_crash_stays_a_failure_even_after_the_warning_signal(hamlet_data, slurm_bin, tmp_path):
    """USR1 came, but the training then crashed (exit 3, not 75): not requeued, the error stays.
    The "training" is a shell function (ENV_SETUP defines it) that crashes when signalled."""
    bin_dir, calls = slurm_bin
    cfg = write_sweep_config(tmp_path, hamlet_data)
    ready = tmp_path / "ready"
    crash = f"python() {{ trap 'echo crashing; kill $!; exit 3' USR1; touch {ready}; sleep 60 & wait; }}"
    proc = start_array_task(bin_dir, tmp_path, cfg, task=0, ENV_SETUP=crash)
    signal_when_ready(proc, ready, signal.SIGUSR1)
    assert proc.wait(timeout=60) == 3
    log = (tmp_path / "task0.log").read_text()
    assert "got SIGUSR1" in log and "crashing" in log and "task 77_0 failed (exit 3)" in log, log
    assert calls_of(calls, "scontrol") == []


def test_warning_signal_before_the_training_starts_requeues_without_training(hamlet_data, slurm_bin, tmp_path):
    bin_dir, calls = slurm_bin
    cfg = write_sweep_config(tmp_path, hamlet_data)
    ready = tmp_path / "ready"
    proc = start_array_task(bin_dir, tmp_path, cfg, task=0, ENV_SETUP=f"touch {ready}; sleep 2")
    signal_when_ready(proc, ready, signal.SIGUSR1)  # arrives while ENV_SETUP runs
    assert proc.wait(timeout=60) == 0
    assert "got SIGUSR1 before the training started: requeueing it" in (tmp_path / "task0.log").read_text()
    assert [c["args"] for c in calls_of(calls, "scontrol")] == [["requeue", "77_0"]]
    assert training_threads(tmp_path) == []  # train.py never started


def test_warning_signal_while_the_training_starts_up_requeues(hamlet_data, slurm_bin, tmp_path):
    """USR1 kills a python that has not yet set its handlers (exit 138): no checkpoint was
    written, so the task requeues to resume from the previous one; it is no crash."""
    bin_dir, calls = slurm_bin
    cfg = write_sweep_config(tmp_path, hamlet_data)
    ready = tmp_path / "ready"
    proc = start_array_task(bin_dir, tmp_path, cfg, task=0, ENV_SETUP=f"python() {{ touch {ready}; exec sleep 60; }}")
    signal_when_ready(proc, ready, signal.SIGUSR1)
    assert proc.wait(timeout=60) == 0
    assert "got SIGUSR1 while the training was starting up: requeueing it" in (tmp_path / "task0.log").read_text()
    assert [c["args"] for c in calls_of(calls, "scontrol")] == [["requeue", "77_0"]]


def free_port_from(low):
    for port in random.Random().sample(range(low, low + 20000), 200):
        with socket.socket() as s:
            with contextlib.suppress(OSError):
                s.bind(("127.0.0.1", port))
                return port
    raise AssertionError("no free port")


def test_multi_node_job_runs_one_srun_task_per_process(hamlet_data, slurm_bin, tmp_path):
    """NODES=2: srun starts one training process per node (GPUS_PER_NODE=0: one CPU process),
    which find each other through MASTER_ADDR/MASTER_PORT set by slurm.sh."""
    bin_dir, calls = slurm_bin
    cfg = write_sweep_config(tmp_path, hamlet_data, steps=10, micro_batch_size=4)
    port = free_port_from(20000)  # slurm.sh derives MASTER_PORT = 20000 + job id % 20000
    proc = start_array_task(bin_dir, tmp_path, cfg, task=0, NODES="2", SLURM_JOB_NUM_NODES="2",
                            SLURM_JOB_ID=str(port - 20000))
    assert proc.wait(timeout=240) == 0, (tmp_path / "task0.log").read_text()
    (srun,) = calls_of(calls, "srun")
    assert "--nodes=2" in srun["args"] and "--ntasks-per-node=1" in srun["args"] and "--cpus-per-task=1" in srun["args"]
    assert training_threads(tmp_path) == ["1", "1"]  # each rank: the cores of its task
    assert "2 process(es) on cpu" in (tmp_path / "task0.log").read_text()
    assert final_checkpoint(tmp_path / "runs" / "sweep" / "job0")["step"] == 10


# ---------------------------------------------------------------------------------------------
# HTCondor: no condor here, so read condor.sub the way condor_submit would and run job 1's command

def read_submit_file(path, **macros):
    """condor.sub's commands with $(name) macros expanded (names are case-insensitive)."""
    commands = {}
    for line in open(path):
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            commands[key.strip().lower()] = value.strip()
    assert not any(key.startswith("queue") for key in commands), "the job count comes from -queue N"
    lookup = {k.lower(): str(v) for k, v in macros.items()}
    return {key: re.sub(r"\$\((\w+)\)", lambda m: lookup.get(m.group(1).lower(), m.group(0)), value)
            for key, value in commands.items()}


def test_condor_submit_file_runs_job_process_n_and_reruns_only_stopped_jobs(hamlet_data, tmp_path):
    cfg = write_sweep_config(tmp_path, hamlet_data, steps=10)
    sub = read_submit_file(os.path.join(ROOT, "condor.sub"), cfg=cfg, Process=1, Cluster=5)
    assert sub["kill_sig"] == "SIGTERM" and sub["getenv"].lower() == "true"
    arguments = sub["arguments"]
    assert arguments.startswith('"') and arguments.endswith('"')  # condor's new argument syntax
    command = [sub["executable"], *shlex.split(arguments[1:-1])]
    assert command[1:] == ["python", "train.py", str(cfg), "--job_idx", "1"]

    # on_exit_remove: exit 75 (stopped after a checkpoint) stays in the queue; 0 or a crash leave.
    expression = sub["on_exit_remove"].replace("&&", " and ").replace("||", " or ")
    def removed(code, by_signal=False):
        return eval(expression, {}, {"ExitCode": code, "ExitBySignal": by_signal, "True": True, "False": False})
    assert not removed(75) and removed(0) and removed(1) and removed(None, by_signal=True)

    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)  # initialdir: repo
    assert result.returncode == 0, result.stdout + result.stderr
    ckpt = final_checkpoint(tmp_path / "runs" / "sweep" / "job1")
    assert ckpt["step"] == 10 and ckpt["config"]["lr"] == 3e-3


def test_submit_scripts_have_no_personal_paths():
    for name in ("slurm.sh", "condor.sub"):
        text = open(os.path.join(ROOT, name)).read()
        assert not re.search(r"/home/|/Users/|/scratch/|/work/|~/", text), name
