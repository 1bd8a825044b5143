"""Distributed training on CPU: 2 processes (gloo) launched for real with torchrun train
exactly like one process with the same global batch, under DDP and FSDP2, and their
checkpoints resume bit-exactly on 2 ranks and closely on 1.

The runs are tiny and shared by the tests (a module fixture): three straight runs (1 process,
2-rank DDP, 2-rank FSDP), then three resumed from their middle checkpoints, and one 2-rank run
whose rank 1 cannot see the run folder's checkpoint, and Muon and schedule-free AdamW on 1 process and
2 DDP ranks. Each wave's runs go in parallel.
"""
import json
import os
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


# train.py as on a node that cannot see the run folder: rank 1 finds no checkpoint in it.
RANK1_BLIND = """import os, sys
sys.path.insert(0, os.getcwd())  # launched from the repo root
import train
real = train.checkpoint_paths
train.checkpoint_paths = lambda run_dir: [] if os.environ["RANK"] == "1" else real(run_dir)
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


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("distributed")
    data = str(base / "data")
    # Python's own source as text; 64 windows of train, so one epoch is 8 steps and the runs cross into epoch 1.
    write_char_data(data, open(os.__file__).read(), train_tokens=64 * SEQ_LEN + 1, val_tokens=500)
    common = [f"--data_dir={data}", f"--out_dir={base}", *TINY]
    straight = {"single": (1, []), "ddp": (2, []), "fsdp": (2, ["--parallelism=fsdp"])}
    logs = finish({name: launch(n, [*common, f"--exp_name={name}", *extra]) for name, (n, extra) in straight.items()})
    # Resume from the middle checkpoint in a fresh run folder: 2 ranks from 2 ranks (DDP and FSDP),
    # and 1 process from the 2-rank FSDP checkpoint.
    resumed = {"ddp_resumed": ("ddp", 2, []), "fsdp_resumed": ("fsdp", 2, ["--parallelism=fsdp"]),
               "single_from_fsdp": ("fsdp", 1, [])}
    for name, (source, _, _) in {**resumed, "blind": ("ddp", 2, [])}.items():
        os.makedirs(base / name)
        shutil.copy(checkpoint(base / source, STEPS // 2), base / name)
    procs = {name: launch(n, [*common, f"--exp_name={name}", *extra]) for name, (_, n, extra) in resumed.items()}
    (base / "rank1_blind.py").write_text(RANK1_BLIND)
    procs["blind"] = launch(2, [*common, "--exp_name=blind"], script=str(base / "rank1_blind.py"))
    # The memory savers: activation checkpointing and the chunked loss, under DDP and FSDP2.
    (base / "chunked_loss.py").write_text(CHUNKED_LOSS)
    for mode in ("ddp", "fsdp"):
        procs[f"{mode}_memory"] = launch(2, [*common, f"--exp_name={mode}_memory", f"--parallelism={mode}",
                                             "--activation_checkpointing=true"], script=str(base / "chunked_loss.py"))
    # Muon and schedule-free AdamW (which evaluates and saves its averaged weights) under DDP.
    for name, extra in OTHER_OPTIMIZERS.items():
        procs[f"single_{name}"] = launch(1, [*common, f"--exp_name=single_{name}", *extra])
        procs[f"ddp_{name}"] = launch(2, [*common, f"--exp_name=ddp_{name}", *extra])
    logs.update(finish(procs, failing=["blind"]))
    return {"dir": base, "logs": logs}


def checkpoint(run_dir, step):
    return os.path.join(run_dir, f"ckpt_{step:07d}.pt")


def load(runs, name, step=STEPS):
    return torch.load(checkpoint(runs["dir"] / name, step), map_location="cpu", weights_only=False)


def metrics(runs, name):
    with open(runs["dir"] / name / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def train_losses(runs, name):
    return {r["step"]: r["train_loss"] for r in metrics(runs, name) if "train_loss" in r}


def assert_losses_close(ours, reference):
    assert ours.keys() <= reference.keys() and ours
    for step, loss in ours.items():
        assert abs(loss - reference[step]) / abs(reference[step]) < 1e-5, (step, loss, reference[step])


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


def test_ranks_that_see_different_checkpoints_stop_with_a_clear_error(runs):
    # Without this check rank 1 would silently train from scratch next to a resumed rank 0.
    log = runs["logs"]["blind"]
    assert "train.py: error: the processes found different checkpoints" in log
    assert "put out_dir on a filesystem that every node can read" in log
    files = os.listdir(runs["dir"] / "blind")
    assert "metrics.jsonl" not in files and [f for f in files if f.startswith("ckpt_")] == ["ckpt_0000006.pt"]
