"""plot.py on real runs of train.py: a 3-job lr sweep with one job finished, one stopped by SIGTERM,
one diverged; statuses, table order and numbers, PNG and CSV output, damaged and live runs, errors."""
import csv
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import time

import pytest

import plot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

SWEEP = """\
data_dir: {data}
out_dir: {out}
exp_name: lrs
d_model: 32
n_layers: 1
n_heads: 2
seq_len: 32
batch_size: 4
micro_batch_size: 4
steps: 30
warmup_steps: 3
grad_clip: 0.0
log_every: 5
eval_every: 3       # not a multiple of log_every: an eval between log lines records a NaN val loss
eval_tokens: 512
save_every: 10
device: cpu
lr: [3.0e-3, 3.0e-2, 1.0e+3]
"""

# Runs train.py with a real SIGTERM sent to itself after a chosen optimizer step, so the stop
# lands mid-run at the same step every time (the tiny model trains too fast to race a signal).
STOP_AFTER = """\
import os, signal, sys
sys.path.insert(0, {root!r})
import train
real_step, calls = train.train_step, []
def step(*args, **kwargs):
    out = real_step(*args, **kwargs)
    calls.append(1)
    if len(calls) == {n}:
        os.kill(os.getpid(), signal.SIGTERM)
    return out
train.train_step = step
sys.exit(train.main(sys.argv[1:]))
"""
STOP_STEP = 13  # between a checkpoint (10) and the next log line (15)


def age(path, seconds=3600):
    """Make a run look as if its process ended `seconds` ago."""
    for name in os.listdir(path):
        t = time.time() - seconds
        os.utime(os.path.join(path, name), (t, t))


@pytest.fixture(scope="module")
def sweep(hamlet_data, tmp_path_factory):
    base = tmp_path_factory.mktemp("plot")
    cfg = base / "lrs.yaml"
    cfg.write_text(SWEEP.format(data=hamlet_data, out=base / "runs"))
    wrapper = base / "stop_after.py"
    wrapper.write_text(STOP_AFTER.format(root=ROOT, n=STOP_STEP))
    train_py = os.path.join(ROOT, "train.py")
    results = [subprocess.run([sys.executable, str(wrapper), str(cfg), "--job_idx", "0"], cwd=ROOT, env=ENV,
                              capture_output=True, text=True),
               subprocess.run([sys.executable, train_py, str(cfg), "--job_idx", "1"], cwd=ROOT, env=ENV,
                              capture_output=True, text=True),
               subprocess.run([sys.executable, train_py, str(cfg), "--job_idx", "2"], cwd=ROOT, env=ENV,
                              capture_output=True, text=True)]
    assert results[0].returncode == 75 and f"SIGTERM: saved a checkpoint at step {STOP_STEP}" in results[0].stdout, results[0]
    assert results[1].returncode == 0, results[1].stderr
    assert results[2].returncode == 1 and "train.py: error: loss is nan" in results[2].stderr, results[2]
    sweep_dir = base / "runs" / "lrs"
    for job in ("job0", "job1", "job2"):
        age(sweep_dir / job)
    return sweep_dir


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def last_val(run_dir):
    return [r["val_loss"] for r in records(run_dir) if "val_loss" in r][-1]


def table(text):
    """The printed table as a list of dicts (keyed by header), in printed order."""
    lines = [line for line in text.splitlines() if line and not line.startswith("wrote ")]
    header = ["best"] + lines[0].replace("best val", "best_val").replace("final val", "final_val").split()
    rows = []
    for line in lines[1:]:
        cells = line.replace("not started", "not_started").split()
        rows.append(dict(zip(header, cells if cells[0] == "*" else [""] + cells)))
    return rows


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "plot.py"), *map(str, args)], capture_output=True,
                          text=True, env=env or ENV)


@pytest.fixture(scope="module")
def default_output(sweep, tmp_path_factory):
    """plot.py on the sweep folder with its defaults, plus --csv: (stdout, csv path)."""
    out = tmp_path_factory.mktemp("out")
    result = run_cli(sweep, "--csv", out / "table.csv")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    return result.stdout, out / "table.csv"


