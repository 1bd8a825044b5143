"""train.py: learning, exact resume, signals, schedules, checkpoints, bad configs."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import pytest
import torch

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_args(data_dir, out_dir, exp_name, **overrides):
    cfg = dict(data_dir=data_dir, out_dir=out_dir, exp_name=exp_name, d_model=64, n_layers=2, n_heads=4, seq_len=64,
               batch_size=16, micro_batch_size=8, steps=30, warmup_steps=3, lr=1e-2, lr_min=1e-3, eval_every=10,
               eval_tokens=4096, log_every=1, save_every=10, keep_last=10, tie_embeddings=False)
    cfg.update(overrides)
    return [f"--{k}={v}" for k, v in cfg.items()]


def run_train(argv):
    return train.main(argv)


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def final_state(run_dir):
    return torch.load(train.checkpoint_paths(run_dir)[0], weights_only=True)


def assert_same_state(a, b):
    assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for name, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][name][key]), (name, key)


@pytest.fixture(scope="module")
def straight_run(hamlet_data, tmp_path_factory):
    """One uninterrupted 30-step run that other tests compare against."""
    out = str(tmp_path_factory.mktemp("runs"))
    assert run_train(tiny_args(hamlet_data, out, "straight")) == 0
    return os.path.join(out, "straight")


def test_loss_falls_on_real_text(straight_run):
    records = metrics(straight_run)
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    vocab = final_state(straight_run)["meta"]["vocab_size"]
    assert abs(losses[0] - math.log(vocab)) < 0.2  # starts near chance
    assert losses[-1] < losses[0] - 1.2  # past the unigram plateau (~3.2)
    assert vals == sorted(vals, reverse=True) and vals[-1] < 2.9
    assert [r["step"] for r in records] == list(range(1, 31))


def test_resume_is_bit_exact(straight_run, tmp_path):
    # Stop at step 10 (the checkpoint written there), resume with the same command.
    run_dir = tmp_path / "resumed"
    run_dir.mkdir()
    shutil.copy(os.path.join(straight_run, "ckpt_0000010.pt"), run_dir)
    data_dir = final_state(straight_run)["config"]["data_dir"]
    assert run_train(tiny_args(data_dir, str(tmp_path), "resumed")) == 0
    assert_same_state(final_state(straight_run), final_state(str(run_dir)))
    assert [r["train_loss"] for r in metrics(str(run_dir))] == [r["train_loss"] for r in metrics(straight_run)][10:]


@pytest.mark.parametrize("every", ["true", "2"])
def test_activation_checkpointing_trains_exactly_the_same(straight_run, tmp_path, every):
    """Recomputing every block (true) or every 2nd block (2) in backward changes memory, not results:
    the same losses and final weights, bit for bit."""
    data_dir = final_state(straight_run)["config"]["data_dir"]
    assert run_train(tiny_args(data_dir, str(tmp_path), "ac", activation_checkpointing=every)) == 0
    assert [r["train_loss"] for r in metrics(str(tmp_path / "ac"))] == [r["train_loss"] for r in metrics(straight_run)]
    assert_same_state(final_state(straight_run), final_state(str(tmp_path / "ac")))


def test_warmup_as_a_fraction_resumes_a_run_that_gave_it_in_steps(straight_run, tmp_path):
    """The shipped config now writes warmup_steps: 0.1; a run started with the same warmup as a count
    (3 of 30 steps) still resumes, bit-exactly, from its checkpoint and config.yaml."""
    run_dir = tmp_path / "fraction"
    run_dir.mkdir()
    for name in ("ckpt_0000010.pt", "config.yaml"):
        shutil.copy(os.path.join(straight_run, name), run_dir)
    data_dir = final_state(straight_run)["config"]["data_dir"]
    assert run_train(tiny_args(data_dir, str(tmp_path), "fraction", warmup_steps=0.1)) == 0
    assert_same_state(final_state(straight_run), final_state(str(run_dir)))
    with pytest.raises(SystemExit, match="warmup_steps: 0.1 -> 0.2"):  # a real change is still refused
        run_train(tiny_args(data_dir, str(tmp_path), "fraction", warmup_steps=0.2, steps=40))


def test_sigterm_mid_run_then_resume_equals_straight_run(straight_run, tmp_path):
    data_dir = final_state(straight_run)["config"]["data_dir"]
    # Signal as soon as step 3 is logged; the run stops at the end of whatever step it is in.
    cmd = [sys.executable, os.path.join(ROOT, "train.py")] + tiny_args(data_dir, str(tmp_path), "sig")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    for line in proc.stdout:
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGTERM)
            break
    out = proc.stdout.read()
    assert proc.wait(timeout=120) == train.STOPPED_EXIT_CODE, out
    assert "SIGTERM: saved a checkpoint at step" in out
    stopped_at = final_state(str(tmp_path / "sig"))["step"]
    assert 3 <= stopped_at < 30
    assert subprocess.run(cmd, cwd=ROOT, capture_output=True).returncode == 0
    assert_same_state(final_state(straight_run), final_state(str(tmp_path / "sig")))
    assert metrics(str(tmp_path / "sig")) != [] and [r["train_loss"] for r in metrics(str(tmp_path / "sig"))] == \
        [r["train_loss"] for r in metrics(straight_run)]


def test_the_stop_is_named_after_the_signal_that_asked_for_it(monkeypatch):
    """USR1 warns of the time limit; the limit's own SIGTERM may follow during the save."""
    monkeypatch.setitem(train.STOP_SIGNAL, "name", None)
    train.request_stop(signal.SIGUSR1, None)
    train.request_stop(signal.SIGTERM, None)
    assert train.STOP_SIGNAL["name"] == "SIGUSR1"


