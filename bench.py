"""Measure how fast a config trains: tokens/s, MFU, memory and start-up time, optionally side by
side with Hugging Face's LlamaForCausalLM of the same shape.

    python bench.py configs/bench_cpu.yaml --data dummy --vocab_size 65 --measure_peak
    python bench.py configs/bench_cpu.yaml --data dummy --vocab_size 65 --compile=true --compare hf
    python bench.py configs/shakespeare_char.yaml --ops
    python bench.py --prepare shakespeare
    python bench.py configs/bench_cpu.yaml --checkpoint --vocab_size 65 --d_model=512 --n_heads=8 --n_layers=8
    python bench.py configs/time_to_loss_cpu.yaml --time_to_loss --recipe "optimizer=adamw" --recipe "optimizer=muon"

The step it times is train.py's own: the same config keys, data sampler, model build (compile,
precision), optimizer and train_step. Our model and the Hugging Face one run in the same process,
round by round (ours, hf | hf, ours | ...), because the speed of a shared machine drifts from
minute to minute; reported speeds are medians over the rounds that had the machine to themselves
(on CPU: the process got >= 90% of its threads' time). The last line printed is one JSON object
with every number, for scripts.
"""
import time

START = time.time()  # before torch is imported: `startup_s` counts the imports too

import argparse
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys

import numpy as np
import torch

from fast_ops import linear
from train import (GPU_PEAK_BF16_TFLOPS, Sampler, build_model, choose_precision, find_checkpoint, get_windows,
                   load_config, lr_factor, make_optimizer, model_config, model_weights, open_tokens, peak_flops,
                   peak_memory_mb, read_meta, setup_distributed, train_step, training_mode)


def fail(msg):
    raise SystemExit(f"bench.py: error: {msg}")


# -----------------------------------------------------------------------------
# Data: the config's train.bin, or random tokens of the config's vocabulary. Either way the
# batches go through train.py's Sampler and get_windows, so data_ms is what training waits.

def open_data(cfg, args):
    """(token array, vocab_size, description)."""
    if args.data == "dummy":
        vocab_size = args.vocab_size
        if vocab_size is None:
            if not os.path.isfile(os.path.join(cfg["data_dir"], "meta.json")):
                fail(f"--data dummy needs the vocabulary size: pass --vocab_size N (or set data_dir to a "
                     f"folder with meta.json; '{cfg['data_dir']}' has none)")
            vocab_size = read_meta(cfg["data_dir"])["vocab_size"]
        if vocab_size < 2:
            fail(f"--vocab_size must be at least 2, got {vocab_size}")
        n_tokens = 8 * cfg["batch_size"] * cfg["seq_len"] + 1  # the sampler cycles through epochs
        dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
        tokens = np.random.default_rng(cfg["seed"]).integers(0, vocab_size, n_tokens).astype(dtype)
        return tokens, vocab_size, f"dummy tokens (vocab {vocab_size})"
    if args.vocab_size is not None:
        fail("--vocab_size only applies to --data dummy (real data brings its vocabulary in meta.json)")
    meta = read_meta(cfg["data_dir"])
    tokens = open_tokens(cfg["data_dir"], "train", meta)
    if len(tokens) <= cfg["seq_len"] * cfg["batch_size"]:
        fail(f"train.bin in '{cfg['data_dir']}' has {len(tokens)} tokens, too few for one batch of "
             f"{cfg['batch_size']} x {cfg['seq_len']}: use more data, a smaller batch_size/seq_len, or --data dummy")
    return tokens, meta["vocab_size"], f"{cfg['data_dir']} ({meta['tokenizer']}, vocab {meta['vocab_size']})"


# -----------------------------------------------------------------------------
# The two models. Hugging Face's gets our call signature, model(x, y) -> (logits, loss), so the
# very same train_step (and optimizer, param groups, clipping) drives both.

class HFLlama(torch.nn.Module):
    def __init__(self, hf_model):
        super().__init__()
        self.hf = hf_model

    def forward(self, idx, targets):
        # shift_labels: y is already x shifted by one; without it HF would shift a second time.
        # (HF views the labels flat, so they must be contiguous; its own shifting makes them so.)
        targets = targets.contiguous()
        out = self.hf(input_ids=idx, labels=targets, shift_labels=targets)
        return out.logits, out.loss


def build_hf(cfg, vocab_size, device):
    """(raw, model to call) for transformers.LlamaForCausalLM with our exact architecture."""
    if cfg["mlp"] != "glu" or cfg["qk_norm"]:
        fail("--compare hf needs mlp: glu and qk_norm: false (Llama has neither ReLU² nor QK-norm)")
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        fail("--compare hf needs the transformers package: `pip install transformers`")
    c = model_config(cfg, vocab_size)
    hf_config = LlamaConfig(
        vocab_size=c.padded_vocab,  # ours pads the head to this too (its loss reads only vocab_size columns)
        hidden_size=c.d_model, intermediate_size=c.d_ff, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        hidden_act="silu", max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta, tie_word_embeddings=c.tie_embeddings, attention_bias=False,
        mlp_bias=False, use_cache=False,  # training keeps no KV cache
        attn_implementation="sdpa")
    torch.manual_seed(cfg["seed"])
    raw = HFLlama(LlamaForCausalLM(hf_config)).to(device)
    return raw, (torch.compile(raw) if cfg["compile"] else raw)


def make_side(name, cfg, data, device, amp_dtype):
    """Everything one model needs to take training steps, from a fresh start."""
    tokens, vocab_size, _ = data
    t0 = time.time()
    if name == "ours":
        raw, model = build_model(cfg, vocab_size, device, 1, amp_dtype)
    else:
        raw, model = build_hf(cfg, vocab_size, device)
    optimizer = make_optimizer(raw, cfg)
    training_mode(optimizer)  # schedule-free AdamW steps only in train mode
    side = {"name": name, "raw": raw, "model": model, "optimizer": optimizer,
            "base_lrs": [group["lr"] for group in optimizer.param_groups],
            "scaler": torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
            "sampler": Sampler(len(tokens), cfg["seq_len"], cfg["seed"]), "step": 0,
            "rounds": [], "build_start": t0}
    side["params"] = sum(p.numel() for p in {id(p): p for p in raw.parameters()}.values())
    return side


def run_steps(side, n, cfg, data, device, amp_dtype):
    """n training steps exactly as train.py takes them.
    Returns (seconds, seconds spent on data, CPU seconds of this process)."""
    tokens = data[0]
    accum = cfg["batch_size"] // cfg["micro_batch_size"]
    data_s, t0, cpu0 = 0.0, time.perf_counter(), time.process_time()
    for _ in range(n):
        side["step"] += 1
        for group, base_lr in zip(side["optimizer"].param_groups, side["base_lrs"]):
            group["lr"] = base_lr * lr_factor(side["step"], cfg)
        t_data = time.perf_counter()
        ids = side["sampler"].next_ids(cfg["batch_size"]).reshape(accum, cfg["micro_batch_size"])
        micro_batches = [get_windows(tokens, micro_ids, cfg["seq_len"], device) for micro_ids in ids]
        data_s += time.perf_counter() - t_data
        loss, _ = train_step(side["model"], side["raw"], side["optimizer"], side["scaler"], micro_batches,
                             cfg, device, amp_dtype)
    if not torch.isfinite(loss).item():  # .item() also waits for the GPU
        fail(f"{side['name']}: loss is {loss.item()} after {side['step']} steps")
    return time.perf_counter() - t0, data_s, time.process_time() - cpu0


