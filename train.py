"""Train a Transformer language model on token files written by prepare.py.

    python train.py configs/shakespeare_char.yaml [--key=value ...] [--job_idx N] [--overwrite]
    torchrun --standalone --nproc_per_node=8 train.py configs/gpt2_small.yaml

Everything is in this file, top to bottom: the config (one flat table of keys), the
distributed setup, the data sampler, the learning-rate schedules, evaluation,
checkpoints, and the training loop. A run can be stopped at any step (SIGTERM, SIGUSR1,
SIGINT) and started again with the same command: it continues bit-exactly.
"""
import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import difflib
import functools
import glob
import json
import math
import os
import random
import resource
import shutil
import signal
import socket
import sys
import threading
import time
import typing
import uuid
import warnings
import zlib

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel

import sweep
from model import ModelConfig, Transformer, rope_tables, use_fast_ops
from optimizers import LR_ADJUSTMENTS, Muon, Signum

# -----------------------------------------------------------------------------
# Config: every key, its default, and what it means. The README's table is this one.

NUMBER = (int, float)  # a count of steps, or a fraction of `steps` when below 1
SET_FROM_DATA = ("vocab_size", "max_seq_len")  # ModelConfig fields train.py fills in: from meta.json, and seq_len
MODEL_KEYS = {f.name: (f.default, tuple(typing.get_args(f.type)) or f.type, f.metadata["help"])
              for f in dataclasses.fields(ModelConfig) if f.name not in SET_FROM_DATA}
CONFIG = {
    # data
    "data_dir": ("data/shakespeare_char", str, "folder with train.bin, val.bin, meta.json (prepare.py)"),
    "seq_len": (256, int, "tokens per training sequence (context length)"),
    # model: every field of model.ModelConfig (its defaults, types, checks and help text) goes here
    **MODEL_KEYS,
    "fast_ops": (True, bool, "use fast_ops.py's kernels where they pay (fp32 on x86 CPUs); false: model.py's plain modules"),
    # budget
    "steps": (1000, int, "optimizer steps to train"),
    "batch_size": (64, int, "sequences per optimizer step, over all devices"),
    "micro_batch_size": (16, int, "sequences per forward pass on one device (gradient accumulation covers the rest)"),
    # optimizer
    "lr": (1e-3, float, "peak learning rate"),
    "lr_min": (0.0, float, "learning rate at the end of cosine/linear decay or of the WSD cooldown"),
    "weight_decay": (0.1, float, "weight decay, applied to matrices only (muon: to the embedding and LM head)"),
    "beta1": (0.9, float, "beta1 of adamw, nadamw, sfadamw and muon's AdamW part"),
    "beta2": (0.95, float, "beta2 of adamw, nadamw, sfadamw and muon's AdamW part"),
    "eps": (1e-8, float, "epsilon of adamw, nadamw, sfadamw and muon's AdamW part"),
    "optimizer": ("adamw", str, "adamw | nadamw | sgd | signsgd | sfadamw | muon (README: Optimizers)"),
    "momentum": (0.9, float, "momentum of sgd and signsgd"),
    "nesterov": (True, bool, "Nesterov momentum for sgd and muon"),
    "muon_lr": (0.01, float, "muon: base learning rate of the matrices inside the blocks (the rest use lr)"),
    "muon_momentum": (0.95, float, "muon: momentum of the matrices inside the blocks"),
    "muon_weight_decay": (0.0, float, "muon: decoupled weight decay of the matrices inside the blocks"),
    "muon_lr_adjust": ("original", str, "muon: per-matrix lr scale, original (max(1, rows/cols)^0.5) | "
                                        "match_rms_adamw (0.2 sqrt(max(rows, cols)))"),
    "grad_clip": (1.0, float, "clip the global gradient norm to this (0: no clipping)"),
    # schedule
    "scheduler": ("cosine", str, "cosine | wsd | constant | linear"),
    "warmup_steps": (100, NUMBER, "linear warmup: steps, or a fraction of steps if < 1"),
    "cooldown_steps": (0.2, NUMBER, "wsd cooldown length: steps, or a fraction of steps if < 1"),
    "cooldown_shape": ("linear", str, "wsd cooldown shape: linear | 1-sqrt"),
    # eval and logging
    "eval_every": (250, int, "evaluate every this many steps (0: only at the end)"),
    "eval_tokens": (131072, int, "validation tokens per evaluation (always the same ones)"),
    "log_every": (10, int, "print and record metrics every this many steps"),
    "sample_tokens": (0, int, "tokens to generate and print at the end of training (0: none)"),
    # run folder and checkpoints
    "out_dir": ("runs", str, "parent folder of run folders"),
    "exp_name": (None, (str, type(None)), "run folder name (null: the config file's name)"),
    "save_every": (500, int, "checkpoint every this many steps (0: only at the end)"),
    "keep_last": (2, int, "checkpoints to keep in the run folder (older ones are removed)"),
    "checkpoint_format": ("auto", str, "full: one file, gathered on rank 0 | sharded: a folder, each rank writes and "
                                       "reads its own part | auto: sharded from 100M parameters on 2+ processes"),
    "resume": ("auto", str, "auto: continue from the newest good checkpoint in the run folder; never: refuse to reuse one"),
    "init_from": (None, (str, type(None)), "checkpoint (or run folder) to branch from into a new run, e.g. a WSD cooldown"),
    # system
    "device": ("auto", str, "auto | cpu | cuda"),
    "dtype": ("auto", str, "auto (bf16 autocast on CUDA, fp16 on old GPUs, fp32 on CPU) | bf16 | fp16 | fp32"),
    "compile": (False, bool, "torch.compile the model"),
    "activation_checkpointing": (False, (bool, int), "recompute blocks in backward to save memory: true (every block), "
                                                     "k (every k-th block) or false"),
    "parallelism": ("ddp", str, "with several processes: ddp (replicated) or fsdp (FSDP2, sharded)"),
    "seed": (0, int, "random seed (model init and data order)"),
    "wandb": (False, bool, "log to Weights & Biases (needs `pip install wandb`)"),
    "wandb_project": ("plainlm", str, "W&B project name"),
}
DEFAULTS = {key: default for key, (default, _, _) in CONFIG.items()}
CHOICES = {"scheduler": ("cosine", "wsd", "constant", "linear"),
           "cooldown_shape": ("linear", "1-sqrt"), "resume": ("auto", "never"), "device": ("auto", "cpu", "cuda"),
           "dtype": ("auto", "bf16", "fp16", "fp32"), "parallelism": ("ddp", "fsdp"),
           "optimizer": ("adamw", "nadamw", "sgd", "signsgd", "sfadamw", "muon"), "muon_lr_adjust": LR_ADJUSTMENTS,
           "checkpoint_format": ("auto", "full", "sharded")}
# Keys that may differ when a run is resumed: they do not change what is being trained
# (out_dir and exp_name too, so a run folder can be moved or copied and still resume).
RESUMABLE_CHANGES = {"out_dir", "exp_name", "steps", "eval_every", "eval_tokens", "log_every", "sample_tokens", "save_every", "keep_last",
                     "checkpoint_format", "resume", "init_from", "device", "compile", "activation_checkpointing", "fast_ops", "parallelism", "micro_batch_size", "wandb",
                     "wandb_project"}
STOPPED_EXIT_CODE = 75  # "stopped early by a signal, checkpoint saved: run the same command again to continue"


def fail(msg):
    raise SystemExit(f"train.py: error: {msg}")


def coerce(key, value):
    """Convert a YAML or command-line value to the key's type, or fail with a clear message."""
    kinds = CONFIG[key][1] if isinstance(CONFIG[key][1], tuple) else (CONFIG[key][1],)
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
        if type(None) in kinds:
            return None
    elif bool in kinds and (isinstance(value, bool) or str(value).lower() in ("true", "false", "yes", "no")
                            or (int not in kinds and str(value) in ("1", "0"))):
        return value if isinstance(value, bool) else str(value).lower() in ("true", "1", "yes")
    elif not isinstance(value, bool):
        # Numbers may arrive as text: PyYAML reads `1e-3` as a string, and overrides always are.
        if int in kinds:
            with contextlib.suppress(ValueError):
                return int(str(value))  # "100" but not "2.5" or "1e3"
        if float in kinds:
            with contextlib.suppress(ValueError, TypeError):
                return float(value)
        if str in kinds and isinstance(value, (str, int, float)):
            return str(value)
    names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
    fail(f"config key '{key}' must be {names}, got {value!r}")


def check_known(keys, where):
    for key in keys:
        if key not in CONFIG:
            hint = difflib.get_close_matches(key, CONFIG, n=1)
            fail(f"unknown config key '{key}' in {where}" + (f" (did you mean '{hint[0]}'?)" if hint else "")
                 + "; `python train.py --help` lists every key")


def load_config(path, overrides=(), job_idx=None):
    """YAML file -> sweep job -> --key=value overrides -> defaults -> validated flat dict."""
    for item in overrides:  # `--lr 1e-3`: the value became a separate word (or the config file's name)
        if item.startswith("--") and "=" not in item and item[2:] in CONFIG:
            fail(f"'{item}' has no value: overrides are written {item}=VALUE, with '=' and no space")
    raw = {}
    if path:
        if not os.path.isfile(path):
            fail(f"config file '{path}' not found")
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            fail(f"config file '{path}' is not valid YAML: {str(e).splitlines()[0]}")
        if not isinstance(raw, dict):
            fail(f"config file '{path}' must be a mapping of key: value")
    n_jobs = sweep.count(raw)
    if job_idx is None and n_jobs > 1:
        fail(f"'{path}' is a sweep of {n_jobs} jobs: pass --job_idx N (0..{n_jobs - 1}); `python sweep.py {path} --list` shows them")
    job = sweep.job_config(raw, job_idx or 0)
    check_known(job, path)
    for item in overrides:
        if not item.startswith("--") or "=" not in item:
            fail(f"cannot read argument '{item}': overrides are written --key=value")
        key, value = item[2:].split("=", 1)
        check_known([key], "the command line")
        job[key] = value
    cfg = dict(DEFAULTS)
    cfg.update({key: coerce(key, value) for key, value in job.items()})
    if cfg["exp_name"] is None:
        cfg["exp_name"] = os.path.splitext(os.path.basename(path))[0] if path else "run"
    cfg["job_idx"] = job_idx
    validate(cfg)
    return cfg