def test_rerunning_a_finished_run_does_nothing(straight_run, capsys):
    data_dir = final_state(straight_run)["config"]["data_dir"]
    assert run_train(tiny_args(data_dir, os.path.dirname(straight_run), "straight")) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_truncated_newest_checkpoint_is_skipped(straight_run, tmp_path, capsys):
    run_dir = tmp_path / "trunc"
    shutil.copytree(straight_run, run_dir)
    newest = train.checkpoint_paths(str(run_dir))[0]
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    data_dir = final_state(straight_run)["config"]["data_dir"]
    assert run_train(tiny_args(data_dir, str(tmp_path), "trunc")) == 0
    out = capsys.readouterr().out
    assert "warning: skipping unreadable checkpoint" in out and "resumed from" in out and "ckpt_0000020.pt" in out
    assert_same_state(final_state(straight_run), final_state(str(run_dir)))


def test_wsd_cooldown_branches_from_a_checkpoint(hamlet_data, tmp_path, capsys):
    common = dict(scheduler="wsd", steps=20, warmup_steps=2, cooldown_steps=0, save_every=10)
    assert run_train(tiny_args(hamlet_data, str(tmp_path), "constant", **common)) == 0
    branch = dict(common, steps=16, cooldown_steps=6, init_from=str(tmp_path / "constant" / "ckpt_0000010.pt"))
    capsys.readouterr()
    assert run_train(tiny_args(hamlet_data, str(tmp_path), "cooldown", **branch)) == 0
    out = capsys.readouterr().out
    assert f"branched from {tmp_path / 'constant' / 'ckpt_0000010.pt'} at step 10" in out and "resumed" not in out
    # Started again, the branch continues from its own checkpoint: that one is a resume.
    assert run_train(tiny_args(hamlet_data, str(tmp_path), "cooldown", **branch)) == 0
    assert f"resumed from {tmp_path / 'cooldown' / 'ckpt_0000016.pt'} at step 16" in capsys.readouterr().out
    records = metrics(str(tmp_path / "cooldown"))
    assert [r["step"] for r in records] == list(range(11, 17))
    assert records[-1]["lr"] == pytest.approx(1e-3)  # lr_min at the last step
    # Until the cooldown starts, the branch repeats the constant run exactly.
    constant = {r["step"]: r["train_loss"] for r in metrics(str(tmp_path / "constant"))}
    assert records[0]["train_loss"] == constant[11]