def test_table_statuses_order_and_numbers(sweep, default_output):
    rows = table(default_output[0])
    status = {row["run"]: row["status"] for row in rows}
    assert status == {"job0": "stopped", "job1": "finished", "job2": "diverged"}
    finals = {job: last_val(sweep / job) for job in ("job0", "job1", "job2")}
    assert math.isnan(finals["job2"]) and not math.isnan(finals["job0"] + finals["job1"])
    expected_order = sorted(finals, key=lambda job: (math.isnan(finals[job]), finals[job]))
    assert [row["run"] for row in rows] == expected_order
    assert [row["best"] for row in rows] == ["*", "", ""]
    for row in rows:
        job = sweep / row["run"]
        assert row["final_val"] == f"{finals[row['run']]:.4f}"
        vals = [r["val_loss"] for r in records(job) if "val_loss" in r and math.isfinite(r["val_loss"])]
        assert row["best_val"] == f"{min(vals):.4f}"
    # The differing key labels the rows; the step column shows how far each job got of its 30 steps.
    assert {row["run"]: row["lr"] for row in rows} == {"job0": "0.003", "job1": "0.03", "job2": "1000"}
    steps = {row["run"]: row["step"] for row in rows}
    assert steps["job1"] == "30/30" and steps["job0"] == f"{STOP_STEP}/30"
    assert steps["job2"] == f"{records(sweep / 'job2')[-1]['step']}/30"


def test_csv_has_the_same_rows_with_raw_numbers(sweep, default_output):
    with open(default_output[1]) as f:
        rows = list(csv.DictReader(f))
    printed = table(default_output[0])
    assert [r["run"] for r in rows] == [r["run"] for r in printed]
    assert [r["status"] for r in rows] == [r["status"] for r in printed]
    for row in rows:
        final = last_val(sweep / row["run"])
        assert float(row["final_val_loss"]) == final or (math.isnan(final) and math.isnan(float(row["final_val_loss"])))
        assert int(row["steps"]) == 30 and float(row["lr"]) > 0
    assert rows[0]["best"] == "*" and int(rows[0]["tokens"]) == 30 * 4 * 32


def test_pngs_are_real_images(sweep, default_output):
    assert f"wrote {sweep / 'plot.png'}" in default_output[0]
    for name in ("plot.png", "plot_lr.png"):  # curves, and final val loss vs lr (the one numeric axis)
        width, height = png_size(sweep / name)
        assert width >= 400 and height >= 300, (name, width, height)
        assert os.path.getsize(sweep / name) > 10_000


@pytest.mark.parametrize("flags", [["--x", "tokens", "--log"], ["--x", "time", "--smooth", "0.5"]])
def test_other_axes_and_options_draw(sweep, tmp_path, flags, capsys):
    assert plot.main([str(sweep), "--out", str(tmp_path / "p.png")] + flags) == 0
    assert png_size(tmp_path / "p.png")[0] >= 400 and (tmp_path / "p_lr.png").exists()


def test_time_axis_sums_step_ms():
    run = plot.Run("r", {"batch_size": 2, "seq_len": 8, "steps": 20}, [
        {"step": 5, "step_ms": 100.0, "train_loss": 3.0}, {"step": 6, "val_loss": 3.0},
        {"step": 10, "step_ms": 300.0, "train_loss": 2.0}], [], 0.0)
    assert plot.x_values(run, run.records, "time") == pytest.approx([0.5, 0.8, 2.0])
    assert plot.x_values(run, run.records, "tokens") == [80, 96, 160]


def test_ema_is_bias_corrected_and_zero_is_off():
    assert plot.ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    assert plot.ema([1.0, 3.0], 0.5) == pytest.approx([1.0, (0.25 + 1.5) / 0.75])  # 0.5*0.5 + 0.5*3, debiased
    assert plot.ema([1.0, 5.0, 2.0], 0) == [1.0, 5.0, 2.0]
    # --smooth auto: about a tenth of the run's records; nothing for a handful, at most 0.9.
    assert plot.auto_smooth(6) == 0 and plot.auto_smooth(15) == pytest.approx(1 / 3) and plot.auto_smooth(10_000) == 0.9