def measure_round(side, cfg, data, device, amp_dtype, steps):
    seconds, data_s, cpu_s = run_steps(side, steps, cfg, data, device, amp_dtype)
    # CPU seconds per second: on a CPU run, fewer cores than threads means other processes took
    # some of the machine during this round (so its tokens/s is low for a reason beyond the model).
    side["rounds"].append({"tokens_per_s": steps * cfg["batch_size"] * cfg["seq_len"] / seconds,
                           "data_ms": 1000 * data_s / steps, "cores": cpu_s / seconds})


def warm_up(side, cfg, data, device, amp_dtype, warmup):
    """The first step (build, compile, first allocations) is timed as first_step_s; the rest untimed."""
    run_steps(side, 1, cfg, data, device, amp_dtype)
    side["first_step_s"] = time.time() - side["build_start"]
    if warmup > 1:
        run_steps(side, warmup - 1, cfg, data, device, amp_dtype)


# -----------------------------------------------------------------------------
# Peak FLOP/s: measured with a large matmul, or from the datasheet table in train.py.

PEAK_MATMUL_SIZE = {"cuda": 8192, "cpu": 3072}  # large enough to reach the peak, quick to run


def measure_peak_flops(device, amp_dtype):
    """{"mm": FLOP/s, "linear": FLOP/s}: the best of three n x n x n matmuls in the run's dtype
    through torch.mm and through fast_ops.linear (oneDNN on x86 CPUs, where it beats torch.mm's
    MKL). The larger is what this device can deliver. A shared CPU's rate drifts, so this is
    measured every round and the best round counts."""
    n = PEAK_MATMUL_SIZE[device.type]
    reps = 20 if device.type == "cuda" else 1
    dtype = amp_dtype or torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = {}
    for name, matmul in (("mm", torch.mm), ("linear", linear)):
        matmul(a, b).sum().item()  # warm-up; .item() waits for the GPU
        best[name] = 0.0
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(reps):
                out = matmul(a, b)
            out.sum().item()
            best[name] = max(best[name], 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    return f"cpu: {model}, {torch.get_num_threads()} threads"


# -----------------------------------------------------------------------------
# Peak memory of Hugging Face's model, in a process of its own: a process's peak RSS only grows,
# so measured in this one it would include ours (and ours is read before transformers is loaded).

def hf_peak_memory_in_child(argv):
    cmd = [sys.executable, os.path.abspath(__file__)] + argv + ["--_worker=hf"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        print(f"warning: measuring HF's peak memory in a subprocess failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        return None
    return json.loads(lines[-1])["peak_mem_mb"]


def worker(cfg, args, data, device, amp_dtype):
    """Hidden mode for the child above: warm-up and one round of one model, then its peak memory."""
    side = make_side(args._worker, cfg, data, device, amp_dtype)
    warm_up(side, cfg, data, device, amp_dtype, args.warmup)
    run_steps(side, args.steps, cfg, data, device, amp_dtype)
    print(json.dumps({"peak_mem_mb": round(peak_memory_mb(device), 1)}))
    return 0


# -----------------------------------------------------------------------------
# The benchmark.

def is_quiet(round_, device):
    """Whether a round had the machine to itself: on CPU, this process got at least 90% of its
    threads' time (other jobs on a shared machine slow the rest for reasons unrelated to the model)."""
    return device.type != "cpu" or round_["cores"] >= 0.9 * torch.get_num_threads()


def summarize(side, flops_per_token, peak, tokens_per_step, device):
    """Medians over the quiet rounds, or over all rounds when none was quiet (quiet_rounds 0)."""
    quiet = [r for r in side["rounds"] if is_quiet(r, device)]
    rounds = quiet or side["rounds"]
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in rounds)
    step_ms = 1000 * tokens_per_step / tokens_per_s  # the median round's, so the two agree
    achieved = flops_per_token * tokens_per_s
    return {"tokens_per_s": round(tokens_per_s, 1), "step_ms": round(step_ms, 2),
            "achieved_tflops": round(achieved / 1e12, 4), "mfu": round(achieved / peak, 4) if peak else None,
            "first_step_s": round(side["first_step_s"], 2),
            "data_ms": round(statistics.median(r["data_ms"] for r in rounds), 3), "quiet_rounds": len(quiet),
            "tokens_per_s_rounds": [round(r["tokens_per_s"], 1) for r in side["rounds"]],
            "cores_used_rounds": [round(r["cores"], 2) for r in side["rounds"]]}


def speedup(ours, hf, device):
    """Ours / HF tokens/s: the median over rounds in which both were quiet (each pair ran back to
    back, so saw the same machine); else the ratio of the two medians."""
    pairs = [(a, b) for a, b in zip(ours["rounds"], hf["rounds"]) if is_quiet(a, device) and is_quiet(b, device)]
    if pairs:
        return statistics.median(a["tokens_per_s"] / b["tokens_per_s"] for a, b in pairs)
    return None


def bench(cfg, args, argv):
    if "RANK" in os.environ or int(os.environ.get("SLURM_STEP_NUM_TASKS", 1)) > 1:
        fail("bench.py measures one device: run it as a single process (not under torchrun or a multi-task srun)")
    _, _, device = setup_distributed(cfg)  # on CUDA it also turns TF32 on, as for training
    amp_dtype, precision = choose_precision(cfg, device)
    data = open_data(cfg, args)
    if args._worker:
        return worker(cfg, args, data, device, amp_dtype)

    # A benchmark takes minutes: say what it does at once, then one line per round.
    print(f"bench: {args.config} | {device_name(device)} | {precision} | compile {cfg['compile']} | "
          f"{args.warmup} warm-up step(s), then {args.rounds} round(s) of {args.steps} step(s)"
          f"{' | vs HF Llama, interleaved' if args.compare else ''}", flush=True)
    ours = make_side("ours", cfg, data, device, amp_dtype)
    warm_up(ours, cfg, data, device, amp_dtype, args.warmup)
    startup_s = time.time() - START
    print(f"ours: {ours['params'] / 1e6:.2f}M parameters; build{', compile' if cfg['compile'] else ''} and first step "
          f"{ours['first_step_s']:.1f} s", flush=True)
    measure_round(ours, cfg, data, device, amp_dtype, args.steps)
    ours_mem = peak_memory_mb(device)  # read now: nothing else has been built in this process yet
    hf = None
    if args.compare == "hf":
        hf = make_side("hf", cfg, data, device, amp_dtype)
        if hf["params"] != ours["params"]:
            fail(f"internal: HF model has {hf['params']} parameters, ours {ours['params']}")
        warm_up(hf, cfg, data, device, amp_dtype, args.warmup)
        print(f"hf: build{', compile' if cfg['compile'] else ''} and first step {hf['first_step_s']:.1f} s", flush=True)

    peaks = []
    for r in range(args.rounds):
        if args.measure_peak:
            peaks.append(measure_peak_flops(device, amp_dtype))
        # Alternate who goes first (ours, hf | hf, ours | ...) so that neither always follows the
        # peak probe or always runs at the same point of another job's cycle. Round 0 of ours ran above.
        for side in ([ours, hf] if r % 2 == 0 else [hf, ours]):
            if side is not None and not (side is ours and r == 0):
                measure_round(side, cfg, data, device, amp_dtype, args.steps)
        print(f"round {r + 1}/{args.rounds}: " + " | ".join(
            f"{side['name']} {side['rounds'][r]['tokens_per_s']:,.0f} tok/s" +
            (f" ({side['rounds'][r]['cores']:.1f} cores)" if device.type == "cpu" else "") for side in (ours, hf) if side)
            + (f" | matmul peak {max(peaks[-1].values()) / 1e12:.3g} TFLOP/s" if peaks else ""), flush=True)

    peak_mm = None
    if peaks:
        peak_mm, peak = max(p["mm"] for p in peaks), max(max(p.values()) for p in peaks)
        peak_source = (f"measured: best {PEAK_MATMUL_SIZE[device.type]}^3 matmul of {len(peaks)} rounds, through "
                       f"torch.mm {peak_mm / 1e12:.4g} or fast_ops.linear {max(p['linear'] for p in peaks) / 1e12:.4g}")
    else:
        peak = peak_flops(device, amp_dtype)
        peak_source = "datasheet bf16/fp16 dense peak" if peak else None
    flops_per_token = ours["raw"].flops_per_token(cfg["seq_len"])
    result = summarize(ours, flops_per_token, peak, cfg["batch_size"] * cfg["seq_len"], device)
    result.update(flops_per_token=flops_per_token, peak_mem_mb=round(ours_mem, 1), startup_s=round(startup_s, 2),
                  peak_tflops=round(peak / 1e12, 4) if peak else None, peak_source=peak_source,
                  peak_mm_tflops=round(peak_mm / 1e12, 4) if peak_mm else None,
                  mfu_vs_mm=round(flops_per_token * result["tokens_per_s"] / peak_mm, 4) if peak_mm else None,
                  device=device_name(device), precision=precision, compile=cfg["compile"],
                  dtype={None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype],
                  params=ours["params"], tokens_per_step=cfg["batch_size"] * cfg["seq_len"],
                  steps=args.steps, warmup=args.warmup, rounds=args.rounds, data=data[2])
    if hf:
        hf_result = summarize(hf, flops_per_token, peak, cfg["batch_size"] * cfg["seq_len"], device)
        hf_result["peak_mem_mb"] = hf_peak_memory_in_child(argv)
        result.update({f"hf_{key}": value for key, value in hf_result.items()})
        paired = speedup(ours, hf, device)
        result["speedup_vs_hf"] = round(paired or result["tokens_per_s"] / hf_result["tokens_per_s"], 3)
        result["mem_ratio_vs_hf"] = (round(result["peak_mem_mb"] / hf_result["peak_mem_mb"], 3)
                                     if hf_result["peak_mem_mb"] else None)
    print_table(result, cfg, args, hf is not None)
    print(json.dumps(result), flush=True)
    return 0


def print_table(res, cfg, args, with_hf):
    print(f"bench: {args.config or '(defaults)'} | {res['device']} | {res['precision']} | compile {res['compile']} | "
          f"{res['params'] / 1e6:.2f}M parameters | {cfg['batch_size']} x {cfg['seq_len']} = {res['tokens_per_step']:,} "
          f"tokens/step | {res['data']}")
    line = f"{args.rounds} round(s) of {args.steps} step(s) after {args.warmup} warm-up step(s)"
    if res["device"].startswith("cpu"):
        counts = [res["quiet_rounds"]] + ([res["hf_quiet_rounds"]] if with_hf else [])
        line += (f"; medians over the quiet rounds ({'/'.join(map(str, counts))}: this process got >= 90% of "
                 f"{torch.get_num_threads()} cores)")
        if 0 in counts:
            line += "\nwarning: the machine was busy in every round of a model, so its medians are over all rounds and too low"
    else:
        line += "; medians over rounds"
    print(line)
    if res["peak_tflops"]:
        print(f"peak: {res['peak_tflops']:.4g} TFLOP/s, {res['peak_source']}")
        if res["mfu_vs_mm"] is not None and res["peak_mm_tflops"] < res["peak_tflops"]:
            print(f"      (MFU below is against the faster one; against torch.mm's alone ours would be {res['mfu_vs_mm']:.1%})")
    else:
        print("peak: unknown for this device, so no MFU: pass --measure_peak")
    rows = [("tokens/s", "tokens_per_s", "{:,.0f}"), ("step ms", "step_ms", "{:,.1f}"),
            ("achieved TFLOP/s", "achieved_tflops", "{:.4g}"), ("MFU", "mfu", "{:.1%}"),
            ("peak memory MB", "peak_mem_mb", "{:,.0f}"), ("first step s", "first_step_s", "{:.2f}"),
            ("data ms/step", "data_ms", "{:.3f}")]
    print(f"{'':<18}{'ours':>12}" + (f"{'hf':>12}{'ours/hf':>10}" if with_hf else ""))
    for label, key, fmt in rows:
        line = f"{label:<18}{fmt_or_dash(fmt, res[key]):>12}"
        if with_hf:
            hf_value = res[f"hf_{key}"]
            ratio = res[key] / hf_value if hf_value and res[key] is not None and key != "mfu" else None
            if key == "tokens_per_s":
                ratio = res["speedup_vs_hf"]  # paired rounds: see speedup()
            line += f"{fmt_or_dash(fmt, hf_value):>12}{fmt_or_dash('{:.2f}x', ratio):>10}"
        print(line)
    for prefix, name in (("", "ours"),) + ((("hf_", "hf"),) if with_hf else ()):
        rounds = zip(res[prefix + "tokens_per_s_rounds"], res[prefix + "cores_used_rounds"])
        print(f"{'rounds ' + name:<18}" + "  ".join(f"{t:,.0f} tok/s" + (f" ({c:.1f} cores)" if res["device"].startswith("cpu") else "")
                                                for t, c in rounds))
    print(f"flops/token {res['flops_per_token']:,} | data wait {100 * res['data_ms'] / res['step_ms']:.3f}% of a step | "
          f"start-up to first step done {res['startup_s']:.1f} s")


def fmt_or_dash(fmt, value):
    return "-" if value is None else fmt.format(value)


# -----------------------------------------------------------------------------
# --ops: each of fast_ops.py's pieces against model.py's plain one, at the config's shape.

def bench_ops(cfg, args):
    """Forward + backward of each piece, plain and fast, interleaved for --rounds rounds (medians),
    on this config's micro-batch: the measurements fast_ops.py's size thresholds rest on."""
    import torch.nn.functional as F

    import fast_ops
    import model
    if not fast_ops.ONEDNN:
        fail("--ops: fast_ops.py is used on x86 CPUs only (no oneDNN linear here)")
    torch.manual_seed(cfg["seed"])
    c = model_config(cfg, vocab_size=256)
    n, d, hd = cfg["micro_batch_size"] * cfg["seq_len"], c.d_model, c.head_dim
    leaf = lambda *shape: torch.randn(*shape).requires_grad_()  # noqa: E731
    x, h, gate, up, w = leaf(n, d), leaf(n, c.d_ff), leaf(n, c.d_ff), leaf(n, c.d_ff), leaf(d)
    w_dd, w_down = (0.05 * torch.randn(d, d)).requires_grad_(), (0.05 * torch.randn(d, c.d_ff)).requires_grad_()
    q = torch.randn(cfg["micro_batch_size"], cfg["seq_len"], c.n_heads, hd).transpose(1, 2).requires_grad_()
    cos, sin = model.rope_tables(hd, cfg["seq_len"], c.rope_theta)
    g_d, g_q = torch.randn(n, d), torch.randn_like(q)
    norm = model.RMSNorm(d, c.norm_eps)
    ops = {  # name: (input whose size decides, plain, fast, does fast_ops use the fast one at this size)
        f"linear {n}x{d} -> {d}": (lambda: F.linear(x, w_dd).backward(g_d), lambda: fast_ops.onednn_linear(x, w_dd).backward(g_d),
                                   x.numel() >= fast_ops.MIN_MATMUL_INPUT),
        f"linear {n}x{c.d_ff} -> {d}": (lambda: F.linear(h, w_down).backward(g_d),
                                        lambda: fast_ops.onednn_linear(h, w_down).backward(g_d), h.numel() >= fast_ops.MIN_MATMUL_INPUT),
        f"rmsnorm {n}x{d}": (lambda: norm(x).backward(g_d), lambda: fast_ops.RMSNormFunction.apply(x, norm.weight, c.norm_eps).backward(g_d),
                             True),
        f"rope {tuple(q.shape)}": (lambda: model.apply_rope(q, cos, sin).backward(g_q),
                                   lambda: fast_ops.RoPEFunction.apply(q, cos, sin).backward(g_q), True),
        f"swiglu+down {n}x{c.d_ff}": (lambda: F.linear(F.silu(gate) * up, w_down).backward(g_d),
                                      lambda: fast_ops.SwiGLUDown.apply(gate, up, w_down).backward(g_d),
                                      gate.numel() >= fast_ops.MIN_MATMUL_INPUT),
    }
    # Enough calls per round for ~0.1 s of each, from one timed call.
    times = {name: {"plain": [], "fast": []} for name in ops}
    print(f"bench --ops: {args.config} | {device_name(torch.device('cpu'))} | micro-batch {cfg['micro_batch_size']} x "
          f"{cfg['seq_len']} | {args.rounds} interleaved round(s) ...", flush=True)
    for r in range(args.rounds):
        for name, (plain, fast, _) in ops.items():
            for kind, fn in (("plain", plain), ("fast", fast)) if r % 2 == 0 else (("fast", fast), ("plain", plain)):
                fn()
                t0 = time.perf_counter()
                fn()
                calls = max(1, int(0.1 / max(time.perf_counter() - t0, 1e-6)))
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                times[name][kind].append(1000 * (time.perf_counter() - t0) / calls)
    rows = []
    print(f"{'op (forward + backward)':<34}{'plain ms':>10}{'fast ms':>10}{'plain/fast':>12}  fast_ops uses")
    for name, (_, _, used) in ops.items():
        plain, fast = (statistics.median(times[name][k]) for k in ("plain", "fast"))
        rows.append({"op": name, "plain_ms": round(plain, 4), "fast_ms": round(fast, 4), "speedup": round(plain / fast, 3),
                     "fast_used": used})
        print(f"{name:<34}{plain:>10.3f}{fast:>10.3f}{plain / fast:>11.2f}x  {'fast' if used else 'plain'}")
    print(json.dumps({"ops": rows, "rounds": args.rounds, "tokens": n}), flush=True)
    return 0


# -----------------------------------------------------------------------------
# --gpu_check: everything a CPU cannot show, in one run of a few minutes on one GPU.

def check_data(folder, vocab_size=50257):
    """A data folder in prepare.py's format that needs no network: the bytes of Python's own sources as
    token ids spread over GPT-2's vocabulary (the 'dummy' tokenizer prints ids), so a GPT-2-shaped
    model has real text to learn from."""
    import glob
    paths = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "**", "*.py"), recursive=True))
    pieces, size = [], 0
    for path in paths:
        with open(path, "rb") as f:
            pieces.append(f.read())
        size += len(pieces[-1])
        if size > 24_000_000:
            break
    ids = np.frombuffer(b"".join(pieces), dtype=np.uint8).astype(np.uint16) * 193  # < 50256: the dummy end-of-text id
    split = len(ids) * 19 // 20
    os.makedirs(folder, exist_ok=True)
    ids[:split].tofile(os.path.join(folder, "train.bin"))
    ids[split:].tofile(os.path.join(folder, "val.bin"))
    meta = {"format": 1, "complete": True, "tokenizer": "dummy", "vocab_size": vocab_size, "eot_id": vocab_size - 1,
            "dtype": "uint16", "source": "bench.py --gpu_check: Python's sources", "args": {},
            "splits": {"train": {"tokens": split, "docs": 1}, "val": {"tokens": len(ids) - split, "docs": 1}}}
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f)