def validate(cfg):
    for key, choices in CHOICES.items():
        if cfg[key] not in choices:
            fail(f"config key '{key}' must be one of {', '.join(choices)}, got {cfg[key]!r}")
    for key in ("seq_len", "steps", "batch_size", "micro_batch_size", "keep_last", "log_every"):
        if cfg[key] <= 0:
            fail(f"config key '{key}' must be positive, got {cfg[key]}")
    for key in ("activation_checkpointing", "eval_every", "eval_tokens", "save_every", "sample_tokens", "lr", "lr_min", "weight_decay", "grad_clip", "warmup_steps", "cooldown_steps", "muon_lr", "muon_weight_decay"):
        if cfg[key] < 0:
            fail(f"config key '{key}' must not be negative, got {cfg[key]}")
    for key in ("momentum", "muon_momentum"):
        if not 0 <= cfg[key] < 1:
            fail(f"config key '{key}' must be in [0, 1), got {cfg[key]}")
    if cfg["lr_min"] > cfg["lr"]:
        fail(f"lr_min ({cfg['lr_min']}) is larger than lr ({cfg['lr']})")
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_STEP_NUM_TASKS", 1)))
    check_optimizer(cfg, world)
    if cfg["batch_size"] % (cfg["micro_batch_size"] * world):
        fail(f"batch_size {cfg['batch_size']} is not divisible by micro_batch_size {cfg['micro_batch_size']} x "
             f"{world} processes: choose them so that batch_size = micro_batch_size x processes x accumulation steps")
    warmup, cooldown = schedule_lengths(cfg)
    if cfg["scheduler"] == "wsd" and warmup + cooldown > cfg["steps"]:
        fail(f"warmup_steps ({warmup}) + cooldown_steps ({cooldown}) exceed steps ({cfg['steps']})")
    if warmup > cfg["steps"]:
        fail(f"warmup_steps ({warmup}) exceed steps ({cfg['steps']}): set warmup_steps too, or give it as a "
             f"fraction of steps (e.g. --warmup_steps=0.1)")
    if cfg["eval_tokens"] < cfg["seq_len"] + 1:
        fail(f"eval_tokens ({cfg['eval_tokens']}) must be at least seq_len + 1 ({cfg['seq_len'] + 1}) "
             f"to hold one validation window")
    try:
        model_config(cfg, vocab_size=256)
    except ValueError as e:
        fail(f"bad model shape: {e}")


def model_config(cfg, vocab_size):
    return ModelConfig(vocab_size=vocab_size, max_seq_len=cfg["seq_len"], **{key: cfg[key] for key in MODEL_KEYS})


def run_dir_of(cfg):
    if cfg["job_idx"] is None:
        return os.path.join(cfg["out_dir"], cfg["exp_name"])
    return os.path.join(cfg["out_dir"], cfg["exp_name"], f"job{cfg['job_idx']}")


# -----------------------------------------------------------------------------
# Learning-rate schedules. `step` counts optimizer steps from 1, so step 1 never runs at LR 0.

def steps_of(value, steps):
    """warmup_steps or cooldown_steps as a count: a number below 1 is a fraction of steps."""
    return round(value * steps) if isinstance(value, float) and value < 1 else int(value)


def schedule_lengths(cfg):
    return steps_of(cfg["warmup_steps"], cfg["steps"]), steps_of(cfg["cooldown_steps"], cfg["steps"])


def lr_factor(step, cfg):
    """The schedule: the multiplier of every parameter group's base learning rate at `step`.
    Warmup rises to 1; the decays end at lr_min / lr."""
    warmup, cooldown = schedule_lengths(cfg)
    if step <= warmup:
        return step / warmup
    floor = cfg["lr_min"] / cfg["lr"] if cfg["lr"] else 0.0
    if cfg["scheduler"] == "constant":
        return 1.0
    if cfg["scheduler"] == "wsd":
        decay_start = cfg["steps"] - cooldown
        if step <= decay_start:
            return 1.0
        progress = (step - decay_start) / cooldown  # in (0, 1]; reaches the floor at the last step
        left = 1 - progress if cfg["cooldown_shape"] == "linear" else 1 - math.sqrt(progress)
        return floor + (1 - floor) * left
    progress = (step - warmup) / max(1, cfg["steps"] - warmup)
    left = 1 - progress if cfg["scheduler"] == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return floor + (1 - floor) * left


def lr_at(step, cfg):
    """The learning rate of the groups whose base rate is `lr` (what the logs show)."""
    return cfg["lr"] * lr_factor(step, cfg)


# -----------------------------------------------------------------------------
# Data. train.bin is cut into windows of seq_len + 1 tokens that start every seq_len tokens,
# so every token is predicted exactly once per epoch. Each epoch visits all windows in a
# seeded random order; each optimizer step takes the next batch_size windows of that order and
# deals them out to the ranks, so ranks never see the same window and the same config means
# the same optimization on any number of devices. The sampler's state is two integers.

def read_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        fail(f"no data in '{data_dir}' (meta.json missing): run `python prepare.py --source shakespeare "
             f"--tokenizer char --out {data_dir}` or set data_dir")
    try:
        with open(path, "rb") as f:
            meta = json.load(f)
    except ValueError as e:
        fail(f"'{path}' is not valid JSON ({type(e).__name__}): run prepare.py again with --overwrite")
    if not isinstance(meta, dict) or not meta.get("complete"):
        fail(f"'{path}' marks an incomplete data set: run prepare.py again with --overwrite")
    missing = [key for key in ("tokenizer", "vocab_size", "dtype", "splits") if key not in meta]
    if missing:
        fail(f"'{path}' lacks {', '.join(missing)}: it was not written by prepare.py, or was edited; "
             f"run prepare.py again with --overwrite")
    return meta


def open_tokens(data_dir, split, meta):
    """The split's tokens, memory-mapped, after checking that the file is as long as meta.json says."""
    path = os.path.join(data_dir, f"{split}.bin")
    if not os.path.isfile(path):
        fail(f"'{path}' is missing: run prepare.py again with --overwrite")
    dtype, size = np.dtype(meta["dtype"]), os.path.getsize(path)
    expected = meta["splits"].get(split, {}).get("tokens") if isinstance(meta["splits"], dict) else None
    if size % dtype.itemsize:
        fail(f"'{path}' is {size} bytes, not a whole number of {dtype.name} tokens: it is damaged or was cut "
             f"short; run prepare.py again with --overwrite")
    if size // dtype.itemsize != expected:
        fail(f"'{path}' holds {size // dtype.itemsize} tokens but meta.json says {expected}: it was cut short or "
             f"comes from another prepare.py run; run prepare.py again with --overwrite")
    if size == 0:
        fail(f"'{path}' is empty: run prepare.py again with --overwrite and a corpus (or --val_tokens) that fills it")
    return np.memmap(path, dtype=dtype, mode="r")


class Sampler:
    def __init__(self, n_tokens, seq_len, seed):
        self.n_windows = (n_tokens - 1) // seq_len
        self.seed, self.epoch, self.pos = seed, 0, 0
        self.order = self._order()

    def _order(self):
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n_windows)

    def next_ids(self, count):
        """The next `count` window ids, crossing into the next epoch when this one runs out."""
        ids = []
        while len(ids) < count:
            take = min(count - len(ids), self.n_windows - self.pos)
            ids.extend(self.order[self.pos:self.pos + take])
            self.pos += take
            if self.pos == self.n_windows:
                self.epoch, self.pos = self.epoch + 1, 0
                self.order = self._order()
        return np.array(ids)

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state):
        self.epoch, self.pos = state["epoch"], state["pos"]
        self.order = self._order()


def deal(step_ids, world, rank, micro_batch_size):
    """This rank's micro-batches of one step's window ids, shape (accumulation steps, micro_batch_size).
    Cut the step into micro-batches in order; micro-batch j goes to rank j % world. So each window
    is read by exactly one rank, and the ranks together run the micro-batches one process would."""
    return step_ids.reshape(-1, world, micro_batch_size)[:, rank]


def get_windows(tokens, ids, seq_len, device):
    """Inputs and targets (len(ids), seq_len) for windows `ids` of a memmapped token array."""
    return to_device(read_windows(tokens, ids, seq_len, device), device)


def read_windows(tokens, ids, seq_len, device):
    """The windows as one (len(ids), seq_len + 1) CPU tensor; pinned when bound for a GPU, so that the
    copy there runs asynchronously."""
    rows = np.stack([tokens[i * seq_len:i * seq_len + seq_len + 1] for i in ids]).astype(np.int64)
    batch = torch.from_numpy(rows)
    return batch.pin_memory() if device.type == "cuda" else batch


def to_device(batch, device):
    batch = batch.to(device, non_blocking=True)
    return batch[:, :-1], batch[:, 1:]