def copy_run(src, dst, drop=()):
    shutil.copytree(src, dst)
    for name in drop:
        os.remove(os.path.join(dst, name))
    return dst


def test_live_killed_and_early_runs(sweep, tmp_path, capsys):
    stopped = sweep / "job0"
    live = copy_run(stopped, tmp_path / "live")
    with open(live / "metrics.jsonl", "a") as f:  # train.py in the middle of writing a line
        f.write('{"step": 15, "tokens": 1920, "lr": 0.00')
    killed = copy_run(stopped, tmp_path / "killed", drop=[f"ckpt_{STOP_STEP:07d}.pt"])  # metrics past the newest checkpoint
    early = copy_run(stopped, tmp_path / "early", drop=[n for n in os.listdir(stopped) if n != "config.yaml"])
    age(killed)
    age(early)
    assert plot.main([str(tmp_path), "--no_plot"]) == 0
    out, err = capsys.readouterr()
    rows = {row["run"]: row for row in table(out)}
    assert err == ""  # a half-written last line is expected, not worth a warning
    assert {name: row["status"] for name, row in rows.items()} == {"live": "running", "killed": "failed", "early": "failed"}
    assert rows["live"]["final_val"] == f"{last_val(stopped):.4f}"
    assert rows["killed"]["step"] == f"{records(stopped)[-1]['step']}/30" and rows["early"]["step"] == "0/30"
    # Identical configs: labelled by folder name; once the live run's files are old, it is a stopped run.
    runs, keys, _ = plot.load_runs([str(tmp_path)], plot.RUNNING_WINDOW_S)
    assert keys == [] and sorted(r.label for r in runs) == ["early", "killed", "live"]
    age(live)
    runs, _, _ = plot.load_runs([str(tmp_path)], plot.RUNNING_WINDOW_S)
    assert {r.name: r.status for r in runs}["live"] == "stopped"


def test_bad_line_in_the_middle_warns_and_missing_job_is_not_started(sweep, tmp_path, capsys):
    copy_run(sweep / "job0", tmp_path / "lrs" / "job0")
    copy_run(sweep / "job2", tmp_path / "lrs" / "job2")
    lines = (tmp_path / "lrs" / "job0" / "metrics.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "lrs" / "job0" / "metrics.jsonl").write_text("".join(lines[:2] + ["{oops\n"] + lines[2:]))
    age(tmp_path / "lrs" / "job0")
    assert plot.main([str(tmp_path / "lrs"), "--no_plot"]) == 0
    out, err = capsys.readouterr()
    assert "warning: skipped 1 unreadable line(s)" in err and "(line 3)" in err
    rows = {row["run"]: row for row in table(out)}
    assert rows["job1"]["status"] == "not_started"  # job1's folder was never created
    assert rows["job0"]["status"] == "stopped" and rows["job0"]["final_val"] == f"{last_val(sweep / 'job0'):.4f}"


def test_missing_matplotlib_is_one_line_and_no_plot_still_works(sweep, tmp_path):
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['matplotlib'] = None  # as if not installed\n")
    env = dict(ENV, PYTHONPATH=str(tmp_path))
    result = run_cli(sweep, "--out", tmp_path / "x.png", env=env)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("plot.py: error: ")
    assert "pip install matplotlib" in result.stderr and not (tmp_path / "x.png").exists()
    result = run_cli(sweep, "--no_plot", env=env)
    assert result.returncode == 0 and result.stdout == run_cli(sweep, "--no_plot").stdout


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "nowhere", "does not exist"),
    (lambda tmp: tmp, "no runs in"),
])
def test_bad_paths_are_one_clear_line(tmp_path, make, message):
    (tmp_path / "some_folder").mkdir()
    result = run_cli(make(tmp_path))
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("plot.py: error: ") and message in result.stderr


def test_help_names_every_option_and_status():
    result = run_cli("--help")
    assert result.returncode == 0
    for word in ("--out", "--x", "--smooth", "--log", "--csv", "--no_plot", "--running_window",
                 "finished", "diverged", "running", "stopped", "failed", "not started"):
        assert word in result.stdout, word