def cuda_unit_checks(device):
    """The model's CUDA paths against fp32 references: bf16 autocast forward and backward, the chunked
    loss, generation with the KV cache, and what choose_precision and the MFU table say about this GPU."""
    from model import ModelConfig, Transformer
    from train import autocast
    out = {}
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50257, d_model=256, n_layers=2, n_heads=4, max_seq_len=256)
    ref, gpu = Transformer(cfg, fast_ops=False), Transformer(cfg).to(device)
    gpu.load_state_dict(ref.state_dict())
    x, y = torch.randint(0, 50257, (4, 256)), torch.randint(0, 50257, (4, 256))
    _, loss_ref = ref(x, y)
    loss_ref.backward()
    with autocast(device, torch.bfloat16):
        _, loss = gpu(x.to(device), y.to(device))  # 4 x 256 x 50304 logits: the chunked loss (fast_ops)
    loss.backward()
    out["bf16_loss_rel_err"] = abs(loss.item() - loss_ref.item()) / loss_ref.item()
    grad_err = max((a.grad.cpu() - b.grad).norm().item() / b.grad.norm().item()
                   for a, b in zip(gpu.parameters(), ref.parameters()))
    out["bf16_grad_rel_err_max"] = grad_err
    prompt = torch.randint(0, 50257, (2, 8))
    greedy_ref = ref.generate(prompt, 16, temperature=0)
    out["generate_fp32_equals_cpu"] = torch.equal(gpu.generate(prompt.to(device), 16, temperature=0).cpu(), greedy_ref)
    with autocast(device, torch.bfloat16):
        out["generate_bf16_runs"] = gpu.generate(prompt.to(device), 16, temperature=0.8, top_k=50).shape == (2, 24)
    out["bf16_native"] = torch.cuda.is_bf16_supported(including_emulation=False)
    out["datasheet_peak_tflops"] = (peak_flops(device, torch.bfloat16) or 0) / 1e12 or None
    out["ok"] = out["bf16_loss_rel_err"] < 1e-2 and grad_err < 5e-2 and out["generate_bf16_runs"] and out["bf16_native"]
    return out