class Prefetcher:
    """This rank's micro-batches, step after step, in the sampler's order. While step N trains, a
    background thread reads step N+1's windows from the memmap (and pins them), so the GPU never
    waits for the disk or np.stack. The sampler is advanced here, in the training thread only, and
    state_dict() is its position after the steps handed out: what a checkpoint must hold, whatever
    was read ahead."""

    def __init__(self, tokens, sampler, cfg, world, rank, device, steps):
        self.tokens, self.sampler, self.cfg, self.world, self.rank, self.device = tokens, sampler, cfg, world, rank, device
        self.steps_left, self.state = steps, sampler.state_dict()
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self.ahead = self._read_next() if steps > 0 else None

    def _read_next(self):
        ids = deal(self.sampler.next_ids(self.cfg["batch_size"]), self.world, self.rank, self.cfg["micro_batch_size"])
        read = [functools.partial(read_windows, self.tokens, micro_ids, self.cfg["seq_len"], self.device) for micro_ids in ids]
        return self.pool.submit(lambda: [r() for r in read]), self.sampler.state_dict()

    def next_step(self):
        """[(inputs, targets)] of the next step's micro-batches, on the device."""
        future, self.state = self.ahead
        self.steps_left -= 1
        self.ahead = self._read_next() if self.steps_left > 0 else None  # nothing is read past the last step
        return [to_device(batch, self.device) for batch in future.result()]

    def state_dict(self):
        return dict(self.state)

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)


# -----------------------------------------------------------------------------
# Devices, processes and precision.

def setup_distributed(cfg):
    """(rank, world_size, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; srun
    launching one task per GPU sets SLURM_PROCID/SLURM_STEP_NUM_TASKS/SLURM_LOCALID instead."""
    env = os.environ
    if "RANK" in env:
        rank, world, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    elif "SLURM_PROCID" in env and int(env.get("SLURM_STEP_NUM_TASKS", 1)) > 1:
        rank, world, local_rank = int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env["SLURM_LOCALID"])
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            fail("running as a SLURM task without MASTER_ADDR/MASTER_PORT: export them (see slurm.sh) or use torchrun")
    else:
        rank, world, local_rank = 0, 1, 0
    use_cuda = cfg["device"] == "cuda" or (cfg["device"] == "auto" and torch.cuda.is_available())
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        fail("device is cuda but no CUDA GPU is visible: set device: cpu (or auto)")
    if use_cuda:
        torchrun_world = int(env["LOCAL_WORLD_SIZE"]) if "LOCAL_WORLD_SIZE" in env else None
        gpu = gpu_of(local_rank, torch.cuda.device_count(), torchrun_world)
        torch.cuda.set_device(gpu)
        device = torch.device("cuda", gpu)
        # TF32 for the fp32 matmuls and convolutions autocast leaves (the current API; allow_tf32 is legacy).
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        device = torch.device("cpu")
    if world > 1:
        # A rank that dies leaves the others blocked in a collective; they give up after this
        # timeout. (torchrun and `srun --kill-on-bad-exit` stop them much sooner.)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=15), device_id=device if use_cuda else None)
    return rank, world, device


def gpu_of(local_rank, n_gpus, torchrun_local_world=None):
    """The GPU of this process: its local rank's. srun may show each task only its own GPU
    (--gpus-per-task=1), which is then device 0 for it. More processes than visible GPUs would
    share GPUs silently (each at a fraction of the speed) or fail inside NCCL: one clear error instead."""
    if torchrun_local_world is None and n_gpus == 1:
        return 0
    if local_rank >= n_gpus or (torchrun_local_world or 0) > n_gpus:
        fail(f"{max(torchrun_local_world or 0, local_rank + 1)} processes on this node but only {n_gpus} GPU(s) visible: "
             f"start one process per GPU (torchrun --nproc_per_node={n_gpus}, or srun --ntasks-per-node={n_gpus})")
    return local_rank


def choose_precision(cfg, device):
    """(autocast dtype or None, human-readable reason)."""
    dtype = cfg["dtype"]
    if dtype == "auto":
        if device.type != "cuda":
            return None, "fp32" + fast_ops_note(cfg, device) + " (auto: this CPU has no fast bf16)"
        if torch.cuda.is_bf16_supported(including_emulation=False):  # emulated bf16 (pre-Ampere) is slow
            return torch.bfloat16, "bf16 autocast (auto: CUDA with bf16)"
        return torch.float16, "fp16 autocast + loss scaling (auto: this GPU has no bf16)"
    if dtype == "fp32":
        return None, "fp32" + fast_ops_note(cfg, device)
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype], f"{dtype} autocast"


def fast_ops_note(cfg, device):
    if device.type != "cpu":
        return ""
    if not use_fast_ops(cfg["fast_ops"]):
        return ", model.py's plain ops (fast_ops off)"
    import fast_ops
    return ", fast_ops where they pay (oneDNN matmuls, leaner backwards)" if fast_ops.ONEDNN else ""


def autocast(device, amp_dtype):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def build_model(cfg, vocab_size, device, world, amp_dtype):
    """(raw model, model to call). The raw model owns the parameters and clean state-dict names;
    the one to call may be DDP-wrapped, FSDP-sharded and/or compiled."""
    if world > 1 and cfg["parallelism"] == "fsdp" and amp_dtype == torch.float16:
        fail("fp16 with FSDP is not supported: use dtype bf16 (or fp32)")
    if world > 1 and cfg["parallelism"] == "fsdp":
        raw = build_sharded(cfg, vocab_size, device, amp_dtype)
        return raw, raw  # compiled block by block, if at all
    raw = Transformer(model_config(cfg, vocab_size), fast_ops=cfg["fast_ops"])
    # Seeded just before the weights are drawn (not before the layers' own default init): the same
    # initial weights on every rank, and the ones build_sharded draws for FSDP.
    torch.manual_seed(cfg["seed"])
    raw.reset_parameters()
    raw = raw.to(device)
    raw.checkpoint_every = int(cfg["activation_checkpointing"])
    model = raw
    if world > 1:
        # gradient_as_bucket_view: the gradients live in DDP's all-reduce buckets instead of
        # being copied there, which saves one model-sized buffer per process.
        # forward_sync_buffers off: the only buffers are the RoPE tables, the same on every rank, so
        # re-sending them from rank 0 before every forward pass would be wasted communication.
        # (torch 2.13 deprecates broadcast_buffers for this flag; buffers are still synced once at init.)
        model = DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda" else None,
                                        gradient_as_bucket_view=True, forward_sync_buffers=False)
    if cfg["compile"]:
        model = torch.compile(model)
    return raw, model


def check_optimizer(cfg, world):
    """Combinations that cannot train as configured: one clear line before anything starts."""
    if cfg["optimizer"] == "sfadamw":
        try:
            import schedulefree  # noqa: F401  (imported only when chosen)
        except ImportError:
            fail("optimizer 'sfadamw' needs the schedulefree package: pip install schedulefree")
        if cfg["scheduler"] != "constant":
            # Schedule-free methods replace the decay by their weight averaging; a decay on top would
            # be another method. The warmup still applies.
            fail(f"optimizer 'sfadamw' is schedule-free: set --scheduler=constant (warmup_steps still applies), "
                 f"got scheduler '{cfg['scheduler']}'")
    if cfg["optimizer"] == "muon" and cfg["parallelism"] == "fsdp" and world > 1:
        # Orthogonalising needs each whole matrix, and FSDP2 gives every rank a slice of it.
        fail("optimizer 'muon' needs whole weight matrices and FSDP2 shards them: use --parallelism=ddp with muon")


def build_sharded(cfg, vocab_size, device, amp_dtype):
    """FSDP2. The model is built on the meta device (shapes only, no memory), each block is compiled
    and sharded, then the rest; only then does each rank allocate its shard and fill it with the
    weights a 1-process run starts from. So no GPU ever holds the whole model."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import distribute_tensor
    with torch.device("meta"):
        raw = Transformer(model_config(cfg, vocab_size), fast_ops=cfg["fast_ops"])
    raw.checkpoint_every = int(cfg["activation_checkpointing"])
    # Gradients are reduced in fp32. cast_forward_inputs=False: FSDP would otherwise cast every block's
    # inputs to bf16, the residual stream and the RoPE tables with them, which DDP's autocast keeps in fp32.
    mp = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32 if amp_dtype else None,
                              cast_forward_inputs=False)
    # The model returns its logits sliced to vocab_size, a view; nothing changes them in place, so
    # FSDP's warning about in-place ops on returned views does not apply here.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for block in raw.blocks:
        if cfg["compile"]:  # per block, before sharding: FSDP's hooks stay outside the compiled graphs
            block.compile()
        fully_shard(block, mp_policy=mp)
    fully_shard(raw, mp_policy=mp)  # shards in place: raw is the sharded model
    raw.to_empty(device=device)
    with torch.no_grad():
        cos, sin = rope_tables(raw.cfg.head_dim, raw.cfg.max_seq_len, raw.cfg.rope_theta)
        raw.rope_cos.copy_(cos)
        raw.rope_sin.copy_(sin)
        # Each full tensor is drawn on the CPU, in the order and from the generator a 1-process build
        # uses; this rank keeps its shard. One parameter at a time is all the extra memory it takes.
        torch.manual_seed(cfg["seed"])
        for name, param in raw.named_parameters():
            full = torch.empty(param.shape)
            raw.init_parameter(name, full)
            param.copy_(distribute_tensor(full.to(device), param.device_mesh, param.placements, src_data_rank=None))
    return raw


def make_optimizer(raw, cfg):
    """Each parameter group's "lr" is its base learning rate, which the schedule then scales.
    Decay matrices (embeddings, projections); never norm gains. parameters() lists a tied weight once.
    With muon, the matrices inside the blocks form a group of their own (muon_lr, muon_weight_decay);
    the token embedding and the LM head keep AdamW, as they are lookups and readouts, not hidden maps."""
    name = cfg["optimizer"]
    named = list(raw.named_parameters())
    hidden = [p for n, p in named if name == "muon" and p.dim() == 2 and n.startswith("blocks.")]
    hidden_ids = {id(p) for p in hidden}
    groups = [{"params": [p for _, p in named if p.dim() >= 2 and id(p) not in hidden_ids],
               "weight_decay": cfg["weight_decay"], "lr": cfg["lr"]},
              {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0, "lr": cfg["lr"]}]
    betas = (cfg["beta1"], cfg["beta2"])
    if name == "adamw":
        # The fused kernel updates each tensor in one pass, on CUDA and on CPU (at bench.py's CPU shape
        # it cut the optimizer step from about 32 to 13 ms).
        return torch.optim.AdamW(groups, lr=cfg["lr"], betas=betas, eps=cfg["eps"], fused=True)
    if name == "nadamw":
        return torch.optim.NAdam(groups, lr=cfg["lr"], betas=betas, eps=cfg["eps"], decoupled_weight_decay=True)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"], nesterov=cfg["nesterov"] and cfg["momentum"] > 0)
    if name == "signsgd":
        return Signum(groups, lr=cfg["lr"], momentum=cfg["momentum"])
    if name == "sfadamw":
        import schedulefree
        # Its own warmup is off: train.py's schedule gives the warmup (and then a constant rate).
        return schedulefree.AdamWScheduleFree(groups, lr=cfg["lr"], betas=betas, eps=cfg["eps"], warmup_steps=0)
    groups.insert(0, {"params": hidden, "muon": True, "lr": cfg["muon_lr"], "weight_decay": cfg["muon_weight_decay"]})
    return Muon(groups, momentum=cfg["muon_momentum"], nesterov=cfg["nesterov"], adjust_lr=cfg["muon_lr_adjust"],
                betas=betas, eps=cfg["eps"])


def training_mode(optimizer):
    if callable(getattr(optimizer, "train", None)):  # schedule-free AdamW must be told when it trains
        optimizer.train()


@contextlib.contextmanager
def averaged_weights(optimizer):
    """Schedule-free AdamW trains at one point and evaluates at another (the average of its iterates):
    evaluation, checkpoints and the final sample see the averaged weights. A checkpoint then holds
    those and the optimizer's state, and a resume swaps back exactly as the uninterrupted run does."""
    swap = callable(getattr(optimizer, "eval", None))
    if swap:
        optimizer.eval()
    try:
        yield
    finally:
        if swap:
            optimizer.train()