def test_non_finite_loss_stops_with_the_step(hamlet_data, tmp_path, monkeypatch):
    real_step = train.train_step
    calls = []

    def step_that_blows_up(*args, **kwargs):
        loss, norm = real_step(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) >= 7 else loss), norm

    monkeypatch.setattr(train, "train_step", step_that_blows_up)
    with pytest.raises(SystemExit, match="loss is nan at step 7; the last good checkpoint is kept"):
        run_train(tiny_args(hamlet_data, str(tmp_path), "nan", save_every=5))
    assert [os.path.basename(p) for p in train.checkpoint_paths(str(tmp_path / "nan"))] == ["ckpt_0000005.pt"]
    # A checkpoint step between two log lines checks the loss too: nothing diverged is saved.
    calls.clear()
    with pytest.raises(SystemExit, match="loss is nan between steps 6 and 8; the last good checkpoint is kept"):
        run_train(tiny_args(hamlet_data, str(tmp_path), "nan2", save_every=4, log_every=5))
    assert [os.path.basename(p) for p in train.checkpoint_paths(str(tmp_path / "nan2"))] == ["ckpt_0000004.pt"]


# -----------------------------------------------------------------------------
# Schedules: `step` is the optimizer step being taken, counted from 1.

def schedule(**kw):
    cfg = dict(train.DEFAULTS, lr=1.0, lr_min=0.1, steps=100, warmup_steps=10, cooldown_steps=20)
    cfg.update(kw)
    return lambda step: train.lr_at(step, cfg)


def test_schedules():
    for name in ("cosine", "wsd", "linear", "constant"):
        lr = schedule(scheduler=name)
        assert lr(1) == pytest.approx(0.1)  # never 0 at the first step
        assert lr(10) == pytest.approx(1.0)  # end of warmup: peak
    cosine = schedule(scheduler="cosine")
    assert cosine(55) == pytest.approx(0.55) and cosine(100) == pytest.approx(0.1)
    linear = schedule(scheduler="linear")
    assert linear(55) == pytest.approx(0.55) and linear(100) == pytest.approx(0.1)
    wsd = schedule(scheduler="wsd")
    assert wsd(80) == 1.0  # last step before the cooldown
    assert wsd(81) == pytest.approx(0.1 + 0.9 * 19 / 20)  # first cooldown step
    assert wsd(100) == pytest.approx(0.1)  # end of cooldown: lr_min
    sqrt = schedule(scheduler="wsd", cooldown_shape="1-sqrt")
    assert sqrt(85) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.25)))
    fractions = schedule(scheduler="wsd", warmup_steps=0.1, cooldown_steps=0.2)
    assert [fractions(s) for s in range(1, 101)] == [wsd(s) for s in range(1, 101)]
    assert schedule(scheduler="constant", warmup_steps=0)(1) == 1.0


def test_sampler_visits_every_window_once_per_epoch_and_resumes():
    sampler = train.Sampler(n_tokens=1001, seq_len=10, seed=3)  # 100 windows
    first = sampler.next_ids(64)
    state = sampler.state_dict()
    second = sampler.next_ids(64)  # crosses into epoch 1
    assert sorted(list(first) + list(second[:36])) == list(range(100))
    again = train.Sampler(n_tokens=1001, seq_len=10, seed=3)
    again.load_state_dict(state)
    assert list(again.next_ids(64)) == list(second)


