"""Sweeps: one YAML file with lists of values describes a grid of training jobs.

    lr: [1.0e-3, 3.0e-3]            # a list is a sweep axis
    n_layers: [4, 8, 12]            # the grid is the Cartesian product of the axes
    lr_min,warmup_steps: [[1.0e-4, 100], [3.0e-4, 200]]   # keys joined by commas vary together
    some_list_key: [[1, 2]]         # a list *value* that is not swept: wrap it in one more list
    seq_len: 256                    # anything else is the same in every job

Rules:
- Every top-level key whose value is a list is an axis; each of its elements is one value.
  So `[[1, 2]]` is an axis with a single value, the list [1, 2]: a literal list, same in every job.
- A key naming several keys joined by commas ("lr,warmup_steps") is a zipped axis: its value is
  a list of value lists, one entry per key, and those keys change together.
- Jobs are numbered 0..N-1 in grid order: the axes' Cartesian product in the order the keys
  appear in the file, the last axis varying fastest (like nested for-loops written top to bottom).
  Above: job 0 = (lr 1e-3, n_layers 4, first pair), job 1 = (1e-3, 4, second pair), job 2 =
  (1e-3, 8, first pair), ..., job 11 = (3e-3, 12, second pair).
- A file without axes is a single job.

`python train.py cfg.yaml --job_idx i` trains job i in `<out_dir>/<exp_name>/job<i>`;
slurm.sh and condor.sub submit every job of a file at once.

This module imports only the standard library and yaml, so it is instant on a login node.
`--job_idx` asks `train.py --print_config` for the fully resolved config (train.py owns the
defaults and checks, and imports this file, so this one runs it rather than importing it).
"""
import argparse
import copy
import math
import os
import subprocess
import sys

import yaml


def _fail(msg):
    raise SystemExit(f"sweep.py: error: {msg}")


def _split(file_key):
    """'lr, warmup_steps' -> ('lr', 'warmup_steps'); a plain key -> (key,)."""
    if isinstance(file_key, str) and "," in file_key:
        return tuple(k.strip() for k in file_key.split(","))
    return (file_key,)


def axes(raw):
    """The sweep axes of a raw config, in file order: a list of (keys, values) pairs, where
    keys is a tuple of one key (plain axis) or several (zipped axis) and values is a list whose
    entries are tuples with one value per key."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        _fail(f"a config must be a YAML mapping of key: value lines, got {type(raw).__name__}")
    found, owner = [], {}  # owner: key -> the file key that sets it, to catch a key set twice
    for file_key, value in raw.items():
        keys = _split(file_key)
        for key in keys:
            if key == "":
                _fail(f"zipped key '{file_key}' has an empty name: write the keys joined by commas, "
                      f"e.g. 'lr,warmup_steps'")
            if key in owner:
                _fail(f"key '{key}' is set twice (in '{owner[key]}' and in '{file_key}'); "
                      f"set each key once")
            owner[key] = file_key
        if len(keys) > 1:
            found.append((keys, _zipped_values(file_key, keys, value)))
        elif isinstance(value, list):
            if not value:
                _fail(f"key '{file_key}' is an empty list: a sweep axis needs at least one value "
                      f"(to pass an empty list as the value itself, write [[]])")
            found.append((keys, [(v,) for v in value]))
    return found


def _zipped_values(file_key, keys, value):
    """Check a zipped axis: a non-empty list of value lists, each with one value per key."""
    example = "[[" + ", ".join(f"<{k}>" for k in keys) + "], ...]"
    if not isinstance(value, list) or not value:
        _fail(f"zipped axis '{file_key}' needs a list of value lists like {example}, got {value!r}")
    for i, entry in enumerate(value):
        if not isinstance(entry, list) or len(entry) != len(keys):
            _fail(f"zipped axis '{file_key}': entry {i} is {entry!r} but should be a list of "
                  f"{len(keys)} values, one for each of {', '.join(keys)}")
    return [tuple(entry) for entry in value]


def count(raw):
    """Number of jobs in the grid (1 for a config without axes)."""
    return math.prod(len(values) for _, values in axes(raw))


def _pick(raw, idx):
    """The axis values of job idx: {key: value} for every key of every axis, file order."""
    grid = axes(raw)
    n = math.prod(len(values) for _, values in grid)
    if idx is None:
        if n == 1:
            idx = 0
        else:
            _fail(f"this config is a sweep of {n} jobs: choose one with --job_idx 0..{n - 1} "
                  f"(or submit them all with slurm.sh / condor.sub)")
    if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < n:
        _fail(f"job_idx {idx!r} is out of range: this sweep has {n} job{'s' * (n != 1)} "
              f"(0 to {n - 1}); see them with `python sweep.py CONFIG --list`")
    chosen = {}
    for keys, values in reversed(grid):  # last axis varies fastest: peel it off first
        idx, i = divmod(idx, len(values))
        chosen.update(zip(keys, values[i]))
    return chosen


def job_config(raw, idx):
    """The flat config of job idx: the raw config with every axis replaced by this job's value,
    keys in file order (a zipped key expands in place). idx None is allowed for a one-job file."""
    chosen = _pick(raw, idx)
    job = {}
    for file_key, value in (raw or {}).items():
        keys = _split(file_key)
        for key in keys:
            job[key] = copy.deepcopy(chosen[key] if key in chosen else value)
    return job


def expand(raw):
    """All jobs' flat configs, in grid order (job i is expand(raw)[i])."""
    return [job_config(raw, i) for i in range(count(raw))]