def no_grad_sync(model, raw, sync):
    """Gradient accumulation: only the last micro-step's backward all-reduces gradients."""
    if hasattr(raw, "set_requires_gradient_sync"):  # FSDP2
        raw.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    ddp = getattr(model, "_orig_mod", model)
    if sync or not hasattr(ddp, "no_sync"):
        return contextlib.nullcontext()
    return ddp.no_sync()


def train_step(model, raw, optimizer, scaler, micro_batches, cfg, device, amp_dtype):
    """One optimizer step over a list of (inputs, targets) micro-batches.
    Returns (mean loss over the micro-batches, as a tensor; gradient norm before clipping)."""
    loss_sum = torch.zeros((), device=device)
    for i, (x, y) in enumerate(micro_batches):
        with no_grad_sync(model, raw, sync=i == len(micro_batches) - 1), autocast(device, amp_dtype):
            _, loss = model(x, y)
            scaled = loss / len(micro_batches)
        scaler.scale(scaled).backward()
        loss_sum += loss.detach()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg["grad_clip"] or float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a sharded (DTensor) norm
        grad_norm = grad_norm.full_tensor()
    scaler.step(optimizer)
    scaler.update()
    # DDP's gradients are views of its all-reduce buckets (gradient_as_bucket_view): zeroed in place they
    # stay there; set to None, DDP would allocate them anew every step.
    optimizer.zero_grad(set_to_none=not isinstance(getattr(model, "_orig_mod", model), DistributedDataParallel))
    return loss_sum / len(micro_batches), grad_norm


@torch.no_grad()
def evaluate(model, tokens, cfg, device, amp_dtype, rank, world):
    """Mean loss over the first eval_tokens validation tokens (the same ones every time).
    Windows are dealt to ranks round-robin; every rank runs the same number of forward passes
    (FSDP needs that), padding with ignored targets, and the sums are all-reduced."""
    n_windows = min(cfg["eval_tokens"], len(tokens) - 1) // cfg["seq_len"]
    mine = np.arange(rank, n_windows, world)
    per_rank = math.ceil(n_windows / world)
    total = torch.zeros(2, device=device, dtype=torch.float64)  # loss sum, token count
    model.eval()
    for start in range(0, per_rank, cfg["micro_batch_size"]):
        ids = mine[start:start + cfg["micro_batch_size"]]
        count = min(cfg["micro_batch_size"], per_rank - start)
        # A rank that has run out of windows pads with window 0, whose targets count for nothing.
        x, y = get_windows(tokens, np.concatenate([ids, np.zeros(count - len(ids), dtype=ids.dtype)]), cfg["seq_len"], device)
        y = y.clone()  # y and x are views of one tensor: writing y in place would change x too
        y[len(ids):] = -1
        with autocast(device, amp_dtype):
            _, loss_sum = model(x, y, reduction="sum")
        total[0] += loss_sum
        total[1] += (y != -1).sum()
    model.train()
    if world > 1:
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


# -----------------------------------------------------------------------------
# Checkpoints come in two formats, both keyed by parameter names, so either loads with any number of
# ranks, DDP, FSDP or one process:
#   full     <run>/ckpt_<step>.pt: one file. Rank 0 gathers every tensor into its CPU memory and writes
#            it alone; on resume rank 0 reads it and broadcasts each tensor to the others.
#   sharded  <run>/ckpt_<step>.dcp/: a folder. Every rank writes and reads its own part of the tensors
#            (torch.distributed.checkpoint, which reshards on load), rank 0 adds plainlm.pt (the rest).
# Both are written under a temporary name, fsynced, then renamed, so a name without .tmp is always
# complete. A CRC32 of every tensor (full) or of every file (sharded) is saved with them: torch.load
# does not notice flipped bytes inside tensor data, so silent corruption would be resumed from as if fine.
SHARDED_FROM_PARAMS = 100_000_000  # auto: from GPT-2 small (124M parameters: 1.5 GB of fp32 weights and AdamW state) up


def sharded_format(cfg, raw, world):
    """Whether this run saves sharded checkpoints: for large models on several processes, where gathering
    everything into rank 0's memory and writing it from there alone is what makes saving slow."""
    fmt = cfg["checkpoint_format"]
    return fmt == "sharded" or (fmt == "auto" and world > 1 and raw.num_params() >= SHARDED_FROM_PARAMS)


class DamagedCheckpoint(Exception):
    """The checkpoint itself is bad (empty, truncated, not a checkpoint, data that fails its checksum)."""


def checkpoint_paths(run_dir):
    """Complete-looking checkpoints (files and sharded folders), newest first."""
    paths = glob.glob(os.path.join(run_dir, "ckpt_*.pt")) + glob.glob(os.path.join(run_dir, "ckpt_*.dcp"))
    return sorted(paths, key=os.path.basename, reverse=True)


