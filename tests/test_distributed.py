"""Distributed training on CPU: 2 processes (gloo) launched for real with torchrun train
exactly like one process with the same global batch, under DDP and FSDP2, and their
checkpoints resume bit-exactly on 2 ranks and closely on 1.

The runs are tiny and shared by the tests (a module fixture): straight runs (1 process, 2-rank
DDP, 2-rank FSDP, FSDP compiled, bf16 DDP and FSDP), then three resumed from their middle
checkpoints, three from a sharded one, two 2-rank runs whose rank 1 cannot see the run folder, one whose rank 1
alone is signalled, the memory savers, FSDP's meta-device build, and Muon and schedule-free AdamW
on 1 process and 2 DDP ranks. Each wave's runs go in parallel.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import train
from conftest import write_char_data
from model import ModelConfig, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, SEQ_LEN, EVAL_TOKENS = 12, 32, 229  # 229 tokens = 7 eval windows: 4 on rank 0, 3 (+1 padding) on rank 1
TINY = [f"--seq_len={SEQ_LEN}", "--d_model=32", "--n_layers=2", "--n_heads=2", f"--steps={STEPS}", "--batch_size=8",
        "--micro_batch_size=2", "--warmup_steps=2", "--lr=1e-2", "--log_every=1", "--eval_every=6",
        f"--eval_tokens={EVAL_TOKENS}", f"--save_every={STEPS // 2}", "--keep_last=10"]


OTHER_OPTIMIZERS = {"muon": ["--optimizer=muon"], "sfadamw": ["--optimizer=sfadamw", "--scheduler=constant"]}


def launch(nproc, args, script="train.py"):
    """Start train.py as one plain process or as `torchrun --standalone` with nproc ranks."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"  # what torchrun gives each rank; also keeps parallel launches from oversubscribing
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    # --standalone rendezvouses on localhost port 0 (a free port), so parallel launches do not clash.
    return subprocess.Popen([sys.executable, *launcher, script, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(procs, failing=()):
    outputs = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        assert (proc.returncode != 0) == (name in failing), f"run {name}: exit {proc.returncode}:\n{out[-4000:]}"
        outputs[name] = out
    return outputs


# train.py whose rank 1 must not read the run folder (a node that cannot see it): rank 0 reads a full
# checkpoint and broadcasts it.
RANK1_BLIND = """import os, sys
sys.path.insert(0, os.getcwd())  # launched from the repo root
import train
if os.environ["RANK"] == "1":
    def blind(*args):
        raise AssertionError("rank 1 read the run folder")
    train.checkpoint_paths = train.read_checkpoint = blind
sys.exit(train.main())
"""


# train.py on a node that cannot see the run folder, resuming a sharded checkpoint (which every rank reads).
RANK1_BLIND_SHARDED = """import os, sys
sys.path.insert(0, os.getcwd())  # launched from the repo root
import train
if os.environ["RANK"] == "1":
    real = os.path.isfile
    os.path.isfile = lambda path: False if ".dcp" in str(path) else real(path)
sys.exit(train.main())
"""


# train.py with fast_ops's chunked loss forced on at this tiny size (three chunks per micro-batch).
CHUNKED_LOSS = """import os, sys
sys.path.insert(0, os.getcwd())  # launched from the repo root
import fast_ops, train
fast_ops.MIN_CHUNKED_LOGITS, fast_ops.LOSS_CHUNK_LOGITS = 0, 24 * 128  # 24 rows of the 128-row head
real, calls = fast_ops.ChunkedCrossEntropy.apply, []
fast_ops.ChunkedCrossEntropy.apply = lambda *args: calls.append(1) or real(*args)
code = train.main()
print(f"rank {os.environ['RANK']}: chunked loss calls {len(calls)}", flush=True)
sys.exit(code)
"""


# train.py reporting the dtypes of the first block's inputs (residual stream, RoPE table), as FSDP's
# pre-forward hook leaves them.
BLOCK_INPUTS = """import os, sys
sys.path.insert(0, os.getcwd())  # launched from the repo root
import train
real, seen = train.build_model, set()
def build_model(*args):
    raw, model = real(*args)
    raw.blocks[0].register_forward_pre_hook(lambda module, args: seen.add((str(args[0].dtype), str(args[1].dtype))))
    return raw, model
train.build_model = build_model
code = train.main()
print(f"rank {os.environ['RANK']}: block inputs {sorted(seen)}", flush=True)
sys.exit(code)
"""


# train.py whose rank 1 alone is signalled, during step 3.
SIGNAL_RANK1 = """import os, signal, sys
sys.path.insert(0, os.getcwd())  # launched from the repo root
import train
real, calls = train.train_step, []
def train_step(*args):
    calls.append(1)
    if len(calls) == 3 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGTERM)
    return real(*args)
train.train_step = train_step
sys.exit(train.main())
"""


# FSDP's model as build_model makes it: built on the meta device, sharded, then each shard filled.
META_INIT = """import os, sys
sys.path.insert(0, os.getcwd())  # launched from the repo root
import torch, train
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
built, real = [], train.Transformer
def transformer(*args, **kwargs):  # where each model train.py builds has its parameters when built
    model = real(*args, **kwargs)
    built.extend(str(p.device) for p in model.parameters())
    return model
train.Transformer = transformer
rank, world, device = None, None, None
for extra in ([], ["--tie_embeddings=true", "--mlp=relu2", "--qk_norm=true"]):
    cfg = train.load_config(None, ["--parallelism=fsdp", "--d_model=32", "--n_layers=3", "--n_heads=2", "--seed=7", *extra])
    if rank is None:
        rank, world, device = train.setup_distributed(cfg)
    raw, _ = train.build_model(cfg, 100, device, world, None)
    devices = sorted(set(built))  # before the reference below
    local = sum(p.to_local().numel() for p in raw.parameters())
    full = get_model_state_dict(raw, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        reference = train.build_model(cfg, 100, torch.device("cpu"), 1, None)[0].state_dict()  # one process's
        same = full.keys() == reference.keys() and all(torch.equal(full[k], reference[k]) for k in reference)
        rope = torch.equal(raw.rope_cos, real(train.model_config(cfg, 100)).rope_cos)
        print(f"{extra}: built on {devices}; rank 0 holds {local} of {raw.num_params()} parameters; "
              f"identical to one process: {same}; rope tables: {rope}", flush=True)
    built.clear()
torch.distributed.destroy_process_group()
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("distributed")
    data = str(base / "data")
    # Python's own source as text; 64 windows of train, so one epoch is 8 steps and the runs cross into epoch 1.
    write_char_data(data, open(os.__file__).read(), train_tokens=64 * SEQ_LEN + 1, val_tokens=500)
    common = [f"--data_dir={data}", f"--out_dir={base}", *TINY]
    straight = {"single": (1, []), "ddp": (2, []), "fsdp": (2, ["--parallelism=fsdp"]),
                "fsdp_compile": (2, ["--parallelism=fsdp", "--compile=true"]),
                "fsdp_sharded": (2, ["--parallelism=fsdp", "--checkpoint_format=sharded"])}
    procs = {name: launch(n, [*common, f"--exp_name={name}", *extra]) for name, (n, extra) in straight.items()}
    (base / "block_inputs.py").write_text(BLOCK_INPUTS)
    for mode in ("ddp", "fsdp"):  # bf16 autocast on CPU; FSDP then all-gathers bf16 weights
        procs[f"{mode}_bf16"] = launch(2, [*common, f"--exp_name={mode}_bf16", f"--parallelism={mode}", "--dtype=bf16",
                                           "--sample_tokens=16"], script=str(base / "block_inputs.py"))
    logs = finish(procs)
    # Resume from the middle checkpoint in a fresh run folder: 2 ranks from 2 ranks (DDP and FSDP),
    # and 1 process from the 2-rank FSDP checkpoint.
    resumed = {"ddp_resumed": ("ddp", 2, []), "fsdp_resumed": ("fsdp", 2, ["--parallelism=fsdp"]),
               "single_from_fsdp": ("fsdp", 1, [])}
    # From the 2-rank FSDP run's sharded checkpoint: 2 FSDP ranks (sharded again), 1 process, 2 DDP ranks (full).
    resumed.update({"fsdp_sharded_resumed": ("fsdp_sharded", 2, ["--parallelism=fsdp", "--checkpoint_format=sharded"]),
                    "single_from_sharded": ("fsdp_sharded", 1, []), "ddp_from_sharded": ("fsdp_sharded", 2, [])})
    for name, (source, _, _) in {**resumed, "blind": ("ddp", 2, []), "blind_sharded": ("fsdp_sharded", 2, [])}.items():
        os.makedirs(base / name)
        middle = checkpoint(base / source, STEPS // 2, sharded=source.endswith("sharded"))
        (shutil.copytree if os.path.isdir(middle) else shutil.copy)(middle, base / name / os.path.basename(middle))
    procs = {name: launch(n, [*common, f"--exp_name={name}", *extra]) for name, (_, n, extra) in resumed.items()}
    (base / "rank1_blind.py").write_text(RANK1_BLIND)
    procs["blind"] = launch(2, [*common, "--exp_name=blind"], script=str(base / "rank1_blind.py"))
    (base / "rank1_blind_sharded.py").write_text(RANK1_BLIND_SHARDED)
    procs["blind_sharded"] = launch(2, [*common, "--exp_name=blind_sharded"], script=str(base / "rank1_blind_sharded.py"))
    # The memory savers: activation checkpointing and the chunked loss, under DDP and FSDP2.
    (base / "chunked_loss.py").write_text(CHUNKED_LOSS)
    for mode in ("ddp", "fsdp"):
        procs[f"{mode}_memory"] = launch(2, [*common, f"--exp_name={mode}_memory", f"--parallelism={mode}",
                                             "--activation_checkpointing=true"], script=str(base / "chunked_loss.py"))
    # Muon and schedule-free AdamW (which evaluates and saves its averaged weights) under DDP.
    for name, extra in OTHER_OPTIMIZERS.items():
        procs[f"single_{name}"] = launch(1, [*common, f"--exp_name=single_{name}", *extra])
        procs[f"ddp_{name}"] = launch(2, [*common, f"--exp_name=ddp_{name}", *extra])
    (base / "signal_rank1.py").write_text(SIGNAL_RANK1)
    procs["signal_rank1"] = launch(2, [*common, "--exp_name=signal_rank1"], script=str(base / "signal_rank1.py"))
    (base / "meta_init.py").write_text(META_INIT)
    procs["meta_init"] = launch(2, [], script=str(base / "meta_init.py"))
    logs.update(finish(procs, failing=["blind_sharded", "signal_rank1"]))
    return {"dir": base, "logs": logs}


def checkpoint(run_dir, step, sharded=False):
    return os.path.join(run_dir, f"ckpt_{step:07d}.{'dcp' if sharded else 'pt'}")


def load(runs, name, step=STEPS):
    return torch.load(checkpoint(runs["dir"] / name, step), map_location="cpu", weights_only=False)


def sharded_weights(runs, name, step=STEPS):
    return train.model_weights(train.read_checkpoint(checkpoint(runs["dir"] / name, step, sharded=True)))


def metrics(runs, name):
    with open(runs["dir"] / name / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def train_losses(runs, name):
    return {r["step"]: r["train_loss"] for r in metrics(runs, name) if "train_loss" in r}


def assert_losses_close(ours, reference, rtol=1e-5):
    assert ours.keys() <= reference.keys() and ours
    for step, loss in ours.items():
        assert abs(loss - reference[step]) / abs(reference[step]) < rtol, (step, loss, reference[step])


def assert_state_close(ours, reference, rtol=1e-4, atol=1e-5):
    assert ours.keys() == reference.keys()
    for key in reference:
        assert ours[key].shape == reference[key].shape, key  # full, unsharded tensors
        torch.testing.assert_close(ours[key], reference[key], rtol=rtol, atol=atol, msg=lambda m: f"{key}: {m}")


def test_ranks_print_no_deprecation_warnings(runs):
    for name in ("ddp", "fsdp", "ddp_resumed"):
        assert "Warning" not in runs["logs"][name] and "deprecated" not in runs["logs"][name], runs["logs"][name]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_train_like_one_process(runs, mode):
    assert f"2 process(es) on cpu ({mode})" in runs["logs"][mode]  # really distributed, not two lone runs
    assert list(train_losses(runs, mode)) == list(range(1, STEPS + 1))  # one record per step: only rank 0 writes
    assert not os.path.exists(runs["dir"] / mode / train.LOCK_NAME)  # rank 0 held the run lock and released it
    assert_losses_close(train_losses(runs, mode), train_losses(runs, "single"))
    ours, reference = load(runs, mode), load(runs, "single")
    assert_state_close(ours["model"], reference["model"])
    for key, state in reference["optimizer"]["state"].items():  # the whole optimizer state is gathered too
        assert_state_close(ours["optimizer"]["state"][key], state)
    assert len(ours["rng"]) == 2
    # Only rank 0 writes (whole files), and nothing half-written is left behind.
    files = os.listdir(runs["dir"] / mode)
    assert sorted(f for f in files if f.startswith("ckpt_")) == [f"ckpt_{s:07d}.pt" for s in (STEPS // 2, STEPS)]
    assert not [f for f in files if f.endswith(".tmp")]


@pytest.mark.parametrize("name", OTHER_OPTIMIZERS)
def test_two_ranks_train_like_one_process_with_muon_and_schedule_free(runs, name):
    assert "2 process(es) on cpu (ddp)" in runs["logs"][f"ddp_{name}"]
    assert_losses_close(train_losses(runs, f"ddp_{name}"), train_losses(runs, f"single_{name}"))
    vals = [[r["val_loss"] for r in metrics(runs, run) if "val_loss" in r] for run in (f"ddp_{name}", f"single_{name}")]
    assert len(vals[0]) == 2 and vals[0] == pytest.approx(vals[1], rel=1e-5)
    ours, reference = load(runs, f"ddp_{name}"), load(runs, f"single_{name}")
    assert ours["config"]["optimizer"] == name
    assert_state_close(ours["model"], reference["model"])
    for key, state in reference["optimizer"]["state"].items():
        assert_state_close(ours["optimizer"]["state"][key], state)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_memory_savers_train_like_one_process(runs, mode):
    """Activation checkpointing + the chunked loss on 2 ranks: the single process's losses and weights."""
    name = f"{mode}_memory"
    assert f"2 process(es) on cpu ({mode})" in runs["logs"][name]
    for rank in (0, 1):  # every training and evaluation forward went through it
        assert f"rank {rank}: chunked loss calls {STEPS * 2 + 2 * 2}" in runs["logs"][name]
    assert list(train_losses(runs, name)) == list(range(1, STEPS + 1))
    assert_losses_close(train_losses(runs, name), train_losses(runs, "single"))
    assert_state_close(load(runs, name)["model"], load(runs, "single")["model"])


def test_ranks_read_disjoint_windows_covering_each_epoch():
    world, micro_batch_size, batch_size = 2, 2, 8
    sampler = train.Sampler(n_tokens=60 * SEQ_LEN + 1, seq_len=SEQ_LEN, seed=3)  # 60 windows: steps straddle epochs
    per_rank = {rank: [] for rank in range(world)}  # (position in the stream of windows, window id)
    for step in range(15):  # 120 windows = 2 epochs
        ids = sampler.next_ids(batch_size)
        positions = np.arange(step * batch_size, (step + 1) * batch_size)
        single = [tuple(m) for m in train.deal(ids, 1, 0, micro_batch_size)]
        dealt = []
        for rank in range(world):
            mine = train.deal(ids, world, rank, micro_batch_size)
            assert mine.shape == (batch_size // (world * micro_batch_size), micro_batch_size)
            per_rank[rank] += zip(train.deal(positions, world, rank, micro_batch_size).ravel(), mine.ravel())
            dealt += [tuple(m) for m in mine]
        assert sorted(dealt) == sorted(single)  # the same micro-batches as one process
    for epoch in range(2):
        seen = [{i for pos, i in per_rank[rank] if pos // 60 == epoch} for rank in range(world)]
        counts = [sum(pos // 60 == epoch for pos, _ in per_rank[rank]) for rank in range(world)]
        assert not seen[0] & seen[1]
        assert seen[0] | seen[1] == set(range(60)) and sum(counts) == 60  # every window exactly once


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_resume_on_two_ranks_is_exact(runs, mode):
    resumed = f"{mode}_resumed"
    assert f"at step {STEPS // 2}" in runs["logs"][resumed]
    assert train_losses(runs, resumed) == {s: l for s, l in train_losses(runs, mode).items() if s > STEPS // 2}
    ours, reference = load(runs, resumed), load(runs, mode)
    for key, value in reference["model"].items():
        assert torch.equal(ours["model"][key], value), key


def test_two_rank_checkpoint_resumes_in_one_process(runs):
    log = runs["logs"]["single_from_fsdp"]
    assert "1 process(es)" in log and f"at step {STEPS // 2}" in log
    assert_losses_close(train_losses(runs, "single_from_fsdp"), train_losses(runs, "single"))
    assert_state_close(load(runs, "single_from_fsdp")["model"], load(runs, "single")["model"])


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_distributed_eval_equals_single_process_eval(runs, mode):
    # The 2-rank run's last val_loss against a 1-process evaluate() of the same (final) weights.
    ckpt = load(runs, mode)
    cfg = ckpt["config"]
    n_windows = cfg["eval_tokens"] // cfg["seq_len"]
    assert n_windows % 2 == 1  # uneven: rank 1 has a window fewer and pads its last micro-batch
    model = Transformer(ModelConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    tokens = train.open_tokens(cfg["data_dir"], "val", ckpt["meta"])
    expected = train.evaluate(model, tokens, cfg, torch.device("cpu"), None, rank=0, world=1)
    logged = [r["val_loss"] for r in metrics(runs, mode) if "val_loss" in r]
    assert len(logged) == 2
    assert abs(logged[-1] - expected) / expected < 1e-6, (logged[-1], expected)


def test_only_rank_0_reads_a_full_checkpoint_and_the_others_receive_it(runs):
    # Rank 1 cannot read the run folder at all, yet resumes exactly like the 2-rank DDP resume.
    log = runs["logs"]["blind"]
    assert f"resumed from" in log and f"at step {STEPS // 2}" in log and "rank 1 read the run folder" not in log
    assert train_losses(runs, "blind") == train_losses(runs, "ddp_resumed")
    for key, value in load(runs, "ddp_resumed")["model"].items():
        assert torch.equal(load(runs, "blind")["model"][key], value), key


def test_sharded_checkpoints_resume_exactly_and_reshard_to_one_process_and_ddp(runs):
    """2 FSDP ranks save sharded folders (each rank its part); they resume bit-exactly on 2 FSDP ranks, and
    closely in 1 process and on 2 DDP ranks (which then save full files: auto)."""
    files = sorted(os.listdir(runs["dir"] / "fsdp_sharded" / "ckpt_0000012.dcp"))
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp", "plainlm.pt"]  # both ranks wrote
    assert_losses_close(train_losses(runs, "fsdp_sharded"), train_losses(runs, "single"))
    assert_state_close(sharded_weights(runs, "fsdp_sharded"), load(runs, "single")["model"])
    assert train_losses(runs, "fsdp_sharded_resumed") == \
        {s: l for s, l in train_losses(runs, "fsdp_sharded").items() if s > STEPS // 2}
    ours, reference = sharded_weights(runs, "fsdp_sharded_resumed"), sharded_weights(runs, "fsdp_sharded")
    assert all(torch.equal(ours[key], value) for key, value in reference.items())
    for name, reference in (("single_from_sharded", "single"), ("ddp_from_sharded", "ddp")):
        assert f"ckpt_0000006.dcp at step {STEPS // 2}" in runs["logs"][name]
        assert_losses_close(train_losses(runs, name), train_losses(runs, reference))
        assert_state_close(load(runs, name)["model"], load(runs, reference)["model"])


def test_ranks_that_cannot_see_a_sharded_checkpoint_stop_with_a_clear_error(runs):
    # Without this check rank 1 would fail inside torch.distributed.checkpoint with a stack of tracebacks.
    log = runs["logs"]["blind_sharded"]
    assert "train.py: error: some processes cannot see the sharded checkpoint" in log
    assert "put out_dir on a filesystem that every node can read" in log
    files = os.listdir(runs["dir"] / "blind_sharded")
    assert "metrics.jsonl" not in files and [f for f in files if f.startswith("ckpt_")] == ["ckpt_0000006.dcp"]


def test_fsdp_is_built_on_the_meta_device_and_starts_from_the_one_process_weights(runs):
    """No process ever holds the whole model; each fills its shard with what a 1-process run starts from."""
    log = runs["logs"]["meta_init"]
    lines = [line for line in log.splitlines() if "identical to one process" in line]
    assert len(lines) == 2, log  # untied SwiGLU; tied ReLU² with QK-norm
    for line in lines:
        assert "built on ['meta']" in line and "identical to one process: True; rope tables: True" in line, line
        held, total = map(int, re.search(r"holds (\d+) of (\d+) parameters", line).groups())
        assert held <= total // 2 + 64, line  # its half (FSDP pads a row or so)


def test_bf16_fsdp_keeps_the_residual_stream_fp32_and_trains_like_bf16_ddp(runs):
    """FSDP's bf16 weights must not turn the blocks' inputs (residual stream, RoPE tables) to bf16,
    which DDP's autocast keeps in fp32: the two then train alike, up to bf16 rounding."""
    for mode in ("ddp", "fsdp"):
        log = runs["logs"][f"{mode}_bf16"]
        assert f"2 process(es) on cpu ({mode}) | bf16 autocast" in log
        for rank in (0, 1):
            assert f"rank {rank}: block inputs [('torch.float32', 'torch.float32')]" in log, log
    fsdp, ddp = train_losses(runs, "fsdp_bf16"), train_losses(runs, "ddp_bf16")
    assert_losses_close(fsdp, ddp, rtol=2e-3)  # measured 3e-4 (the dtypes above are what tell the old cast apart)
    assert_losses_close(ddp, train_losses(runs, "single"), rtol=5e-3)  # bf16 against fp32 (measured 3e-4)


def test_fsdp_sample_at_the_end_of_training_finishes(runs):
    """Every rank takes part in gathering the model; rank 0 alone generates (it used to hang)."""
    log = runs["logs"]["fsdp_bf16"]
    assert log.count("---- sample ----") == 1 and log.index("done:") < log.index("---- sample ----")


def test_fsdp_compiled_block_by_block_trains_like_eager_fsdp(runs):
    log = runs["logs"]["fsdp_compile"]
    assert "compiling…" in log and "compiled: the first step took" in log
    assert list(train_losses(runs, "fsdp_compile")) == list(range(1, STEPS + 1))
    assert_losses_close(train_losses(runs, "fsdp_compile"), train_losses(runs, "fsdp"), rtol=1e-4)
    assert_state_close(load(runs, "fsdp_compile")["model"], load(runs, "fsdp")["model"])  # plain names: no _orig_mod


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(runs):
    """Rank 1 alone is signalled in step 3. The ranks agree in the background and read the answer a
    step later, so both stop after step 4, with one checkpoint, and rank 1 exits 75."""
    log = runs["logs"]["signal_rank1"]
    assert "signal on another rank: saved a checkpoint at step 4; run the same command again" in log, log
    assert "exitcode  : 75" in log  # torchrun's report of rank 1
    assert list(train_losses(runs, "signal_rank1")) == [1, 2, 3, 4]
    assert [f for f in os.listdir(runs["dir"] / "signal_rank1") if f.startswith("ckpt_")] == ["ckpt_0000004.pt"]
    assert load(runs, "signal_rank1", step=4)["sampler"] == {"epoch": 0, "pos": 32}  # 4 steps x 8 windows, not 5