def sync_free_training(data, out_dir):
    """train.py in this process, GPT-2-small shape, bf16, compiled, under torch.cuda.set_sync_debug_mode:
    every operation that makes the CPU wait for the GPU is recorded with the step it happened in.
    Only the log steps may wait (they read the loss); the loss must fall well below chance."""
    import warnings
    import train
    steps, log_every, syncs, current = 120, 40, [], [0]
    real_step = train.train_step

    def counting_step(*args):
        current[0] += 1
        return real_step(*args)

    def record(message, *args, **kwargs):
        if "synchronizing" in str(message):
            syncs.append(current[0])

    train.train_step = counting_step
    warnings.showwarning, real_show = record, warnings.showwarning
    config = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "gpt2_small.yaml")
    argv = [config, f"--data_dir={data}", f"--out_dir={out_dir}", "--exp_name=gpt2_small",
            f"--steps={steps}", "--batch_size=32", "--micro_batch_size=16", "--warmup_steps=10", "--lr=1e-3",
            f"--log_every={log_every}", "--eval_every=0", "--eval_tokens=65536", "--save_every=0"]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            code = train.main(argv)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        train.train_step, warnings.showwarning = real_step, real_show
    with open(os.path.join(out_dir, "gpt2_small", "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    # Step "0" is the set-up before the first step; step 1 allocates and compiles; log steps read the
    # loss; the last step also evaluates and saves.
    allowed = {0, 1, steps} | set(range(log_every, steps + 1, log_every))
    falls = losses[-1] < math.log(50257) - 3  # from chance (10.8 nats) to below 7.8 on Python's byte-level text
    return {"exit": code, "losses": [round(loss, 3) for loss in losses], "loss_falls": falls,
            "steps_with_host_syncs": sorted(set(syncs)), "syncs_outside_log_steps": sorted(set(syncs) - allowed),
            "tokens_per_s_logged": records[-1].get("tokens_per_s"), "peak_mem_mb": records[-1].get("peak_mem_mb"),
            "ok": code == 0 and falls and not set(syncs) - allowed}


def resume_on_gpu(data, out_dir):
    """SIGTERM during a run, resume, and compare with a run never stopped: weights equal bit for bit. The
    stopped run saves sharded checkpoints (torch.distributed.checkpoint from CUDA tensors), the other full ones."""
    import signal
    here = os.path.dirname(os.path.abspath(__file__))
    base = [sys.executable, os.path.join(here, "train.py"), "configs/gpt2_small.yaml", f"--data_dir={data}",
            f"--out_dir={out_dir}", "--d_model=256", "--n_layers=4", "--n_heads=4", "--steps=40", "--batch_size=16",
            "--micro_batch_size=8", "--warmup_steps=5", "--log_every=1", "--eval_every=20", "--eval_tokens=65536",
            "--save_every=20", "--compile=false", "--sample_tokens=20"]
    straight = subprocess.run(base + ["--exp_name=straight"], cwd=here, capture_output=True, text=True)
    base_stopped = base + ["--exp_name=stopped", "--checkpoint_format=sharded"]
    proc = subprocess.Popen(base_stopped, cwd=here, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("step 8/"):
            proc.send_signal(signal.SIGTERM)
            break
    stop_log = proc.stdout.read()
    stopped = proc.wait()
    resumed = subprocess.run(base_stopped, cwd=here, capture_output=True, text=True)
    a, b = (model_weights(find_checkpoint(os.path.join(out_dir, name), print)[1]) for name in ("straight", "stopped"))
    diffs = [(a[k].double() - b[k].double()).abs().max().item() for k in a]
    return {"straight_exit": straight.returncode, "stopped_exit": stopped, "resumed_exit": resumed.returncode,
            "stop_line": next((line for line in stop_log.splitlines() if "saved a checkpoint" in line), None),
            "bit_exact": max(diffs) == 0.0, "max_weight_diff": max(diffs),
            "sample_printed": "---- sample ----" in straight.stdout,
            "ok": (straight.returncode, stopped, resumed.returncode) == (0, 75, 0) and max(diffs) == 0.0}


def sample_and_export(out_dir):
    here = os.path.dirname(os.path.abspath(__file__))
    run = os.path.join(out_dir, "straight")
    sample = subprocess.run([sys.executable, "sample.py", run, "--max_new_tokens=50"], cwd=here, capture_output=True, text=True)
    export_dir = os.path.join(out_dir, "hf")
    export = subprocess.run([sys.executable, "export.py", run, export_dir], cwd=here, capture_output=True, text=True)
    out = {"sample_exit": sample.returncode, "sample_on_cuda": " on cuda" in sample.stderr,
           "sample_words": len(sample.stdout.split()), "export_exit": export.returncode,
           "export_files": sorted(os.listdir(export_dir)) if os.path.isdir(export_dir) else [],
           "errors": [r.stderr.strip().splitlines()[-1] for r in (sample, export) if r.returncode and r.stderr.strip()]}
    out["ok"] = sample.returncode == 0 and export.returncode == 0 and out["sample_on_cuda"] and out["sample_words"] >= 40
    try:  # the exported folder in transformers (on the GPU image) gives our logits
        from transformers import LlamaForCausalLM
        from sample import load_checkpoint, load_model
        ours = load_model(load_checkpoint(run)[1], "cuda")
        hf = LlamaForCausalLM.from_pretrained(export_dir).to("cuda").eval()
        idx = torch.randint(0, 50257, (2, 64), device="cuda")
        with torch.no_grad():
            a, b = ours(idx)[0], hf(idx).logits
        out["hf_logits_max_abs_diff"] = (a - b).abs().max().item()
        out["ok"] = out["ok"] and out["hf_logits_max_abs_diff"] < 1e-3
    except ImportError:
        out["hf_logits_max_abs_diff"] = None  # transformers not installed: the files were still written
    return out


def gpu_check(args):
    """Run every check, each in a try so one failure still leaves the others' results; one JSON line."""
    import tempfile
    import traceback
    if not torch.cuda.is_available():
        fail("--gpu_check needs a CUDA GPU (none is visible)")
    t0, device = time.time(), torch.device("cuda", 0)
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__}
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory(prefix="plainlm_gpu_check_") as tmp:
        data = os.path.join(tmp, "data")
        check_data(data)
        steps = [("cuda_unit", lambda: cuda_unit_checks(device)),
                 ("train_gpt2_small_bf16_compiled", lambda: sync_free_training(data, os.path.join(tmp, "runs"))),
                 ("sigterm_resume", lambda: resume_on_gpu(data, os.path.join(tmp, "resume"))),
                 ("sample_export", lambda: sample_and_export(os.path.join(tmp, "resume")))]
        for name, check in steps:
            print(f"gpu_check: {name} ...", flush=True)
            try:
                result[name] = check()
            except BaseException as e:  # a SystemExit from train.py's fail() too
                result[name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                                "where": traceback.format_exc().strip().splitlines()[-3:]}
            print(f"gpu_check: {name}: {'ok' if result[name].get('ok') else 'FAILED'} ({time.time() - t0:.0f} s)", flush=True)
        print("gpu_check: bench.py configs/gpt2_small.yaml (tokens/s, MFU) ...", flush=True)
        bench_run = subprocess.run([sys.executable, "bench.py", "configs/gpt2_small.yaml", "--data", "dummy",
                                    "--vocab_size", "50257", "--batch_size=64", "--steps", "5", "--rounds", "3"],
                                   cwd=here, capture_output=True, text=True)
        try:
            numbers = json.loads(bench_run.stdout.strip().splitlines()[-1])
            result["bench"] = {k: numbers.get(k) for k in ("tokens_per_s", "mfu", "achieved_tflops", "peak_tflops",
                                                           "peak_mem_mb", "first_step_s", "data_ms", "params")}
            result["bench"]["ok"] = bool(numbers.get("mfu")) and numbers["mfu"] >= 0.5
        except (ValueError, IndexError):
            result["bench"] = {"ok": False, "error": (bench_run.stderr.strip().splitlines() or ["no output"])[-1]}
    result["seconds"] = round(time.time() - t0, 1)
    result["ok"] = all(value.get("ok") for value in result.values() if isinstance(value, dict))
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


# -----------------------------------------------------------------------------
# --prepare: prepare.py's tokenizing speed against tiktoken's own batch encoder.

def bench_checkpoint(cfg, args):
    """Seconds to save and to load a checkpoint of this config's model with its AdamW state, and what
    train.py's safety checks add: the tensor checksum (computed on save, verified on load) and the
    NaN/inf check of everything saved. Files go to a temporary folder in out_dir (a real disk)."""
    import tempfile
    from model import Transformer
    from train import make_optimizer, non_finite, read_checkpoint, tensor_checksum, write_checkpoint
    vocab = args.vocab_size or read_meta(cfg["data_dir"])["vocab_size"]
    raw = Transformer(model_config(cfg, vocab), fast_ops=False)
    optimizer = make_optimizer(raw, cfg)
    for p in raw.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # creates AdamW's two state tensors per parameter, as in a real checkpoint
    state = {"model": raw.state_dict(), "optimizer": optimizer.state_dict()}
    times = {"finite_check_s": [], "checksum_s": [], "save_s": [], "load_s": []}
    os.makedirs(cfg["out_dir"], exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cfg["out_dir"]) as tmp:
        path = os.path.join(tmp, "ckpt.pt")
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            non_finite(state["model"], state["optimizer"])
            t1 = time.perf_counter()
            state["checksum"] = {"crc32": tensor_checksum(state)}
            t2 = time.perf_counter()
            write_checkpoint(state, path)  # torch.save, fsync, rename
            t3 = time.perf_counter()
            read_checkpoint(path)  # torch.load, then the checksum verified again
            t4 = time.perf_counter()
            for key, t in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[key].append(t)
        size_mb = os.path.getsize(path) / 2**20
    res = {key: statistics.median(values) for key, values in times.items()}
    res.update(params_m=raw.num_params() / 1e6, file_mb=size_mb)
    print(f"checkpoint of {res['params_m']:.1f}M parameters + AdamW state: {size_mb:.0f} MB, median of {args.rounds} rounds")
    print(f"  save {res['save_s']:.2f} s + checksum {res['checksum_s']:.3f} s + NaN/inf check {res['finite_check_s']:.3f} s "
          f"({100 * (res['checksum_s'] + res['finite_check_s']) / res['save_s']:.0f}% more)")
    print(f"  load {res['load_s']:.2f} s, of which verifying the checksum {res['checksum_s']:.3f} s "
          f"({100 * res['checksum_s'] / (res['load_s'] - res['checksum_s']):.0f}% more than torch.load alone)")
    print(json.dumps(res))
    return 0


# -----------------------------------------------------------------------------
# --time_to_loss: which recipe reaches a validation loss first, in steps and in wall time.

def training_curve(run_dir):
    """[(step, training seconds, val loss)] from a run's metrics.jsonl. Training seconds add up the
    logged step times (steady steps: evaluations, checkpoints and the first step are left out, the
    same for every recipe); the log lines fall on every evaluation step, so the sum is exact there."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    seconds, last_step, points = 0.0, 0, []
    for r in records:
        if "step_ms" in r:
            seconds += r["step_ms"] / 1000 * (r["step"] - last_step)
            last_step = r["step"]
        if "val_loss" in r:
            points.append((r["step"], seconds, r["val_loss"]))
    return points


def loss_at_time(points, t):
    """Validation loss at t training seconds, linear between the evaluations around it."""
    for (s0, t0, l0), (s1, t1, l1) in zip(points, points[1:]):
        if t0 <= t <= t1:
            return l0 + (l1 - l0) * (t - t0) / (t1 - t0) if t1 > t0 else l1
    return points[-1][2] if t >= points[-1][1] else None


def bench_time_to_loss(args, overrides):
    """Train each recipe in turn (same config, same data, same threads), then compare them."""
    import tempfile
    recipes = [[f"--{item}" for item in recipe.split()] for recipe in args.recipe]
    if len(recipes) < 2:
        fail("--time_to_loss compares recipes: give two or more, e.g. --recipe 'optimizer=adamw' --recipe 'optimizer=muon'")
    for i, recipe in enumerate(recipes):
        bad = [item for item in recipe if "=" not in item]
        if bad:
            fail(f"recipe {i + 1} ({args.recipe[i]!r}): write its settings as key=value, got {bad[0][2:]!r}")
    shared = overrides + ([f"--steps={args.steps}"] if args.steps else [])
    cfgs = [load_config(args.config, shared + recipe, args.job_idx) for recipe in recipes]  # bad keys: one line, now
    if any(not cfg["eval_every"] for cfg in cfgs):
        fail("--time_to_loss needs evaluations along the way: set eval_every > 0 (e.g. --eval_every=50)")
    os.makedirs(cfgs[0]["out_dir"], exist_ok=True)
    out = tempfile.mkdtemp(prefix="time_to_loss_", dir=cfgs[0]["out_dir"])
    threads = torch.get_num_threads()
    curves = []
    for i, (recipe, cfg) in enumerate(zip(recipes, cfgs)):
        log_path = os.path.join(out, f"recipe{i + 1}.log")
        print(f"recipe {i + 1}/{len(recipes)} ({args.recipe[i]}): training {cfg['steps']} steps on {threads} threads… "
              f"(log: {log_path})", flush=True)
        cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"),
               *([args.config] if args.config else []), *([f"--job_idx={args.job_idx}"] if args.job_idx is not None else []),
               *shared, *recipe, f"--out_dir={out}", f"--exp_name=recipe{i + 1}", f"--log_every={cfg['eval_every']}",
               "--sample_tokens=0", "--save_every=0"]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))  # every recipe gets the same threads
        with open(log_path, "w") as log:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        if code:
            with open(log_path) as f:
                fail(f"recipe {i + 1} ({args.recipe[i]}) stopped with exit status {code}: {f.read().strip().splitlines()[-1]}")
        curves.append(training_curve(os.path.join(out, f"recipe{i + 1}")))
    target = args.target if args.target is not None else curves[0][-1][2]
    equal_time = min(curve[-1][1] for curve in curves)
    rows = []
    for recipe, curve in zip(args.recipe, curves):
        hit = next((p for p in curve if p[2] <= target), None)
        rows.append({"recipe": recipe, "steps": curve[-1][0], "train_s": curve[-1][1], "final_val_loss": curve[-1][2],
                     "steps_to_target": hit and hit[0], "seconds_to_target": hit and hit[1],
                     "val_loss_at_equal_time": loss_at_time(curve, equal_time)})
    base = rows[0]
    for row in rows:
        if row["steps_to_target"] and base["steps_to_target"]:
            row["fewer_steps_x"] = base["steps_to_target"] / row["steps_to_target"]
            row["less_time_x"] = base["seconds_to_target"] / row["seconds_to_target"]
    print(f"\ntarget val loss {target:.4f} ({'--target' if args.target is not None else 'recipe 1 final'}); "
          f"equal time {equal_time:.1f} s of training; {threads} threads; runs in {out}")
    print(f"{'recipe':<40}{'final val':>10}{'steps':>7}{'to target: steps':>18}{'seconds':>9}{'x steps':>9}"
          f"{'x time':>8}{'val @ equal time':>18}")
    for row in rows:
        reached = row["steps_to_target"] is not None
        print(f"{row['recipe'][:39]:<40}{row['final_val_loss']:>10.4f}{row['steps']:>7}"
              f"{(row['steps_to_target'] if reached else 'not reached'):>18}"
              f"{(format(row['seconds_to_target'], '.2f') if reached else '-'):>9}"
              f"{fmt_or_dash('{:.2f}', row.get('fewer_steps_x')):>9}{fmt_or_dash('{:.2f}', row.get('less_time_x')):>8}"
              f"{fmt_or_dash('{:.4f}', row['val_loss_at_equal_time']):>18}")  # none: its first evaluation came later
    print(json.dumps({"target": target, "equal_time_s": equal_time, "threads": threads, "out_dir": out, "recipes": rows}))
    return 0


def raw_encode_seconds(source, tokenizer="gpt2", num_proc=2):
    """-> (tokens, wall s, CPU s) of tiktoken's own encode_ordinary_batch over the source's text,
    all of it held in memory."""
    import prepare
    units, _ = prepare.open_source(prepare.parse_args(["--source", source, "--out", "-"]))
    texts = [text for text, _ in units(prepare.Progress())]
    enc = prepare.get_tokenizer(tokenizer).enc
    wall, cpu = time.perf_counter(), time.process_time()
    tokens = sum(map(len, enc.encode_ordinary_batch(texts, num_threads=num_proc)))
    return tokens, time.perf_counter() - wall, time.process_time() - cpu


def prepare_speed(source, tokenizer="gpt2", num_proc=None, rounds=3, extra_args=(), progress=lambda line: None):
    """`python prepare.py` end to end (including start-up) against raw_encode_seconds, each in its
    own process, alternating for `rounds`; the best round of each counts. Rates are tokens per
    second of wall clock, and (cpu_*) per CPU-second x num_proc, which a busy machine disturbs less.
    -> dict(tokens_per_s, raw_tokens_per_s, ratio, cpu_ratio, peak_rss_mb, ...), where
    peak_rss_mb = main process peak + num_proc x largest worker peak. progress(line) is called after each round."""
    import re
    import resource
    import tempfile

    import prepare

    def children_cpu_seconds():
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    num_proc = num_proc or prepare.CORES
    here = os.path.dirname(os.path.abspath(__file__))
    raw_code = f"import bench; print(*bench.raw_encode_seconds({source!r}, {tokenizer!r}, {num_proc}))"
    runs = {"prepare": [], "raw": []}  # (tokens/s, tokens per CPU-second x num_proc) per round
    rss = []
    with tempfile.TemporaryDirectory(prefix="prepare_bench_") as folder:
        command = [sys.executable, os.path.join(here, "prepare.py"), "--source", source, "--tokenizer",
                   tokenizer, "--out", folder, "--num_proc", str(num_proc), "--overwrite", *extra_args]
        for i in range(rounds):
            raw = subprocess.run([sys.executable, "-c", raw_code], cwd=here, capture_output=True, text=True)
            if raw.returncode != 0:
                raise RuntimeError(raw.stderr)
            tokens, wall, cpu = map(float, raw.stdout.split()[-3:])
            runs["raw"].append((tokens / wall, tokens / cpu * num_proc))
            wall, cpu = time.perf_counter(), children_cpu_seconds()
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(result.stderr)
            wall, cpu = time.perf_counter() - wall, children_cpu_seconds() - cpu
            tokens = sum(split["tokens"] for split in prepare.existing_meta(folder)["splits"].values())
            runs["prepare"].append((tokens / wall, tokens / cpu * num_proc))
            peaks = re.search(r"main (\d+) MB, worker (\d+) MB", result.stderr).groups()
            main_mb, worker_mb = map(int, peaks)
            rss.append((main_mb + num_proc * worker_mb, main_mb, worker_mb))
            progress(f"round {i + 1}/{rounds}: prepare.py {runs['prepare'][-1][0]:,.0f} tokens/s, "
                     f"tiktoken {runs['raw'][-1][0]:,.0f} tokens/s")
    best = {name: [max(rates) for rates in zip(*rounds)] for name, rounds in runs.items()}
    return {"tokens_per_s": best["prepare"][0], "raw_tokens_per_s": best["raw"][0],
            "ratio": best["prepare"][0] / best["raw"][0], "cpu_tokens_per_s": best["prepare"][1],
            "cpu_raw_tokens_per_s": best["raw"][1], "cpu_ratio": best["prepare"][1] / best["raw"][1],
            "peak_rss_mb": max(rss)[0], "peak_rss_main_mb": max(r[1] for r in rss),
            "peak_rss_worker_mb": max(r[2] for r in rss), "num_proc": num_proc, "rounds": runs}


def bench_prepare(args):
    import prepare
    print(f"bench --prepare {args.prepare} | tokenizer {args.tokenizer} | {prepare.CORES} processes | "
          f"best of {args.rounds} interleaved round(s)", flush=True)
    try:
        res = prepare_speed(args.prepare, tokenizer=args.tokenizer, rounds=args.rounds,
                            progress=functools.partial(print, flush=True))
    except RuntimeError as e:  # the prepare.py subprocess failed: its last error line says why
        fail(f"--prepare {args.prepare}: {(str(e).strip().splitlines() or ['prepare.py failed'])[-1]}")
    rows = [("prepare.py end to end, tokens/s", "tokens_per_s", "{:,.0f}"),
            ("tiktoken encode_ordinary_batch, tokens/s", "raw_tokens_per_s", "{:,.0f}"),
            ("ratio (wall clock)", "ratio", "{:.1%}"), ("ratio (per CPU-second)", "cpu_ratio", "{:.1%}"),
            ("peak RSS of all processes, MB", "peak_rss_mb", "{:,.0f}")]
    for label, key, fmt in rows:
        if key in res:
            print(f"{label:<42}{fmt.format(res[key]):>14}")
    print(json.dumps(res), flush=True)
    return 0


def parse_args(argv):
    parser = argparse.ArgumentParser(
        usage="python bench.py CONFIG.yaml [options] [--key=value ...]\n       python bench.py --prepare SRC [--tokenizer TOK] [--rounds N]\n"
              "       python bench.py --gpu_check\n"
              "       python bench.py CONFIG.yaml --time_to_loss --recipe 'KEY=VALUE ...' --recipe ... [--target LOSS]",
        description="Measure how fast a config trains: tokens/s, MFU, peak memory and start-up time, optionally\n"
                    "side by side with Hugging Face's LlamaForCausalLM of the same shape. Settings come from the\n"
                    "YAML file as in train.py, then --key=value overrides of any config key (`python train.py --help`).",
        epilog="what is measured:\n"
               "  every timed step is train.py's train_step on train.py's model, optimizer and data path\n"
               "  (Sampler + get_windows), with the config's dtype, compile and gradient accumulation.\n"
               "  tokens_per_s, step_ms  median over rounds; a round is --steps steps after the warm-up\n"
               "  mfu                    flops_per_token x tokens/s / peak; the peak is measured (--measure_peak;\n"
               "                         mfu_vs_mm: against torch.mm's alone)\n"
               f"                         or the datasheet bf16 peak of the GPU ({', '.join(GPU_PEAK_BF16_TFLOPS)})\n"
               "  peak_mem_mb            CUDA: max allocated; CPU: peak RSS of the process (with --compare hf,\n"
               "                         HF's is measured in a child process running only HF)\n"
               "  first_step_s           model build + compile + first optimizer step; startup_s: the same\n"
               "                         counted from process start (imports included)\n"
               "  data_ms                time per step spent fetching the batch\n"
               "the last line printed is one JSON object with all numbers (hf_* and speedup_vs_hf with --compare hf).",
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("config", nargs="?", help="YAML config file, as for train.py (omit with --prepare)")
    parser.add_argument("--job_idx", type=int, help="which job of a sweep config to measure")
    parser.add_argument("--steps", type=int, help="measured optimizer steps per round (default 5); with --time_to_loss: "
                                                  "the training steps of every recipe (default: the config's)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps before measuring, at least 1; the first gives first_step_s (default 2)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measurement rounds, alternating ours and hf; numbers are medians over rounds (default 3); "
                             "with --prepare, rounds of prepare.py and tiktoken, best of each")
    parser.add_argument("--data", choices=("config", "dummy"), default="config",
                        help="config: the config's data_dir train.bin; dummy: random tokens (default config)")
    parser.add_argument("--vocab_size", type=int, help="vocabulary for --data dummy (default: data_dir's meta.json)")
    parser.add_argument("--measure_peak", action="store_true",
                        help="measure the peak FLOP/s with a large matmul in the run's dtype each round, through "
                             "torch.mm and fast_ops.linear (the faster counts), for MFU (needed on CPUs; GPUs default "
                             "to their datasheet peak)")
    parser.add_argument("--compare", choices=("hf",),
                        help="hf: also measure transformers.LlamaForCausalLM of the same shape, interleaved round by "
                             "round; its peak memory is measured in a subprocess")
    parser.add_argument("--ops", action="store_true",
                        help="instead: time each of fast_ops.py's pieces (oneDNN linear, RMSNorm, RoPE, SwiGLU-down) "
                             "against model.py's plain one, forward + backward, at the config's micro-batch shape, "
                             "and say which one fast_ops uses there")
    parser.add_argument("--prepare", metavar="SRC",
                        help="instead: measure prepare.py's tokens/s on source SRC against tiktoken's "
                             "encode_ordinary_batch on all cores")
    parser.add_argument("--tokenizer", default="gpt2", help="tokenizer for --prepare (default gpt2)")
    parser.add_argument("--checkpoint", action="store_true",
                        help="time saving and loading a checkpoint of the config's model, and what its checksum costs")
    parser.add_argument("--time_to_loss", action="store_true",
                        help="instead: train each --recipe in turn (same config and data, same threads) and print for "
                             "each the steps and training seconds to reach --target, and the val loss at equal training "
                             "time (that of the shortest run); run folders are kept in out_dir/time_to_loss_*")
    parser.add_argument("--recipe", action="append", default=[], metavar="'KEY=VALUE ...'",
                        help="with --time_to_loss: one recipe, config keys that differ from the config (repeat it; "
                             "the first is the baseline)")
    parser.add_argument("--target", type=float,
                        help="with --time_to_loss: the validation loss to reach (default: the first recipe's final one); "
                             "a recipe reaches it at its first evaluation at or below it")
    parser.add_argument("--gpu_check", action="store_true",
                        help="instead: the checks only a CUDA GPU can run, in about 5 minutes on one H100/H200: the "
                             "model's CUDA paths, a bf16 compiled GPT-2-small-shaped training run with no host sync "
                             "outside log steps, SIGTERM + bit-exact resume, sample.py and export.py, and this "
                             "benchmark's tokens/s and MFU on configs/gpt2_small.yaml (target 50%%); one JSON line, "
                             "exit status 1 if any check failed")
    parser.add_argument("--_worker", choices=("ours", "hf"), help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    if not args.prepare and not args.config and not args.gpu_check:
        parser.error("give a config file (or --prepare SRC, or --gpu_check)")
    for key in ("steps", "rounds", "warmup"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            parser.error(f"--{key} must be at least 1")
    return args, overrides


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args, overrides = parse_args(argv)
    if args.prepare:
        return bench_prepare(args)
    if args.gpu_check:
        return gpu_check(args)
    if args.time_to_loss:
        return bench_time_to_loss(args, overrides)
    if args.steps is None:
        args.steps = 5
    cfg = load_config(args.config, overrides, args.job_idx)
    if args.ops:
        return bench_ops(cfg, args)
    if args.checkpoint:
        return bench_checkpoint(cfg, args)
    return bench(cfg, args, argv)


if __name__ == "__main__":
    sys.exit(main())