def remove_checkpoint(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def tensors_of(state, name=""):
    """(name, tensor) of every tensor in a nested checkpoint dict or list, in a fixed order."""
    if isinstance(state, torch.Tensor):
        yield name, state
    elif isinstance(state, dict):
        for key in sorted(state, key=str):
            yield from tensors_of(state[key], f"{name}/{key}")
    elif isinstance(state, (list, tuple)):
        for i, item in enumerate(state):
            yield from tensors_of(item, f"{name}/{i}")


def tensor_checksum(state):
    """CRC32 of the bytes of every tensor (zlib's is about 4 GB/s on one core)."""
    crc = 0
    for _, tensor in tensors_of({key: value for key, value in state.items() if key != "checksum"}):
        crc = zlib.crc32(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy(), crc)
    return crc


def file_crc32(path):
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def non_finite(model_state, optim_state):
    """Names of the floating-point tensors to be saved (this rank's part of them, if sharded) that hold a
    NaN or an inf (aminmax: one fast pass)."""
    local = ((name, t.to_local() if hasattr(t, "to_local") else t)
             for name, t in tensors_of({"model": model_state, "optimizer": optim_state}))
    return [name for name, t in local
            if t.is_floating_point() and t.numel() and not torch.isfinite(torch.stack(torch.aminmax(t))).all()]


def save_checkpoint(run_dir, step, raw, optimizer, scaler, sampler, cfg, meta, rank, world, keep_last):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    sharded = sharded_format(cfg, raw, world)
    # Collective under FSDP. Full: rank 0 receives the whole tensors, in CPU memory. Sharded: each rank keeps its part.
    model_state, optim_state = get_state_dict(raw, optimizer, options=StateDictOptions(full_state_dict=not sharded,
                                                                                       cpu_offload=not sharded))
    refuse_diverged_state(run_dir, step, model_state, optim_state, world)
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    rngs = [None] * world
    if world > 1:
        dist.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
    state = {"scaler": scaler.state_dict(), "sampler": sampler.state_dict(), "step": step, "rng": rngs, "config": cfg,
             "model_config": dataclasses.asdict(raw.cfg), "meta": meta}
    if sharded:
        write_sharded_checkpoint(state, {"model": model_state, "optimizer": optim_state},
                                 os.path.join(run_dir, f"ckpt_{step:07d}.dcp"), rank, world)
    elif rank == 0:
        state.update(model=model_state, optimizer=optim_state)
        state["checksum"] = {"crc32": tensor_checksum(state)}
        check_run_lock(run_dir)  # a trainer that lost the run folder to another one must not write into it
        write_checkpoint(state, os.path.join(run_dir, f"ckpt_{step:07d}.pt"))
    if rank == 0:
        for old in checkpoint_paths(run_dir)[keep_last:]:
            remove_checkpoint(old)
    if world > 1:
        dist.barrier()


@contextlib.contextmanager
def one_process_is_fine():
    """torch.distributed.checkpoint warns at every save and load without a process group, which is fine here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def write_sharded_checkpoint(state, tensors, path, rank, world):
    """Every rank writes its part of the tensors into one temporary folder (fsynced) and the CRC32s of its
    files; rank 0 adds plainlm.pt (the rest of the state, and those CRC32s) and renames the folder."""
    import torch.distributed.checkpoint as dcp
    tmp = [f"{path}.tmp-{os.getpid()}@{socket.gethostname()}"]
    if world > 1:
        dist.broadcast_object_list(tmp, src=0)  # rank 0's name, for all
    tmp = tmp[0]
    try:
        with one_process_is_fine():
            dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True), no_dist=world == 1)  # collective
        mine = {name: file_crc32(os.path.join(tmp, name)) for name in os.listdir(tmp) if name.startswith(f"__{rank}_")}
        error = None
    except (Exception, dcp.api.CheckpointException) as e:  # a failed write on any rank fails dcp.save on all
        mine, error = {}, (disk_error(os.path.dirname(path)) or first_line(e))
    results = [(mine, error)] * world
    if world > 1:
        dist.all_gather_object(results, (mine, error))
    error = next((e for _, e in results if e), None)
    if error is None and rank == 0:
        check_run_lock(os.path.dirname(path))
        state["files_crc32"] = {name: crc for crcs, _ in results for name, crc in crcs.items()}
        state["files_crc32"][".metadata"] = file_crc32(os.path.join(tmp, ".metadata"))
        state["checksum"] = {"crc32": tensor_checksum(state)}
        write_checkpoint(state, os.path.join(tmp, "plainlm.pt"))
        try:
            if os.path.exists(path):  # the same step saved by an earlier try of this run
                remove_checkpoint(path)
            os.replace(tmp, path)
            fsync_dir(os.path.dirname(path))
        except OSError as e:
            error = e.strerror
    if error:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        fail(f"cannot write checkpoint '{path}' ({error}): free space or fix the filesystem, then run the same "
             f"command again; it continues from the newest checkpoint there")


def write_checkpoint(state, path):
    """Write to a temporary name of this process's own, fsync, rename. On an error (disk full), no
    partial file stays behind and the run stops with one line; the older checkpoints are untouched."""
    tmp = f"{path}.tmp-{os.getpid()}@{socket.gethostname()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path))
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        cause = e if isinstance(e, OSError) else e.__context__  # the OSError it was raised while handling, if any
        reason = (cause.strerror if isinstance(cause, OSError) and cause.strerror else
                  disk_error(os.path.dirname(path)) or first_line(e))  # before the partial file is removed
        with contextlib.suppress(OSError):
            os.remove(tmp)
        fail(f"cannot write checkpoint '{path}' ({reason}): free space or fix the filesystem, then run the same "
             f"command again; it continues from the newest checkpoint there")


def disk_error(folder):
    """The likely reason a write into folder failed, e.g. 'No space left on device'; None if unknown."""
    with contextlib.suppress(OSError):
        if os.statvfs(folder).f_bavail == 0:
            return os.strerror(28)  # ENOSPC
    return None


def refuse_diverged_state(run_dir, step, model_state, optim_state, world):
    """Never save NaN/inf weights or optimizer state: the last checkpoint must stay a good one. A step
    whose gradient was NaN can still log a finite loss (it was computed before the update)."""
    bad = non_finite(model_state, optim_state)  # every rank checks what it holds (rank 0 alone, if full)
    if world > 1:
        found = [None] * world
        dist.all_gather_object(found, bad)  # every rank stops at the same step
        bad = list(dict.fromkeys(name for names in found for name in names))
    if bad:
        good = checkpoint_paths(run_dir)
        way = (f"continue from the last good checkpoint with a lower lr in a new run folder: "
               f"--init_from={good[0]} --exp_name=<new name> --lr=<lower>" if good else
               "start over with a lower lr or a longer warmup")
        fail(f"the model diverged: weights or optimizer state are not finite at step {step} ({bad[0]}"
             f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); nothing was saved; {way}")


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:100]


def read_checkpoint(path):
    """The checkpoint dict in a file; of a sharded folder, plainlm.pt (all but the tensors), with "sharded"
    set to the folder, after every file there was checked against its CRC32. DamagedCheckpoint when the
    checkpoint is bad; OSError when it cannot be read (permission denied, an I/O error): then it may be
    fine, and nobody should skip it."""
    if os.path.isdir(path):
        header = os.path.join(path, "plainlm.pt")
        if not os.path.isfile(header):
            raise DamagedCheckpoint("no plainlm.pt in the folder")
        ckpt = read_checkpoint(header)
        for name, crc in ckpt.get("files_crc32", {}).items():
            if not os.path.isfile(os.path.join(path, name)):
                raise DamagedCheckpoint(f"its file {name} is missing")
            if file_crc32(os.path.join(path, name)) != crc:
                raise DamagedCheckpoint(f"its file {name} does not match its checksum")
        return {**ckpt, "sharded": path}
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise DamagedCheckpoint("empty file")
        try:
            ckpt = torch.load(f, map_location="cpu", weights_only=True)
        except OSError:
            raise
        except Exception as e:  # a truncated zip, a half-copied file, unpickling errors, ...
            raise DamagedCheckpoint(f"{type(e).__name__}: {first_line(e)}") from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("checksum"), dict):
        if tensor_checksum(ckpt) != ckpt["checksum"].get("crc32"):
            raise DamagedCheckpoint("tensor data does not match its checksum")
    return ckpt


def model_weights(ckpt):
    """The model's whole state dict: what a full checkpoint holds; from a sharded one, read in this one
    process (the model's tensors only, not the optimizer's)."""
    if "sharded" not in ckpt:
        return ckpt["model"]
    import torch.distributed.checkpoint as dcp
    with torch.device("meta"):  # names, shapes and dtypes only
        layout = Transformer(ModelConfig(**ckpt["model_config"]), fast_ops=False).state_dict()
    state = {"model": {name: torch.empty(t.shape, dtype=t.dtype) for name, t in layout.items()}}
    with one_process_is_fine():
        dcp.load(state, checkpoint_id=ckpt["sharded"], no_dist=True)
    return state["model"]


def load_newest_checkpoint(paths, log):
    """(path, checkpoint, damaged paths skipped) of the newest checkpoint that loads; damaged files are
    skipped with a warning. ValueError when a file cannot be read at all."""
    damaged = []
    for path in paths:
        try:
            ckpt = read_checkpoint(path)
        except DamagedCheckpoint as e:
            log(f"warning: skipping unreadable checkpoint {path} ({e})")
            damaged.append(path)
            continue
        except OSError as e:
            raise ValueError(f"cannot read checkpoint '{path}' ({e.strerror or first_line(e)}): fix its permissions or "
                             f"the filesystem, then run again (the file itself may be fine)") from None
        if isinstance(ckpt, dict) and "checksum" not in ckpt:
            log(f"note: {path} has no checksum (written before plainLM recorded one): loaded without verifying it")
        return path, ckpt, damaged
    return None, None, damaged


def find_checkpoint(path, log):
    """(path, checkpoint) for a checkpoint (file or sharded folder), or the newest readable one of a run
    folder: what init_from, sample.py and export.py accept. ValueError with a one-line reason when there is none."""
    if os.path.isfile(path) or (os.path.isdir(path) and path.rstrip("/").endswith(".dcp")):
        paths = [path.rstrip("/")]
    elif os.path.isdir(path):
        paths = checkpoint_paths(path)
        if not paths:
            raise ValueError(f"run folder '{path}' has no checkpoints (ckpt_*.pt or ckpt_*.dcp): train it first or "
                             f"pass a checkpoint")
    else:
        raise ValueError(f"'{path}' is neither a run folder nor a checkpoint")
    found, ckpt, _ = load_newest_checkpoint(paths, log)
    if ckpt is None:
        raise ValueError(f"no readable checkpoint in '{path}'")
    if not isinstance(ckpt, dict) or not {"model_config", "meta"} <= set(ckpt) or not {"model", "sharded"} & set(ckpt):
        raise ValueError(f"'{found}' is not a plainLM checkpoint (it needs the keys model, model_config and meta)")
    return found, ckpt


def checkpoint_to_resume(run_dir, log):
    """(path, checkpoint, damaged newer files) to continue this run from, or (None, None, []) for a new
    run. Stops when checkpoints exist but none loads: starting over is the user's choice, never a default."""
    paths = checkpoint_paths(run_dir)
    try:
        path, ckpt, damaged = load_newest_checkpoint(paths, log)
    except ValueError as e:
        fail(str(e))
    if paths and ckpt is None:
        fail(f"every checkpoint in '{run_dir}' is damaged ({', '.join(os.path.basename(p) for p in paths)}); nothing "
             f"was changed: to start over, move them out of the folder (or delete them), or use another exp_name")
    return path, ckpt, damaged


def set_aside_damaged(damaged, resumed_from, log):
    """Rename damaged checkpoints newer than the one resumed from to *.damaged: the new checkpoint of
    that step must not overwrite them silently, and keep_last must not count them."""
    for path in damaged:
        os.replace(path, path + ".damaged")
        log(f"moved damaged {os.path.basename(path)} aside to {path}.damaged (continuing from {resumed_from})")


IDENTITY_OF_DATA = ("tokenizer", "vocab_size", "eot_id", "dtype", "chars", "source", "splits")


def check_same_run(cfg, meta, ckpt, path):
    """Resuming must continue the same training: the config (even when config.yaml is gone) and the data
    the checkpoint was trained with. A deliberate change branches into a new run with init_from."""
    branch = f"to train on with this config and data, branch: --init_from={path} --exp_name=<new name>"
    saved = ckpt.get("config", {})
    changed = config_changes(saved, cfg)
    if changed:
        diff = ", ".join(f"{k}: {saved.get(k, DEFAULTS[k])!r} -> {cfg.get(k)!r}" for k in changed[:4])
        fail(f"checkpoint {path} was trained with another config ({diff}); use that config to resume, or {branch}")
    changed = [k for k in IDENTITY_OF_DATA if ckpt["meta"].get(k) != meta.get(k)]
    if changed:
        diff = ", ".join(f"{k}: {short(ckpt['meta'].get(k))} -> {short(meta.get(k))}" for k in changed[:3])
        fail(f"the data in '{cfg['data_dir']}' is not the data {path} was trained on ({diff}): point data_dir at "
             f"that data, or {branch}")


def config_changes(saved, cfg):
    """The keys that change what is trained (not RESUMABLE_CHANGES) whose values differ between a saved
    config and this one. A warmup or cooldown is the same when both give the same number of steps
    (30 and 0.1 of 300 steps), so a config rewritten with fractions still resumes its runs."""
    def value(config, key):
        v = config.get(key, DEFAULTS[key])
        return steps_of(v, cfg["steps"]) if key in ("warmup_steps", "cooldown_steps") and isinstance(v, NUMBER) else v
    return [k for k in sorted(set(saved) | set(cfg)) if k in CONFIG and k not in RESUMABLE_CHANGES and value(saved, k) != value(cfg, k)]


def short(value):
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def restore(ckpt, raw, optimizer, scaler, sampler, rank, world):
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict, set_state_dict)
    if callable(getattr(optimizer, "train", None)):
        # Schedule-free: the state dict functions create the optimizer state with a step at lr 0, which it allows in
        # train mode only; train() leaves empty per-parameter entries that would hide that the state is missing.
        optimizer.train()
        optimizer.state.clear()
    if "sharded" in ckpt:
        import torch.distributed.checkpoint as dcp
        # This run's own layout (DTensor shards under FSDP, whole tensors otherwise), filled from the folder:
        # each rank reads what it needs, whatever the number of ranks and the parallelism that saved it.
        model_state, optim_state = get_state_dict(raw, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        with one_process_is_fine():
            dcp.load(state, checkpoint_id=ckpt["sharded"], no_dist=world == 1)
        set_state_dict(raw, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    else:  # rank 0 read the file; the others (with empty dicts) receive every tensor from it
        # (model and optimizer in two calls: set_state_dict skips the model on ranks whose model dict is empty)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=world > 1)
        set_model_state_dict(raw, ckpt["model"], options=options)
        set_optimizer_state_dict(raw, optimizer, ckpt["optimizer"], options=options)
    training_mode(optimizer)  # the checkpoint holds the averaged weights: back to the point it trains at
    scaler.load_state_dict(ckpt["scaler"])
    sampler.load_state_dict(ckpt["sampler"])
    if rank < len(ckpt["rng"]):  # resuming on more ranks than saved: the new ranks keep their seeds
        rng = ckpt["rng"][rank]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])