def varying(raw, idx):
    """The values job idx takes on the axes that really vary (axes with 2+ values), file order:
    what tells this job apart from its siblings (for --list, logs and run names)."""
    chosen = _pick(raw, idx)
    return {key: chosen[key] for keys, values in axes(raw) if len(values) > 1 for key in keys}


def load_yaml(path):
    """Read a config file as a raw mapping, with one clear error line on failure."""
    if not os.path.isfile(path):
        _fail(f"config file '{path}' does not exist")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        _fail(f"'{path}' is not valid YAML{line}: {getattr(e, 'problem', None) or e}")
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        _fail(f"'{path}' must be a mapping of key: value lines, got a {type(raw).__name__}")
    return raw


def _show(value):
    """A value as written in YAML flow style, for the --list table."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def table(raw):
    """--list: one row per job with the values of the varying keys, aligned in columns."""
    n = count(raw)
    keys = [key for ks, values in axes(raw) if len(values) > 1 for key in ks]
    rows = [["job"] + [str(k) for k in keys]]
    rows += [[str(i)] + [_show(v) for v in varying(raw, i).values()] for i in range(n)]
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    if not keys:
        lines = ["job", "0"]
    return "\n".join(lines) + f"\n({n} job{'s' * (n != 1)})"


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="sweep.py",
        description="Inspect a sweep config: every top-level list is an axis, the grid is their "
                    "Cartesian product in file order with the last key varying fastest; "
                    "'a,b: [[a1, b1], [a2, b2]]' varies keys together; '[[1, 2]]' is one literal "
                    "list value. Train job i with `python train.py CONFIG --job_idx i`; submit "
                    "all jobs with `bash slurm.sh CONFIG` or condor.sub.")
    parser.add_argument("config", help="YAML config file (with or without sweep axes)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--count", action="store_true",
                        help="print the number of jobs (1 when the file has no axes)")
    action.add_argument("--list", action="store_true",
                        help="print a table of every job's values on the varying keys (the default)")
    action.add_argument("--check", action="store_true",
                        help="check every job's resolved config with train.py (as training it would) and exit non-zero "
                             "naming the first bad job; slurm.sh runs this before submitting")
    action.add_argument("--job_idx", type=int, metavar="I",
                        help="print the fully resolved config of job I as YAML (defaults filled in "
                             "and validated by train.py), with its run folder in a comment")
    args = parser.parse_args(argv)

    raw = load_yaml(args.config)
    if args.count:
        print(count(raw))
    elif args.check:
        train_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
        result = subprocess.run([sys.executable, train_py, args.config, "--check_jobs"], capture_output=True, text=True)
        sys.stderr.write(result.stderr)  # train.py's one line naming the bad job
        if result.returncode == 0:
            print(f"{count(raw)} job(s) of {args.config}: every config is valid")
        return result.returncode
    elif args.job_idx is not None:
        job_config(raw, args.job_idx)  # range check first: a clear error without starting train.py
        train_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
        result = subprocess.run([sys.executable, train_py, args.config, "--job_idx", str(args.job_idx), "--print_config"],
                                capture_output=True, text=True)
        if result.returncode != 0:  # train.py's own one-line error about this job's config
            sys.stderr.write(result.stderr)
            return result.returncode
        config = yaml.safe_load(result.stdout)
        run_dir = os.path.join(str(config["out_dir"]), str(config["exp_name"]), f"job{args.job_idx}")
        print(f"# job {args.job_idx} of {count(raw)}; run folder: {run_dir}")
        print(result.stdout, end="")
    else:
        print(table(raw))
        # train.py's defaults for these two are runs/ and the config file's name
        sweep_dir = os.path.join(str(raw.get("out_dir", "runs")), str(raw.get("exp_name") or
                                 os.path.splitext(os.path.basename(args.config))[0]))
        print(f"curves and a summary table once they run: python plot.py {sweep_dir}")


if __name__ == "__main__":
    sys.exit(main())
