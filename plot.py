"""Loss curves and a summary table for runs and sweeps, from the files train.py writes.

    python plot.py runs/shakespeare_char                   # one run: plot.png in that folder + table
    python plot.py runs/lr_sweep                           # every job of a sweep, overlaid
    python plot.py runs/a runs/b --x tokens --log --out cmp.png
    python plot.py runs/lr_sweep --no_plot --csv lr_sweep.csv   # table only (no matplotlib needed)

A run folder is any folder with a config.yaml; each path given may be a run folder or a folder
above runs (a sweep folder `<out_dir>/<exp_name>` with job0, job1, ..., or `out_dir` itself),
searched two levels down. Folders that train.py --overwrite moved aside (`*.old-<date>`) are
skipped unless named directly. From each run, plot.py reads config.yaml, metrics.jsonl (an
unreadable line, such as a half-written last line of a run that is being written or was killed,
is skipped) and the names of its checkpoints `ckpt_<step>.pt` (never their contents).

Runs are labelled by the config keys whose values differ between them (job_idx, out_dir, resume,
wandb and wandb_project are not counted; the legend names the four with the most distinct values,
the table all of them),
or by folder name when their configs are the same.

The figure: train loss (EMA-smoothed, `--smooth`, raw curve faint; by default the factor is
1 - 10/n for the run with the most train-loss records n, within [0, 0.9], so the EMA averages over
about a tenth of the run whether it logged 15 or 15,000 times) and val loss against steps,
tokens (step x batch_size x seq_len) or training time (`--x time`: the sum of step_ms over the
logged steps, so evaluation and checkpoint time are left out), and small panels with the learning
rate, tokens/s and gradient norm. An X marks where a run recorded a non-finite loss. When the runs
differ in a numeric key (lr if it is one of them), a second figure `<out>_<key>.png` shows the
final val loss against that key (log x when the values span 10x or more; one line per value of
the other differing keys; hollow markers: runs that have not finished).

The table has one row per run, sorted by final val loss (the last val_loss recorded, so for an
unfinished run its latest one), best first and marked `*`; runs without a finite one come last.
tokens: trained so far (last step x batch_size x seq_len); tok/s: the median of the logged values.

Status of a run, decided in this order from what train.py leaves behind (it writes config.yaml
when it starts, a metrics line every log_every steps and at the last step, val_loss at eval steps
and the last step, and checkpoints every save_every steps, at the last step, and at the step it
stops at on SIGTERM/SIGUSR1/SIGINT before it exits with code 75; on a non-finite train loss it
exits with an error *before* recording that loss, keeping the last good checkpoint):
  finished     a record or a checkpoint at config `steps`
  diverged     a non-finite train_loss or val_loss was recorded (an evaluation between two log
               lines can record val_loss NaN just before train.py stops on the NaN train loss)
  running      a file of the run changed within the last max(--running_window (120 s), 3 x
               step_ms x log_every) seconds; a run that died in that window shows as running
               until it has passed
  stopped      has a checkpoint at or after its last recorded step: what a stop by a signal
               leaves (or a kill just after a checkpoint). Running the same command continues it;
               under slurm.sh / condor.sub it is waiting to be requeued
  failed       ended without that checkpoint: metrics go past the newest checkpoint, or there is
               none. An error (train.py's non-finite loss check, out of memory, a crash) or a hard
               kill. A folder with only config.yaml is a run that died before its first log line.
               Blind spot: a run that fails within the first log interval after a checkpoint
               leaves the same files as a stopped run, and is shown as stopped
  not started  a job number missing from a sweep folder below the highest job present (train.py
               creates a job's folder when the job starts; jobs after the highest one present
               cannot be seen, since the sweep file is not stored with the runs)

matplotlib is needed for the figures only (`pip install matplotlib`); --no_plot does without it.
"""
import argparse
import csv
import glob
import json
import math
import os
import re
import statistics
import sys
import time

import yaml