def prepare_run_dir(cfg, overwrite, log):
    """Create the run folder and take its lock, or check that the one there holds this same experiment.
    config.yaml is written later, by write_run_config, once the start has been checked."""
    run_dir = run_dir_of(cfg)
    make_run_dir(run_dir)
    acquire_run_lock(run_dir, log)
    saved = read_run_config(run_dir, log)
    changed = config_changes(saved, cfg) if saved is not None else []
    has_checkpoints = bool(checkpoint_paths(run_dir))
    if changed and not has_checkpoints:  # nothing was trained with it: a start that failed early
        log(f"note: replacing config.yaml of '{run_dir}', which has no checkpoints ({changed[0]} and others changed)")
    elif changed and overwrite:
        backup = f"{run_dir}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        release_run_lock()
        os.replace(run_dir, backup)
        log(f"--overwrite: moved the previous run folder to {backup}")
        make_run_dir(run_dir)
        acquire_run_lock(run_dir, log)
    elif changed:
        diff = ", ".join(f"{k}: {saved.get(k)!r} -> {cfg.get(k)!r}" for k in changed[:4])
        fail(f"run folder '{run_dir}' holds a different experiment ({diff}): choose another exp_name, "
             f"or pass --overwrite to move that folder aside and start over")
    elif cfg["resume"] == "never" and has_checkpoints:
        fail(f"run folder '{run_dir}' already has checkpoints and resume is 'never': choose another exp_name")
    return run_dir


def make_run_dir(run_dir):
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        fail(f"cannot create run folder '{run_dir}' ({e.strerror}): set out_dir to a writable place")