def test_prefetched_batches_are_the_samplers_and_its_state_is_the_steps_handed_out():
    """Step N+1 is read ahead in a thread; the batches, their order and the state a checkpoint saves
    (and resumes from) are exactly those of the sampler read step by step, across epochs."""
    import numpy as np
    seq_len, cfg, world = 10, {"batch_size": 8, "micro_batch_size": 2, "seq_len": 10}, 2
    tokens = np.arange(1001, dtype=np.uint16)  # 100 windows: steps straddle epochs
    for rank in range(world):
        plain = train.Sampler(len(tokens), seq_len, seed=3)
        loader = train.Prefetcher(tokens, train.Sampler(len(tokens), seq_len, seed=3), cfg, world, rank,
                                  torch.device("cpu"), steps=30)
        states = []
        for step in range(30):
            ids = train.deal(plain.next_ids(cfg["batch_size"]), world, rank, cfg["micro_batch_size"])
            got = loader.next_step()
            assert len(got) == len(ids) == 2
            for (x, y), micro_ids in zip(got, ids):
                expected_x, expected_y = train.get_windows(tokens, micro_ids, seq_len, torch.device("cpu"))
                assert torch.equal(x, expected_x) and torch.equal(y, expected_y)
            assert loader.state_dict() == plain.state_dict()  # not the position of the batch read ahead
            states.append(loader.state_dict())
        assert loader.ahead is None  # nothing read past the last step
        loader.close()
        # Resuming from the state after step 11 gives steps 12..: what a restart reads.
        sampler = train.Sampler(len(tokens), seq_len, seed=3)
        sampler.load_state_dict(states[10])
        resumed = train.Prefetcher(tokens, sampler, cfg, world, rank, torch.device("cpu"), steps=1)
        again = train.Sampler(len(tokens), seq_len, seed=3)
        again.load_state_dict(states[10])
        ids = train.deal(again.next_ids(cfg["batch_size"]), world, rank, cfg["micro_batch_size"])
        assert torch.equal(resumed.next_step()[0][0], train.get_windows(tokens, ids[0], seq_len, torch.device("cpu"))[0])


def test_single_process_stop_flag_is_the_signal_itself(monkeypatch):
    monkeypatch.setitem(train.STOP_SIGNAL, "name", None)
    stop = train.StopFlag(world=1)
    assert not stop()
    train.request_stop(signal.SIGUSR1, None)
    assert stop()  # one process stops after the step it was signalled in


@pytest.mark.parametrize("local_rank, n_gpus, torchrun_world, gpu", [
    (0, 1, None, 0), (3, 1, None, 0),  # a single process; srun --gpus-per-task=1 (each task sees its own GPU)
    (3, 8, 8, 3), (5, 8, None, 5),     # torchrun, or srun tasks that see the whole node
    (1, 1, 2, None), (4, 4, 8, None), (8, 8, None, None),  # more processes than GPUs
])
def test_every_process_gets_a_gpu_of_its_own(local_rank, n_gpus, torchrun_world, gpu):
    if gpu is not None:
        assert train.gpu_of(local_rank, n_gpus, torchrun_world) == gpu
    else:
        with pytest.raises(SystemExit, match=r"processes on this node but only \d GPU\(s\) visible: start one process per GPU"):
            train.gpu_of(local_rank, n_gpus, torchrun_world)


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989),
    ("NVIDIA H200 NVL", 835), ("NVIDIA GB200", 2500), ("NVIDIA B200", 2250), ("NVIDIA H800", 989),
    ("NVIDIA H800 PCIe", 756), ("NVIDIA A800-SXM4-80GB", 312), ("NVIDIA A100-SXM4-40GB", 312), ("Tesla T4", None)])