IGNORED_KEYS = {"job_idx", "out_dir", "resume", "wandb", "wandb_project"}  # never the difference that matters
RUNNING_WINDOW_S = 120


def fail(msg):
    raise SystemExit(f"plot.py: error: {msg}")


def warn(msg):
    print(f"plot.py: warning: {msg}", file=sys.stderr)


def natural_key(text):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def finite(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# -----------------------------------------------------------------------------
# Reading runs.

def find_run_dirs(path):
    """Run folders (with a config.yaml) at `path` or up to two levels below it."""
    if not os.path.exists(path):
        fail(f"'{path}' does not exist")
    if os.path.isfile(path):
        if os.path.basename(path) in ("config.yaml", "metrics.jsonl"):
            return [os.path.dirname(path) or "."]
        fail(f"'{path}' is a file: give a run folder (with config.yaml) or a folder of runs")
    if os.path.isfile(os.path.join(path, "config.yaml")):
        return [path]
    found = []
    for child in sorted(glob.glob(os.path.join(path, "*", "")), key=natural_key):
        child = child.rstrip(os.sep)
        if ".old-" in os.path.basename(child):
            continue
        if os.path.isfile(os.path.join(child, "config.yaml")):
            found.append(child)
            continue
        for grandchild in sorted(glob.glob(os.path.join(child, "*", "")), key=natural_key):
            grandchild = grandchild.rstrip(os.sep)
            if ".old-" not in os.path.basename(grandchild) and os.path.isfile(os.path.join(grandchild, "config.yaml")):
                found.append(grandchild)
    if not found:
        fail(f"no runs in '{path}': a run folder holds the config.yaml that train.py writes "
             f"(searched '{path}' and two levels below it)")
    return found


def read_metrics(path):
    """The records of metrics.jsonl; lines that do not parse (a half-written last line) are skipped."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line for line in f.read().split("\n") if line.strip()]
    records, bad = [], []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)  # NaN and Infinity parse to float('nan') / float('inf')
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            bad.append(i + 1)
    if bad and bad != [len(lines)]:  # a bad last line is normal for a run being written or killed
        warn(f"skipped {len(bad)} unreadable line(s) of {path} (line {', '.join(map(str, bad[:5]))})")
    records.sort(key=lambda r: r["step"])
    return records


class Run:
    def __init__(self, path, cfg, records, ckpt_steps, mtime):
        self.path, self.cfg, self.records, self.ckpt_steps, self.mtime = path, cfg, records, ckpt_steps, mtime
        self.steps = cfg.get("steps")
        self.last_record_step = records[-1]["step"] if records else 0
        self.last_step = max([self.last_record_step] + ckpt_steps)  # a stop by a signal saves past the last record
        vals = [r["val_loss"] for r in records if "val_loss" in r]
        self.final_val = vals[-1] if vals else None
        finite_vals = [v for v in vals if finite(v)]
        self.best_val = min(finite_vals) if finite_vals else None
        rates = [r["tokens_per_s"] for r in records if finite(r.get("tokens_per_s"))]
        self.tokens_per_s = statistics.median(rates) if rates else None
        self.tokens = self.last_step * self.tokens_per_step() if self.tokens_per_step() else None
        self.name = self.label = self.status = None

    def tokens_per_step(self):
        batch, seq = self.cfg.get("batch_size"), self.cfg.get("seq_len")
        return batch * seq if isinstance(batch, int) and isinstance(seq, int) else None

    def non_finite_step(self):
        for r in self.records:
            if any(key in r and not finite(r[key]) for key in ("train_loss", "val_loss")):
                return r["step"]
        return None


def read_run(path):
    config_path = os.path.join(path, "config.yaml")
    try:
        with open(config_path) as f:
            cfg = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        warn(f"skipping '{path}': cannot read its config.yaml ({str(e).splitlines()[0]})")
        return None
    if not isinstance(cfg, dict):
        warn(f"skipping '{path}': its config.yaml is not a mapping of key: value")
        return None
    metrics_path = os.path.join(path, "metrics.jsonl")
    records = read_metrics(metrics_path)
    ckpts = glob.glob(os.path.join(path, "ckpt_*.pt")) + glob.glob(os.path.join(path, "ckpt_*.dcp"))  # file or sharded folder
    ckpt_steps = sorted(int(m.group(1)) for m in (re.fullmatch(r"ckpt_(\d+)\.(pt|dcp)", os.path.basename(p)) for p in ckpts) if m)
    mtime = 0.0
    for p in [config_path, metrics_path] + ckpts + glob.glob(os.path.join(path, "ckpt_*.tmp-*")):
        try:
            mtime = max(mtime, os.path.getmtime(p))
        except OSError:
            pass  # removed meanwhile (an old checkpoint rotated out)
    return Run(path, cfg, records, ckpt_steps, mtime)


def status_of(run, running_window, now):
    """See the module docstring for these rules."""
    steps = run.steps if isinstance(run.steps, int) else None
    if steps is not None and (run.last_step >= steps or steps in run.ckpt_steps):
        return "finished"
    if run.non_finite_step() is not None:
        return "diverged"
    window = running_window
    logged = [r for r in run.records if finite(r.get("step_ms"))]
    if logged and isinstance(run.cfg.get("log_every"), int):
        window = max(window, 3 * logged[-1]["step_ms"] / 1000 * run.cfg["log_every"])
    if now - run.mtime < window:
        return "running"
    if run.ckpt_steps and max(run.ckpt_steps) >= run.last_record_step:
        return "stopped"
    return "failed"


def differing_keys(cfgs):
    keys = []
    for cfg in cfgs:
        keys += [k for k in cfg if k not in keys and k not in IGNORED_KEYS]
    return [k for k in keys if len({json.dumps(cfg.get(k), sort_keys=True, default=str) for cfg in cfgs}) > 1]


def describe(cfg, keys, most=4):
    """'lr=0.003, n_layers=4' for a legend: the first `most` keys (the table shows them all)."""
    text = ", ".join(f"{k}={fmt_value(cfg.get(k))}" for k in keys[:most])
    return text + (f", ... (+{len(keys) - most} keys)" if len(keys) > most else "")


def fmt_value(value):
    if isinstance(value, float):
        return f"{value:g}"
    return "null" if value is None else str(value)


def load_runs(paths, running_window, now=None):
    now = time.time() if now is None else now
    run_dirs = []
    for path in paths:
        for d in find_run_dirs(path):
            if os.path.realpath(d) not in {os.path.realpath(r) for r in run_dirs}:
                run_dirs.append(d)
    runs = [run for run in map(read_run, run_dirs) if run is not None]
    if not runs:
        fail(f"no readable runs in {', '.join(repr(p) for p in paths)}")
    common = os.path.commonpath([os.path.abspath(r.path) for r in runs])
    for run in runs:
        rel = os.path.relpath(os.path.abspath(run.path), common)
        run.name = os.path.basename(os.path.abspath(run.path)) if rel == "." else rel
        run.status = status_of(run, running_window, now)
    runs.sort(key=lambda r: natural_key(r.name))
    keys = differing_keys([r.cfg for r in runs])
    distinct = {k: len({fmt_value(r.cfg.get(k)) for r in runs}) for k in keys}
    by_spread = sorted(keys, key=lambda k: -distinct[k])  # the keys that tell most runs apart go first
    for run in runs:
        run.label = describe(run.cfg, by_spread) if keys else run.name
    return runs, keys, missing_jobs(runs, common)


def missing_jobs(runs, common):
    """Names of sweep job folders absent below the highest job number present in the same folder."""
    present = {}
    for run in runs:
        idx, parent = run.cfg.get("job_idx"), os.path.dirname(os.path.abspath(run.path))
        if isinstance(idx, int) and os.path.basename(run.path.rstrip(os.sep)) == f"job{idx}":
            present.setdefault(parent, set()).add(idx)
    missing = []
    for parent, idxs in present.items():
        for i in sorted(set(range(max(idxs) + 1)) - idxs):
            missing.append(os.path.relpath(os.path.join(parent, f"job{i}"), common))
    return missing


# -----------------------------------------------------------------------------
# The table.

def sort_key(run):
    return (0, run.final_val, natural_key(run.name)) if finite(run.final_val) else (1, 0.0, natural_key(run.name))


def fmt_count(n):
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def table_rows(runs, keys, missing):
    """(header, rows of cells for the terminal, rows of raw values for CSV), best run first."""
    ranked = sorted(runs, key=sort_key)
    best = ranked[0] if ranked and finite(ranked[0].final_val) else None
    header = ["", "run"] + keys + ["status", "step", "best val", "final val", "tokens", "tok/s"]
    csv_header = ["best", "run", "path"] + keys + ["status", "last_step", "steps", "best_val_loss", "final_val_loss",
                                                   "tokens", "tokens_per_s"]
    shown, raw = [], []
    for run in ranked:
        mark = "*" if run is best else ""
        loss = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        shown.append([mark, run.name] + [fmt_value(run.cfg.get(k)) for k in keys] + [
            run.status, f"{run.last_step}/{run.steps}", loss(run.best_val), loss(run.final_val),
            "-" if run.tokens is None else fmt_count(run.tokens),
            "-" if run.tokens_per_s is None else f"{run.tokens_per_s:,.0f}"])
        raw.append([mark, run.name, run.path] + [fmt_value(run.cfg.get(k)) for k in keys] + [
            run.status, run.last_step, run.steps, run.best_val, run.final_val, run.tokens, run.tokens_per_s])
    for name in missing:
        shown.append(["", name] + ["-"] * len(keys) + ["not started", "-", "-", "-", "-", "-"])
        raw.append(["", name, ""] + [""] * len(keys) + ["not started"] + [""] * 6)
    return header, shown, csv_header, raw


def format_table(header, rows):
    widths = [max(len(str(cells[i])) for cells in [header] + rows) for i in range(len(header))]
    left = {0, 1} | {i for i, h in enumerate(header) if h == "status"}
    lines = []
    for cells in [header] + rows:
        lines.append("  ".join(str(c).ljust(w) if i in left else str(c).rjust(w)
                               for i, (c, w) in enumerate(zip(cells, widths))).rstrip())
    return "\n".join(lines)


def write_csv(path, header, rows):
    try:
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows([["" if v is None else v for v in row] for row in rows])
    except OSError as e:
        fail(f"cannot write '{path}': {e.strerror}")


# -----------------------------------------------------------------------------
# The figures.

def x_values(run, records, x):
    """x of each record: its step, tokens trained by then, or training seconds by then."""
    if x == "step":
        return [r["step"] for r in records]
    if x == "tokens":
        per_step = run.tokens_per_step() or 0
        return [r["step"] * per_step for r in records]
    # time: sum of step_ms over the logged intervals; records between log lines are interpolated.
    points, seconds, prev = [(0, 0.0)], 0.0, 0
    for r in run.records:
        if finite(r.get("step_ms")):
            seconds += r["step_ms"] / 1000 * (r["step"] - prev)
            points.append((r["step"], seconds))
            prev = r["step"]
    out = []
    for r in records:
        after = next((i for i, (s, _) in enumerate(points) if s >= r["step"]), None)
        if after is None:
            out.append(points[-1][1])
        elif points[after][0] == r["step"] or after == 0:
            out.append(points[after][1])
        else:
            (s0, t0), (s1, t1) = points[after - 1], points[after]
            out.append(t0 + (t1 - t0) * (r["step"] - s0) / (s1 - s0))
    return out


def auto_smooth(n_records):
    """EMA factor averaging over about n/10 records: none for a handful of records, 0.9 at most."""
    return min(0.9, max(0.0, 1 - 10 / n_records)) if n_records else 0.0


def ema(values, factor):
    """Bias-corrected exponential moving average (as TensorBoard's smoothing slider)."""
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = factor * avg + (1 - factor) * v
        out.append(avg / (1 - factor ** (i + 1)))
    return out


def series(run, key, x):
    records = [r for r in run.records if finite(r.get(key))]
    return x_values(run, records, x), [r[key] for r in records]


def colors_for(n, plt):
    if n <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(n)]
    if n <= 20:
        return [plt.get_cmap("tab20")(i) for i in range(n)]
    return [plt.get_cmap("viridis")(i / (n - 1)) for i in range(n)]


def import_pyplot():
    try:
        import matplotlib
    except ImportError:
        fail("plotting needs matplotlib, which is not installed: pip install matplotlib "
             "(or pass --no_plot for the table alone)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(runs, out, x, smooth, log_y, title):
    plt = import_pyplot()
    from matplotlib.lines import Line2D
    auto = smooth is None
    if auto:
        smooth = round(auto_smooth(max(len(series(r, "train_loss", "step")[1]) for r in runs)), 2)
    time_unit = None
    if x == "time":
        longest = max((max(x_values(r, r.records, "time"), default=0) for r in runs), default=0)
        time_unit = next((u for u, s in (("h", 3600), ("min", 60)) if longest >= 2 * s), "s")
    scale = {"h": 3600, "min": 60, "s": 1}.get(time_unit, 1)
    x_label = {"step": "step", "tokens": "tokens", "time": f"training time ({time_unit}; without eval and checkpoints)"}[x]

    fig = plt.figure(figsize=(12, 8), layout="constrained")
    grid = fig.add_gridspec(2, 3, height_ratios=[2.4, 1])
    ax_loss = fig.add_subplot(grid[0, :])
    panels = [(fig.add_subplot(grid[1, i]), key, name) for i, (key, name) in
              enumerate((("lr", "learning rate"), ("tokens_per_s", "tokens/s"), ("grad_norm", "grad norm")))]
    colors = colors_for(len(runs), plt)
    run_maxima, all_losses, crosses = [], [], []
    for run, color in zip(runs, colors):
        xs, ys = series(run, "train_loss", x)
        xs = [v / scale for v in xs]
        if ys:
            if smooth > 0:
                ax_loss.plot(xs, ys, color=color, lw=0.8, alpha=0.3)
                ax_loss.plot(xs, ema(ys, smooth), color=color, lw=1.8)
            else:
                ax_loss.plot(xs, ys, color=color, lw=1.5)
        vxs, vys = series(run, "val_loss", x)
        vxs = [v / scale for v in vxs]
        if vys:
            ax_loss.plot(vxs, vys, color=color, lw=1.3, ls="--", marker="o", ms=4)
        if ys or vys:
            run_maxima.append(max(ys + vys))
            all_losses += ys + vys
        bad_step = run.non_finite_step()
        if bad_step is not None:
            bad_x = x_values(run, [r for r in run.records if r["step"] == bad_step][:1], x)[0] / scale
            crosses.append((bad_x, vys[-1] if vys else ys[-1] if ys else None, color))
        for ax, key, _ in panels:
            pxs, pys = series(run, key, x)
            ax.plot([v / scale for v in pxs], pys, color=color, lw=1.2, marker="o" if len(pys) == 1 else None, ms=4)
    if all_losses:  # a run that blew up must not flatten everyone else's curve: cap at the median run's peak
        top, bottom = statistics.median(run_maxima), min(all_losses)
        pad = (top - bottom) * 0.05 or 0.05
        ax_loss.set_ylim(bottom - pad if not log_y else bottom * 0.97, top + pad if not log_y else top * 1.05)
    low, high = ax_loss.get_ylim()
    for bad_x, y, color in crosses:  # at the run's last finite loss, kept inside the axes
        y = high if y is None else min(max(y, low), high)
        ax_loss.plot([bad_x], [y], marker="X", ms=11, color=color, mec="black", ls="none", clip_on=False)
    if log_y:
        log_scale_y(ax_loss)
    ax_loss.set_ylabel("loss")
    ax_loss.set_xlabel(x_label)
    ax_loss.grid(alpha=0.3)
    train_text = (f"train loss, EMA {smooth:g}{' (auto)' if auto else ''} (faint: raw)" if smooth > 0
                  else "train loss (not smoothed)")
    handles = [Line2D([], [], color="black", lw=1.8, label=train_text),
               Line2D([], [], color="black", lw=1.3, ls="--", marker="o", ms=4, label="val loss")]
    if any(r.non_finite_step() is not None for r in runs):
        handles.append(Line2D([], [], color="gray", marker="X", ms=9, mec="black", ls="none", label="non-finite loss recorded"))
    handles += [Line2D([], [], color=c, lw=3, label=f"{r.label} ({r.status})") for r, c in zip(runs, colors)]
    outside = len(runs) > 6
    ax_loss.legend(handles=handles, fontsize=8, loc="upper left" if outside else "upper right",
                   bbox_to_anchor=(1.01, 1) if outside else None, ncol=2 if len(runs) > 24 else 1)
    for ax, key, name in panels:
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(x_label if x != "time" else f"time ({time_unit})", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        values = [v for r in runs for v in series(r, key, x)[1] if v > 0]
        if values and max(values) / min(values) > 100:  # e.g. one run's lr or grad norm far off the others
            ax.set_yscale("log")
    fig.suptitle(f"{title}: {train_text.split(' (')[0]}, val loss", fontsize=12)
    save(fig, out, plt)


def sensitivity_axis(runs, keys):
    """The numeric key to put on x of the final-val-loss plot, and the differing keys it does not determine."""
    numeric = [k for k in keys if all(finite(r.cfg.get(k)) for r in runs)]
    numeric = [k for k in numeric if len({r.cfg[k] for r in runs}) > 1]
    if not numeric:
        return None, []
    key = "lr" if "lr" in numeric else max(numeric, key=lambda k: len({r.cfg[k] for r in runs}))
    others = []
    for other in keys:
        if other == key:
            continue
        seen = {}
        for r in runs:  # zipped with the key (one value per key value): not a separate line
            seen.setdefault(r.cfg[key], set()).add(fmt_value(r.cfg.get(other)))
        if any(len(v) > 1 for v in seen.values()):
            others.append(other)
    return key, others


def plot_sensitivity(runs, keys, out, log_y, title):
    """Final val loss against one numeric config key; None when there is no such key."""
    key, others = sensitivity_axis(runs, keys)
    points = [r for r in runs if finite(r.final_val)]
    if key is None or len({r.cfg[key] for r in points}) < 2:
        return None
    plt = import_pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    groups = {}
    for r in points:
        groups.setdefault(describe(r.cfg, others), []).append(r)
    colors = colors_for(len(groups), plt)
    best = min(points, key=lambda r: r.final_val)
    for (name, members), color in zip(sorted(groups.items(), key=lambda g: natural_key(g[0])), colors):
        members.sort(key=lambda r: r.cfg[key])
        xs, ys = [r.cfg[key] for r in members], [r.final_val for r in members]
        ax.plot(xs, ys, color=color, lw=1.3, label=name or None)
        for r in members:
            done = r.status == "finished"
            ax.plot([r.cfg[key]], [r.final_val], marker="o", ms=7, color=color, mfc=color if done else "white", mew=1.5)
    ax.plot([best.cfg[key]], [best.final_val], marker="*", ms=16, color="gold", mec="black", ls="none", label="best")
    values = [r.cfg[key] for r in points]
    if min(values) > 0 and max(values) / min(values) >= 10:
        ax.set_xscale("log")
    if log_y:
        log_scale_y(ax)
    ax.set_xlabel(key)
    ax.set_ylabel("final val loss")
    ax.grid(alpha=0.3, which="both")
    left_out = len(runs) - len(points)
    note = f"; {left_out} run(s) without a finite val loss left out" if left_out else ""
    ax.set_title(f"{title}: final val loss vs {key}\n(hollow: not finished, its latest val loss{note})", fontsize=10)
    ax.legend(fontsize=8)
    stem, ext = os.path.splitext(out)
    path = f"{stem}_{key}{ext or '.png'}"
    save(fig, path, plt)
    return path


def log_scale_y(ax):
    """Log y with plain numbers (2.5, 3) on the ticks: loss ranges rarely span a decade."""
    from matplotlib.ticker import FuncFormatter
    ax.set_yscale("log")
    for axis_set in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis_set(FuncFormatter(lambda v, _: f"{v:g}"))


def save(fig, path, plt):
    try:
        fig.savefig(path, dpi=100)
    except OSError as e:
        fail(f"cannot write '{path}': {e.strerror} (choose another place with --out)")
    finally:
        plt.close(fig)


# -----------------------------------------------------------------------------

def parse_args(argv):
    doc = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(
        prog="plot.py", description=doc[0] + "\n\n" + doc[1], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(doc[2:]))
    parser.add_argument("paths", nargs="+", metavar="RUN_OR_SWEEP_DIR",
                        help="run folders, sweep folders or out_dir folders, in any mix")
    parser.add_argument("--out", metavar="PNG", help="PNG to write (default: plot.png in the first folder given); the final-val-loss "
                                      "plot goes next to it as <name>_<key>.png")
    parser.add_argument("--x", choices=("step", "tokens", "time"), default="step",
                        help="x axis of the curves (default: step)")
    parser.add_argument("--smooth", default="auto", metavar="FACTOR",
                        help="EMA factor for the train loss, in [0, 1); 0 turns smoothing off (default: auto, "
                             "1 - 10/records within [0, 0.9]; the legend states the factor used)")
    parser.add_argument("--log", action="store_true", help="log-scale y axis for the losses")
    parser.add_argument("--csv", metavar="PATH", help="also write the table as CSV (raw numbers) to PATH")
    parser.add_argument("--no_plot", action="store_true", help="print the table only (matplotlib not needed)")
    parser.add_argument("--running_window", type=float, default=RUNNING_WINDOW_S, metavar="SECONDS",
                        help=f"a run whose files changed this recently counts as running (default: {RUNNING_WINDOW_S}; "
                             f"at least 3 log intervals of that run)")
    args = parser.parse_args(argv)
    if args.smooth == "auto":
        args.smooth = None
    else:
        try:
            factor = float(args.smooth)
        except ValueError:
            factor = -1.0
        if not 0 <= factor < 1:
            parser.error(f"--smooth must be 'auto' or a number in [0, 1), got {args.smooth!r}")
        args.smooth = factor
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    runs, keys, missing = load_runs(args.paths, args.running_window)
    header, rows, csv_header, raw = table_rows(runs, keys, missing)
    print(format_table(header, rows))
    if args.csv:
        write_csv(args.csv, csv_header, raw)
        print(f"wrote {args.csv}")
    if args.no_plot:
        return 0
    first = args.paths[0] if os.path.isdir(args.paths[0]) else os.path.dirname(args.paths[0]) or "."
    out = args.out or os.path.join(first, "plot.png")
    if os.path.dirname(out):
        try:
            os.makedirs(os.path.dirname(out), exist_ok=True)
        except OSError as e:
            fail(f"cannot create the folder of '{out}': {e.strerror}")
    exp_names = sorted({str(r.cfg.get("exp_name")) for r in runs})
    title = ", ".join(exp_names) if len(exp_names) <= 3 else f"{len(runs)} runs"
    plot_curves(runs, out, args.x, args.smooth, args.log, title)
    print(f"wrote {out}")
    second = plot_sensitivity(runs, keys, out, args.log, title)
    if second:
        print(f"wrote {second}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