def read_run_config(run_dir, log):
    """The run's config.yaml as a dict; None when there is none or it is damaged (said so: the
    checkpoints keep their own config, which resume checks, and config.yaml is written again)."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            saved = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        saved = f"{type(e).__name__}"
    if not isinstance(saved, dict):
        log(f"warning: {path} is not valid YAML ({saved}); it will be written again from this command's config "
            f"(a resume still checks the config saved in the checkpoint)")
        return None
    return saved


def write_run_config(cfg, run_dir):
    path = os.path.join(run_dir, "config.yaml")
    with open(path + ".tmp", "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    os.replace(path + ".tmp", path)


# The run lock, <run>/train.lock: one trainer at a time writes a run folder (a requeued job may start
# while its predecessor still runs, and two trainers on one folder overwrite each other's
# checkpoints). Rank 0 holds it and refreshes its time stamp every LOCK_HEARTBEAT_S from a thread.
# A lock is stale when its process is gone (same host) or it was not refreshed for LOCK_STALE_S
# (any host: that is all a shared filesystem lets another node see); a stale lock is taken over.

LOCK_NAME, LOCK_HEARTBEAT_S, LOCK_STALE_S = "train.lock", 20, 120
RUN_LOCK = {}  # path, token and heartbeat of the lock this process holds


def describe_holder(holder):
    if not holder:
        return "an unknown trainer (the lock file is unreadable)"
    job = f" (SLURM job {holder['job']})" if holder.get("job") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}"


def read_lock(path):
    """(holder dict, mtime) of a lock file; ({}, mtime) while it is half-written; None when it is gone."""
    try:
        with open(path) as f:
            text, mtime = f.read(), os.fstat(f.fileno()).st_mtime
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        holder = {}
    return (holder if isinstance(holder, dict) else {}), mtime


def acquire_run_lock(run_dir, log):
    path = os.path.join(run_dir, LOCK_NAME)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID"),
          "since": time.strftime("%Y-%m-%d %H:%M:%S"), "token": uuid.uuid4().hex}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            wait_for_stale_lock(path, run_dir, log)
            continue
        except OSError as e:
            fail(f"cannot write in run folder '{run_dir}' ({e.strerror}): set out_dir to a writable place")
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())
        break
    stop = threading.Event()
    threading.Thread(target=refresh_lock, args=(path, me["token"], stop), daemon=True).start()
    RUN_LOCK.update(path=path, token=me["token"], stop=stop)
    for tmp in glob.glob(os.path.join(run_dir, "ckpt_*.tmp-*")):  # from a trainer killed while saving
        remove_checkpoint(tmp)
        log(f"removed an unfinished checkpoint of a stopped trainer: {tmp}")


def wait_for_stale_lock(path, run_dir, log):
    """Return once the lock at path is gone, or stale and removed (with a message). Stop with one line
    when its holder is still alive after LOCK_STALE_S."""
    found = read_lock(path)
    if found is None:
        return
    holder, mtime = found
    same_host = holder.get("host") == socket.gethostname()
    if same_host and not process_alive(holder.get("pid")):
        return take_over_lock(path, found, "that process is no longer running", log)
    if not same_host and time.time() - mtime > 10 * LOCK_STALE_S:  # long dead: no need to watch it
        return take_over_lock(path, found, f"not refreshed for {fmt_duration(time.time() - mtime)}", log)
    log(f"run folder '{run_dir}' is locked by {describe_holder(holder)} since {holder.get('since')}: waiting up to "
        f"{LOCK_STALE_S:g} s for it to finish{'' if same_host else ' or to stop refreshing its lock (a dead node)'}")
    deadline = time.time() + LOCK_STALE_S
    while time.time() < deadline:
        time.sleep(min(1.0, LOCK_STALE_S / 10))
        now = read_lock(path)
        if now is None or now[0].get("token") != holder.get("token"):
            return  # released, or taken by someone else: try again
        if same_host and not process_alive(holder.get("pid")):
            return take_over_lock(path, now, "that process is no longer running", log)
        if now != found and not same_host:
            fail(f"run folder '{run_dir}' is in use by {describe_holder(holder)}, which is alive (it refreshes its "
                 f"lock): two trainers must not share a run folder; let it finish or stop it, or use another exp_name")
    if not same_host:
        return take_over_lock(path, found, f"not refreshed for {LOCK_STALE_S:g} s", log)
    fail(f"run folder '{run_dir}' is in use by {describe_holder(holder)}: another trainer is running there; "
         f"let it finish or stop it, or choose another exp_name")


def take_over_lock(path, found, why, log):
    if read_lock(path) == found:  # nobody else took it over meanwhile
        os.remove(path)
        log(f"taking over the run lock of {describe_holder(found[0])}: {why}")


def process_alive(pid):
    if not isinstance(pid, int) or pid == os.getpid():
        return False  # our own pid: a lock left by an earlier process that had it (e.g. in a container)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process
    return True


def refresh_lock(path, token, stop):
    """Heartbeat thread: touch the lock while it is ours."""
    while not stop.wait(LOCK_HEARTBEAT_S):
        found = read_lock(path)
        if found is None or found[0].get("token") != token:
            return  # lost it: check_run_lock stops the next save
        with contextlib.suppress(OSError):
            os.utime(path)


def check_run_lock(run_dir):
    if not RUN_LOCK:
        return
    found = read_lock(RUN_LOCK["path"])
    if found is None or found[0].get("token") != RUN_LOCK["token"]:
        holder = describe_holder(found[0]) if found else "nobody (the lock file is gone)"
        RUN_LOCK.clear()  # not ours: never remove it
        fail(f"lost the run lock of '{run_dir}' to {holder}: another trainer took over this run folder; "
             f"stopping without saving so as not to overwrite its checkpoints")


def release_run_lock():
    if not RUN_LOCK:
        return
    RUN_LOCK["stop"].set()
    found = read_lock(RUN_LOCK["path"])
    if found is not None and found[0].get("token") == RUN_LOCK["token"]:
        os.remove(RUN_LOCK["path"])
    RUN_LOCK.clear()


# -----------------------------------------------------------------------------
# Logging.

# Dense bf16 datasheet peaks. The first key found in the device name wins, so the PCIe/NVL parts
# (lower clocks) come before the plain names (the SXM parts), and "GB200" before "B200".
# GB200: 2.5 PFLOP/s per GPU (180 for an NVL72 rack); H800 and A800: the export variants of the
# H100 and A100, with their compute.
GPU_PEAK_BF16_TFLOPS = {"GB200": 2500, "B200": 2250, "H200 NVL": 835, "H200": 989, "H100 PCIe": 756, "H100 NVL": 835,
                        "H100": 989, "H800 PCIe": 756, "H800": 989, "A100": 312, "A800": 312, "L40S": 362, "A10G": 70,
                        "L4": 121, "RTX 4090": 165, "RTX 3090": 71}


def peak_flops(device, amp_dtype):
    """Datasheet dense bf16/fp16 peak of this GPU (FLOP/s), or None when unknown (CPUs)."""
    if device.type != "cuda" or amp_dtype is None:
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in GPU_PEAK_BF16_TFLOPS.items() if key in name), None)


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def log_step(step, train_loss, grad_norm, step_s, cfg, flops_per_step, peak, world, device, log):
    """Log one training line; returns its metrics record. step_s: seconds per step since the clock restarted."""
    tokens_per_step = cfg["batch_size"] * cfg["seq_len"]
    record = {"step": step, "tokens": step * tokens_per_step, "lr": lr_at(step, cfg), "train_loss": train_loss,
              "grad_norm": grad_norm, "tokens_per_s": tokens_per_step / step_s, "step_ms": 1000 * step_s,
              "peak_mem_mb": peak_memory_mb(device)}
    mfu = f" | mfu {100 * flops_per_step / step_s / peak / world:.1f}%" if peak else ""
    log(f"step {step}/{cfg['steps']} | loss {train_loss:.4f} | lr {record['lr']:.2e} | grad {grad_norm:.3f} | "
        f"{record['tokens_per_s']:,.0f} tok/s{mfu} | {1000 * step_s:.0f} ms/step | "
        f"eta {fmt_duration(step_s * (cfg['steps'] - step))} | mem {record['peak_mem_mb']:,.0f} MB")
    return record


def fmt_duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Metrics:
    """metrics.jsonl (and W&B when enabled), written by rank 0 only."""

    def __init__(self, run_dir, cfg, start_step, enabled):
        self.enabled, self.wandb = enabled, None
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if not enabled:
            return
        if os.path.exists(self.path):
            self.keep_records_until(start_step)
        if cfg["wandb"]:
            try:
                import wandb
            except ImportError:
                fail("wandb: true but the wandb package is not installed: `pip install wandb` or set wandb: false")
            id_path = os.path.join(run_dir, "wandb_id.txt")
            if not os.path.exists(id_path):
                with open(id_path, "w") as f:
                    f.write(wandb.util.generate_id())
            with open(id_path) as f:
                run_id = f.read().strip()
            name = cfg["exp_name"] if cfg["job_idx"] is None else f"{cfg['exp_name']}/job{cfg['job_idx']}"
            self.wandb = wandb.init(project=cfg["wandb_project"], name=name, id=run_id, resume="allow", config=cfg)

    def keep_records_until(self, start_step):
        """Drop the records logged after the checkpoint we resume from. Records with no checkpoint to
        continue from (all were deleted) are moved aside, never dropped; a line cut short by a hard
        stop is skipped."""
        records, unreadable = [], 0
        with open(self.path, "rb") as f:
            for line in f:
                try:
                    record = json.loads(line)
                    records.append((record["step"], line))
                except (ValueError, KeyError, TypeError):
                    unreadable += bool(line.strip())
        if unreadable:
            print(f"warning: skipped {unreadable} unreadable line(s) of {self.path} (cut short by a hard stop?)", flush=True)
        if start_step == 0 and records:
            old = f"{self.path}.old-{time.strftime('%Y%m%d-%H%M%S')}"
            os.replace(self.path, old)
            print(f"the {len(records)} records of metrics.jsonl have no checkpoint to continue from: moved them to {old}; "
                  f"this run starts at step 0", flush=True)
            return
        with open(self.path + ".tmp", "wb") as f:
            f.writelines(line if line.endswith(b"\n") else line + b"\n" for step, line in records if step <= start_step)
        os.replace(self.path + ".tmp", self.path)

    def write(self, record):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb:
            self.wandb.log(record, step=record["step"])


# -----------------------------------------------------------------------------
# Signals: finish the current step, save, exit. SIGTERM may arrive twice (SLURM signals every
# process, then torchrun forwards its own), so it never kills the save; a second Ctrl-C does.
# The log names the first signal: the one that asked for the stop (USR1 before a time limit,
# even when the limit's own TERM follows during the save).

STOP_SIGNAL = {"name": None}


def request_stop(signum, frame):
    STOP_SIGNAL["name"] = STOP_SIGNAL["name"] or signal.Signals(signum).name
    if signum == signal.SIGINT:
        signal.signal(signum, signal.SIG_DFL)


class StopFlag:
    """Whether to stop after this step: True on every rank at the same step once any rank was
    signalled. The ranks agree over a CPU (gloo) group, in the background, and read the answer one
    step later: reading a GPU tensor every step would make the CPU wait for the GPU each time, and
    leave the GPU idle while the next step is set up. With several ranks a stop comes a step later."""

    def __init__(self, world):
        self.world, self.pending = world, None
        self.group = dist.new_group(backend="gloo") if world > 1 else None  # every rank creates it

    def __call__(self):
        signalled = STOP_SIGNAL["name"] is not None
        if self.world == 1:
            return signalled
        agreed = False
        if self.pending is not None:  # last step's question, long answered
            work, flag = self.pending
            work.wait()
            agreed = flag.item() > 0
        flag = torch.tensor([float(signalled)])
        self.pending = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag
        return agreed


# -----------------------------------------------------------------------------
# The training loop.

def train(cfg, overwrite=False):
    rank, world, device = setup_distributed(cfg)
    is_main = rank == 0

    def log(msg):
        if is_main:
            print(msg, flush=True)

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, request_stop)
    meta, train_tokens, val_tokens = open_data(cfg, world)
    run_dir = prepare_run_dir(cfg, overwrite, log) if is_main else run_dir_of(cfg)
    if world > 1:
        dist.barrier()  # the run folder exists (and was checked) before anyone reads it

    amp_dtype, precision = choose_precision(cfg, device)
    raw, model = build_model(cfg, meta["vocab_size"], device, world, amp_dtype)
    optimizer = make_optimizer(raw, cfg)
    training_mode(optimizer)
    base_lrs = [group["lr"] for group in optimizer.param_groups]  # the schedule multiplies each group's own
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    sampler = Sampler(len(train_tokens), cfg["seq_len"], cfg["seed"])
    start_step = resume_or_branch(cfg, meta, run_dir, raw, optimizer, scaler, sampler, rank, world, device, log)
    torch.manual_seed(cfg["seed"] + rank + 1000 * start_step)  # per-rank streams for anything random later

    stop_requested = StopFlag(world)
    accum = cfg["batch_size"] // (cfg["micro_batch_size"] * world)
    flops_per_step = raw.flops_per_token(cfg["seq_len"]) * cfg["batch_size"] * cfg["seq_len"]
    peak = peak_flops(device, amp_dtype)
    metrics = Metrics(run_dir, cfg, start_step, enabled=is_main)
    log(f"run {run_dir} | {raw.num_params() / 1e6:.2f}M parameters | {world} process(es) on {device.type}"
        f"{' (' + cfg['parallelism'] + ')' if world > 1 else ''} | {precision} | compile {cfg['compile']} | "
        f"batch {cfg['batch_size']} x {cfg['seq_len']} tokens = {accum} accumulation step(s) of {cfg['micro_batch_size']} per process")
    if start_step >= cfg["steps"]:
        log(f"already trained to step {start_step} (steps: {cfg['steps']}): nothing to do")
        return 0

    batches = Prefetcher(train_tokens, sampler, cfg, world, rank, device, steps=cfg["steps"] - start_step)
    # loss_sum: the losses since the last log line. The clock times the steps since it last restarted
    # (after a log line, an evaluation, a checkpoint or the first step, which compiles and allocates),
    # so tokens/s and the ETA count steady training alone.
    loss_sum, last_log_step, t_start = None, start_step, time.time()
    clock_time, clock_step = t_start, start_step
    if cfg["compile"]:
        log("compiling… (torch.compile runs during the first step; this can take a minute)")
    for step in range(start_step + 1, cfg["steps"] + 1):
        factor = lr_factor(step, cfg)
        for group, base_lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base_lr * factor
        loss, grad_norm = train_step(model, raw, optimizer, scaler, batches.next_step(), cfg, device, amp_dtype)
        loss_sum = loss if loss_sum is None else loss_sum + loss

        last = step == cfg["steps"]
        logging = step % cfg["log_every"] == 0 or last
        evaluating = (cfg["eval_every"] and step % cfg["eval_every"] == 0) or last
        stopping = stop_requested()
        saving = last or stopping or (cfg["save_every"] and step % cfg["save_every"] == 0)
        record = {}
        if logging or (saving and loss_sum is not None):  # never log or checkpoint a diverged model
            train_loss = mean_loss(loss_sum, last_log_step + 1, step, world)
        if logging:
            step_s = (time.time() - clock_time) / (step - clock_step)
            record = log_step(step, train_loss, grad_norm.item(), step_s, cfg, flops_per_step, peak, world, device, log)
            loss_sum, last_log_step = None, step
        if evaluating:
            with averaged_weights(optimizer):
                val_loss = evaluate(model, val_tokens, cfg, device, amp_dtype, rank, world)
            record.update(step=step, val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50)))
            log(f"step {step} | val loss {val_loss:.4f} | val ppl {record['val_ppl']:.2f}")
        if record:
            metrics.write(record)
        if saving:
            with averaged_weights(optimizer):
                save_checkpoint(run_dir, step, raw, optimizer, scaler, batches, cfg, meta, rank, world, cfg["keep_last"])
        if cfg["compile"] and step == start_step + 1:
            log(f"compiled: the first step took {fmt_duration(time.time() - clock_time)}")
        if logging or evaluating or saving or step == start_step + 1:  # the one place the clock restarts
            clock_time, clock_step = time.time(), step
        if stopping and not last:
            batches.close()
            log(f"{STOP_SIGNAL['name'] or 'signal on another rank'}: saved a checkpoint at step {step}; "
                f"run the same command again to continue")
            return STOPPED_EXIT_CODE
    batches.close()  # its thread has read nothing ahead since the last step

    log(f"done: {cfg['steps']} steps in {fmt_duration(time.time() - t_start)}; curves and summary: python plot.py {run_dir}")
    if cfg["sample_tokens"]:
        with averaged_weights(optimizer):
            print_sample(raw, meta, cfg, rank, world, device, amp_dtype)
    return 0


def open_data(cfg, world):
    """(meta, train tokens, val tokens), checked to hold at least one batch and one validation window."""
    meta = read_meta(cfg["data_dir"])
    train_tokens, val_tokens = open_tokens(cfg["data_dir"], "train", meta), open_tokens(cfg["data_dir"], "val", meta)
    if len(train_tokens) <= cfg["seq_len"] * cfg["batch_size"] // world:
        fail(f"train.bin in '{cfg['data_dir']}' has {len(train_tokens)} tokens, too few for one batch of "
             f"{cfg['batch_size']} x {cfg['seq_len']}: use more data or a smaller batch_size/seq_len")
    if len(val_tokens) <= cfg["seq_len"]:
        fail(f"val.bin in '{cfg['data_dir']}' has {len(val_tokens)} tokens, fewer than seq_len {cfg['seq_len']}")
    return meta, train_tokens, val_tokens


def mean_loss(loss_sum, first, step, world):
    """Mean training loss of steps first..step over all ranks. A loss that is not finite stops the
    run here, before it is logged or checkpointed, so the last checkpoint stays a good one."""
    total = loss_sum.detach().clone()
    if world > 1:
        dist.all_reduce(total, op=dist.ReduceOp.AVG)
    loss = total.item() / (step - first + 1)
    if not math.isfinite(loss):
        where = f"at step {step}" if first == step else f"between steps {first} and {step}"
        fail(f"loss is {loss} {where}; the last good checkpoint is kept: lower lr or raise warmup_steps, then resume")
    return loss


def resume_or_branch(cfg, meta, run_dir, raw, optimizer, scaler, sampler, rank, world, device, log):
    """Continue this run from its newest good checkpoint; else branch from init_from; else start fresh.
    Rank 0 reads the run folder and the checkpoint, and the other ranks take what it found (a full
    checkpoint's tensors by broadcast), so they cannot start over next to a resumed rank 0; only a sharded
    checkpoint must be on a filesystem every node reads. Then record the config in config.yaml. Returns
    the number of steps already trained."""
    found = [None]
    if rank == 0:
        try:
            path, ckpt, damaged, how = choose_start(cfg, meta, run_dir, raw, log)
            found = [(path, ckpt and {k: v for k, v in ckpt.items() if k not in ("model", "optimizer")}, how, None)]
        except SystemExit as e:
            found = [(None, None, None, str(e))]
    if world > 1:
        dist.broadcast_object_list(found, src=0)
    path, header, how, error = found[0]
    if error:
        raise SystemExit(error)  # on every rank
    if rank != 0:  # the tensors of a full checkpoint come with restore()
        ckpt = header and {**header, "model": {}, "optimizer": {}}
    if ckpt is not None and "sharded" in ckpt and world > 1:
        seen = torch.tensor([float(os.path.isfile(os.path.join(ckpt["sharded"], ".metadata")))], device=device)
        dist.all_reduce(seen, op=dist.ReduceOp.MIN)
        if not seen.item():
            fail(f"some processes cannot see the sharded checkpoint {path}: put out_dir on a filesystem that every "
                 f"node can read")
    start_step = 0
    if ckpt is not None:
        restore(ckpt, raw, optimizer, scaler, sampler, rank, world)
        start_step = ckpt["step"]
        log(f"{how} from {path} at step {start_step}")
    if rank == 0:
        set_aside_damaged(damaged, path, log)
        write_run_config(cfg, run_dir)
    return start_step


def choose_start(cfg, meta, run_dir, raw, log):
    """(path, checkpoint, damaged newer checkpoints, "resumed" or "branched") to start from, checked
    against this run; the checkpoint is None for a fresh start."""
    path, ckpt, damaged = checkpoint_to_resume(run_dir, log) if cfg["resume"] == "auto" else (None, None, [])
    how = "resumed"
    if ckpt is not None:
        check_same_run(cfg, meta, ckpt, path)
    if ckpt is None and cfg["init_from"]:
        try:
            path, ckpt = find_checkpoint(cfg["init_from"], log)
        except ValueError as e:
            fail(f"init_from: {e}")
        how = "branched"
        if ckpt["config"].get("optimizer", "adamw") != cfg["optimizer"]:
            fail(f"init_from: {path} was trained with optimizer '{ckpt['config'].get('optimizer', 'adamw')}', this run uses "
                 f"'{cfg['optimizer']}': its optimizer state does not carry over; branch with the same optimizer")
    if ckpt is not None and ckpt["model_config"] != dataclasses.asdict(raw.cfg):
        fail(f"checkpoint {path} holds a different model shape than this config: {ckpt['model_config']}")
    return path, ckpt, damaged, how


def print_sample(raw, meta, cfg, rank, world, device, amp_dtype):
    """Rank 0 streams a sample from the end-of-text token, as sample.py does. An FSDP model is first
    gathered whole onto rank 0 (all ranks take part): generating with the sharded model would need
    every rank in every forward pass, token after token."""
    from prepare import tokenizer_from_meta
    from sample import generate_streaming
    if world > 1 and cfg["parallelism"] == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(raw, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            raw = Transformer(raw.cfg, fast_ops=cfg["fast_ops"])
            raw.load_state_dict(state)
            raw.to(device)
    if rank != 0:
        return
    tokenizer = tokenizer_from_meta(meta)
    torch.manual_seed(0)
    print("---- sample ----", flush=True)
    with autocast(device, amp_dtype if device.type == "cuda" else None):  # as trained; CPU autocast is slow
        generate_streaming(raw.eval(), tokenizer, [tokenizer.eot_id], cfg["sample_tokens"], temperature=0.8, top_k=200,
                           write=lambda text: print(text, end="", flush=True))
    print("\n----------------", flush=True)


def parse_args(argv):
    keys = "\n".join(f"  {key:<17} {str(default):<22} {text}" for key, (default, _, text) in CONFIG.items())
    parser = argparse.ArgumentParser(
        description="Train a Transformer language model. Settings come from the YAML file, then --key=value overrides.",
        epilog=f"config keys (--key=value overrides any of them):\n  {'key':<17} {'default':<22} meaning\n{keys}\n\n"
               f"exit status: 0 when training is finished, {STOPPED_EXIT_CODE} when stopped by a signal after saving "
               f"a checkpoint (run the same command again to continue).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="YAML config file (a sweep file needs --job_idx)")
    parser.add_argument("--job_idx", type=int, help="which job of a sweep config to train (see sweep.py)")
    parser.add_argument("--overwrite", action="store_true",
                        help="if the run folder holds a different config, move it aside and start over")
    parser.add_argument("--print_config", action="store_true",
                        help="print the resolved config (defaults filled in, checked) as YAML and exit without training")
    parser.add_argument("--check_jobs", action="store_true",
                        help="check the config of every job of a sweep file (as --job_idx would) and exit: "
                             "0 when all are valid, else one error line naming the first bad job")
    args, overrides = parser.parse_known_args(argv)
    if args.config is None and not overrides and not args.print_config and not args.check_jobs:
        # Without a file or a single key there is nothing to say which run is meant: starting the
        # built-in defaults into runs/run would be a surprise, not a choice.
        parser.print_usage(sys.stderr)
        parser.exit(2, f"train.py: error: give a config file. Quick start:\n  {QUICK_START}\n"
                       "`python train.py --help` lists every key.\n")
    return args, overrides


QUICK_START = ("python prepare.py --source shakespeare --tokenizer char --out data/shakespeare_char && "
               "python train.py configs/shakespeare_char.yaml")


def check_jobs(path, overrides):
    """Load every job of a (sweep) config file as training it would; fail naming the first bad one."""
    raw = sweep.load_yaml(path) if path else {}
    n_jobs = sweep.count(raw)
    for job in range(n_jobs):
        try:
            load_config(path, overrides, job if n_jobs > 1 else None)
        except SystemExit as e:
            what = f"job {job} ({', '.join(f'{k}={v}' for k, v in sweep.varying(raw, job).items())})" if n_jobs > 1 else path
            fail(f"{what}: {str(e).removeprefix('train.py: error: ')}")
    return n_jobs


def main(argv=None):
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if args.check_jobs:
        print(f"{check_jobs(args.config, overrides)} job(s) checked")
        return 0
    cfg = load_config(args.config, overrides, args.job_idx)
    if args.print_config:  # block YAML of the config keys alone, so the output is itself a config file
        print(yaml.safe_dump({key: cfg[key] for key in CONFIG}, sort_keys=False, default_flow_style=False), end="")
        return 0
    try:
        code = train(cfg, args.overwrite)
    finally:
        release_run_lock()
        if dist.is_initialized():
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