def test_mfu_uses_the_datasheet_peak_of_the_exact_gpu(monkeypatch, name, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    peak = train.peak_flops(torch.device("cuda", 0), torch.bfloat16)
    assert peak == (tflops * 1e12 if tflops else None)


def test_ddp_gradients_stay_in_their_buckets_across_steps(tmp_path):
    """gradient_as_bucket_view: the optimizer zeroes DDP's gradients in place, so every step's backward
    writes into the same all-reduce buckets instead of allocating new gradients."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        cfg = train.load_config(None, ["--d_model=32", "--n_layers=1", "--n_heads=2", "--seq_len=8", "--batch_size=4",
                                       "--micro_batch_size=2"])
        cfg["parallelism"] = "ddp"
        raw, model = train.build_model(cfg, 16, torch.device("cpu"), world=2, amp_dtype=None)  # world 2: DDP
        optimizer = train.make_optimizer(raw, cfg)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        batch = [(torch.randint(0, 16, (2, 8)), torch.randint(0, 16, (2, 8)))] * 2  # 2 micro-batches
        pointers = []
        for _ in range(4):
            train.train_step(model, raw, optimizer, scaler, batch, cfg, torch.device("cpu"), None)
            pointers.append([p.grad.data_ptr() for p in raw.parameters()])
            assert all(not p.grad.any() for p in raw.parameters())  # zeroed for the next step
        assert pointers[1] == pointers[2] == pointers[3]  # (DDP rebuilds its buckets once, after the first step)
    finally:
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# Bad configs: one clear line, non-zero exit.

def config_error(tmp_path, text, *overrides):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as e:
        train.load_config(str(path), list(overrides))
    return str(e.value)


@pytest.mark.parametrize("text, overrides, message", [
    ("lr: 1e-3\nwarmup_step: 10\n", [], "unknown config key 'warmup_step' in .*did you mean 'warmup_steps'"),
    ("", ["--n_layer=3"], "unknown config key 'n_layer' in the command line .*did you mean 'n_layers'"),
    ("steps: ten\n", [], "config key 'steps' must be int, got 'ten'"),
    ("", ["--lr=fast"], "config key 'lr' must be float, got 'fast'"),
    ("compile: maybe\n", [], "config key 'compile' must be bool"),
    ("steps: 2.5\n", [], "config key 'steps' must be int"),
    ("batch_size: 24\nmicro_batch_size: 16\n", [], "batch_size 24 is not divisible by micro_batch_size 16"),
    ("scheduler: cosin\n", [], "config key 'scheduler' must be one of cosine, wsd, constant, linear"),
    ("steps: 100\nwarmup_steps: 90\ncooldown_steps: 20\nscheduler: wsd\n", [], r"warmup_steps \(90\) \+ cooldown_steps \(20\) exceed steps"),
    ("steps: 100\nwarmup_steps: 150\n", [], r"warmup_steps \(150\) exceed steps \(100\): .*as a fraction of steps"),
    ("d_model: 100\nn_heads: 3\n", [], "bad model shape: d_model=100 is not divisible by n_heads=3"),
    ("lr: -1\n", [], "'lr' must not be negative"),
    ("", ["--activation_checkpointing=sometimes"], "config key 'activation_checkpointing' must be bool or int"),
    ("activation_checkpointing: -2\n", [], "'activation_checkpointing' must not be negative"),
    ("d_model: 0\n", [], "bad model shape: d_model must be a positive integer, got 0"),
    ("mlp: gelu\n", [], "bad model shape: mlp must be 'glu' or 'relu2', got 'gelu'"),
    ("lr: [1, 2\n", [], "is not valid YAML"),
    ("- a\n- b\n", [], "must be a mapping"),
    ("", ["steps=5"], "overrides are written --key=value"),
])
def test_bad_config_is_one_clear_error(tmp_path, text, overrides, message):
    import re
    error = config_error(tmp_path, text, *overrides)
    assert error.startswith("train.py: error: ") and "\n" not in error
    assert re.search(message, error), error


def test_values_are_typed_by_the_defaults(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("lr: 1e-3\nwarmup_steps: 0.1\ncompile: false\nn_kv_heads: 2\n")
    cfg = train.load_config(str(path), ["--steps=50", "--qk_norm=true", "--d_ff=null", "--rope_theta=500000"])
    assert cfg["lr"] == 1e-3 and cfg["warmup_steps"] == 0.1 and cfg["steps"] == 50 and cfg["qk_norm"] is True
    assert cfg["d_ff"] is None and cfg["rope_theta"] == 500000.0 and cfg["n_kv_heads"] == 2
    assert cfg["exp_name"] == "ok"


def test_command_line_errors_are_one_line_without_traceback(tmp_path):
    for argv in (["missing.yaml"], [os.path.join(ROOT, "configs", "shakespeare_char.yaml"), f"--data_dir={tmp_path}/nothing"]):
        result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py")] + argv, capture_output=True, text=True,
                                cwd=tmp_path)
        assert result.returncode != 0
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("train.py: error:"), result.stderr
    assert "config file 'missing.yaml' not found" in subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), "missing.yaml"], capture_output=True, text=True).stderr


def test_no_config_file_prints_usage_and_quick_start(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py")], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("usage: train.py") and "give a config file" in result.stderr
    assert train.QUICK_START in result.stderr and "python train.py configs/shakespeare_char.yaml" in train.QUICK_START
    assert os.listdir(tmp_path) == []  # no run was started


def test_shipped_warmup_is_a_fraction_of_steps():
    """`--steps=10` on the default config keeps its 10% warmup instead of failing on 65 > 10."""
    path = os.path.join(ROOT, "configs", "shakespeare_char.yaml")
    assert train.schedule_lengths(train.load_config(path))[0] == 65
    short = train.load_config(path, ["--steps=10"])
    assert train.schedule_lengths(short)[0] == 1 and train.lr_at(1, short) == short["lr"]


def test_rate_and_eta_leave_out_the_first_step_and_compile_is_announced(hamlet_data, tmp_path, monkeypatch, capsys):
    """The first step after a start (compiling, first allocations) is timed apart: here it takes 100 s
    of a fake clock and every other step 1 s, so every logged rate is the steady 1 s per step."""
    now = [0.0]
    real_step = train.train_step

    def timed_step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        now[0] += 100.0 if now[0] == 0 else 1.0
        return out

    fake_time = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    fake_time.time = lambda: now[0]  # only the clock train.py reads for rates is faked
    monkeypatch.setattr(train, "time", fake_time)
    monkeypatch.setattr(train, "train_step", timed_step)
    monkeypatch.setattr(torch, "compile", lambda model: model)  # the announcement, without the wait
    assert run_train(tiny_args(hamlet_data, str(tmp_path), "timed", steps=6, log_every=3, eval_every=0,
                               save_every=0, compile=True)) == 0
    out = capsys.readouterr().out
    assert "compiling…" in out and "compiled: the first step took 1m40s" in out
    assert [r["step_ms"] for r in metrics(str(tmp_path / "timed")) if "step_ms" in r] == [1000.0, 1000.0]
    assert "| 1000 ms/step | eta 0m03s |" in out


def test_end_of_training_sample_is_streamed(straight_run, monkeypatch, capsys):
    """print_sample writes each token as it is generated (sample.py's generate_streaming)."""
    import sample
    pieces, real = [], sample.generate_streaming

    def recording(*args, write, **kwargs):
        return real(*args, write=lambda text: (pieces.append(text), write(text)), **kwargs)

    monkeypatch.setattr(sample, "generate_streaming", recording)
    ckpt = final_state(straight_run)
    cfg = {**ckpt["config"], "sample_tokens": 25}
    train.print_sample(sample.load_model(ckpt), ckpt["meta"], cfg, rank=0, world=1, device=torch.device("cpu"), amp_dtype=None)
    out = capsys.readouterr().out
    assert len(pieces) >= 25  # one write per token (char tokens are never held back)
    assert out == "---- sample ----\n" + "".join(pieces) + "\n----------------\n"


def test_run_folder_with_another_config_is_refused_unless_overwrite(straight_run, capsys):
    data_dir = final_state(straight_run)["config"]["data_dir"]
    out = os.path.dirname(straight_run)
    with pytest.raises(SystemExit, match="holds a different experiment .*lr: 0.01 -> 0.001.*--overwrite"):
        run_train(tiny_args(data_dir, out, "straight", lr=1e-3))
    assert run_train(tiny_args(data_dir, out, "straight", lr=1e-3, steps=4, eval_every=0) + ["--overwrite"]) == 0
    assert "moved the previous run folder to" in capsys.readouterr().out
    backups = [d for d in os.listdir(out) if d.startswith("straight.old-")]
    assert len(backups) == 1 and train.checkpoint_paths(os.path.join(out, backups[0]))  # nothing lost
    # Restore for other tests in this module that read straight_run.
    shutil.rmtree(straight_run)
    os.replace(os.path.join(out, backups[0]), straight_run)


def test_readme_lists_every_config_key_and_ci_runs_its_test_command():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    for key, (default, _, _) in train.CONFIG.items():
        shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
        assert f"| `{key}` | `{shown}` |" in readme, f"README's config table is out of date for '{key}'"
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci_command = f.read().strip().splitlines()[-1]
    assert f"```bash\n{ci_command}\n```" in readme


def test_fp16_with_fsdp_is_refused_before_anything_is_built():
    cfg = train.load_config(None, ["--parallelism=fsdp", "--dtype=fp16"])
    with pytest.raises(SystemExit, match="fp16 with FSDP is not supported"):
        train.build_model(cfg, 65, torch.device("cpu"), world=2, amp_dtype=torch.float16)
