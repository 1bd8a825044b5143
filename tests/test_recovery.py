"""Faults on purpose: every stop is safe and every damage is named (issue 15).
Each test reproduces one fault; the README's "When something goes wrong" table lists them."""
import contextlib
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml

import sample
import train
from conftest import shakespeare_play, write_char_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def args(data_dir, out_dir, exp_name="run", **overrides):
    """A tiny model that trains a few steps in about a second."""
    cfg = dict(data_dir=data_dir, out_dir=out_dir, exp_name=exp_name, d_model=32, n_layers=1, n_heads=2, seq_len=32,
               batch_size=8, micro_batch_size=8, steps=4, warmup_steps=1, eval_every=0, eval_tokens=64,
               log_every=1, save_every=2, keep_last=10)
    cfg.update(overrides)
    return [f"--{k}={v}" for k, v in cfg.items()]


def names(run_dir):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(run_dir, "*")))


def steps_logged(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def flip_middle(path):
    """Silent corruption: 16 bytes in the middle of the file (tensor data) change."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        data = f.read(16)
        f.seek(-16, os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in data))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_char_data(str(tmp_path_factory.mktemp("data")), shakespeare_play("hamlet")[:60000])


@pytest.fixture
def trained(data, tmp_path):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    assert train.main(args(data, str(tmp_path))) == 0
    return str(tmp_path / "run")


@contextlib.contextmanager
def small_disk(path, size="1m", readonly=False):
    """A real tmpfs of `size` at path (root can mount one); skips where mounting is not allowed."""
    os.makedirs(path, exist_ok=True)
    options = f"size={size}" + (",ro" if readonly else "")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


# -----------------------------------------------------------------------------
# Lose or corrupt a run

def test_diverged_weights_are_never_saved_and_init_from_continues(data, tmp_path, monkeypatch, capsys):
    # A step whose gradient is NaN: the weights turn NaN, but the loss logged for that step (computed
    # before the update) is still finite. Step 4 is a checkpoint step.
    real_step, calls = train.train_step, []

    def diverging_step(model, raw, *rest):
        loss, norm = real_step(model, raw, *rest)
        calls.append(1)
        if len(calls) == 4:
            with torch.no_grad():
                next(raw.parameters()).fill_(float("nan"))
            norm = torch.tensor(float("nan"))
        return loss, norm

    monkeypatch.setattr(train, "train_step", diverging_step)
    with pytest.raises(SystemExit) as e:
        train.main(args(data, str(tmp_path), steps=6))
    message = str(e.value)
    assert "not finite at step 4" in message and "nothing was saved" in message, message
    assert names(tmp_path / "run").count("ckpt_0000002.pt") == 1 and "ckpt_0000004.pt" not in names(tmp_path / "run")
    good = os.path.join(str(tmp_path / "run"), "ckpt_0000002.pt")
    assert f"--init_from={good}" in message
    # The way out the message gives works: branch from the last good checkpoint with a lower lr.
    monkeypatch.setattr(train, "train_step", real_step)
    assert train.main(args(data, str(tmp_path), "run_lower_lr", steps=6, lr=1e-4, init_from=good)) == 0
    assert f"branched from {good} at step 2" in capsys.readouterr().out
    ckpt = torch.load(str(tmp_path / "run_lower_lr" / "ckpt_0000006.pt"), weights_only=True)
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_all_checkpoints_damaged_stops_instead_of_starting_over(trained, data, tmp_path):
    for path in train.checkpoint_paths(trained):
        with open(path, "r+b") as f:
            f.truncate(100)
    before = {name: os.path.getsize(os.path.join(trained, name)) for name in names(trained)}
    with pytest.raises(SystemExit, match="every checkpoint in .* is damaged .*ckpt_0000004.pt.*nothing was changed"):
        train.main(args(data, str(tmp_path), steps=6))
    assert before == {name: os.path.getsize(os.path.join(trained, name)) for name in names(trained)}
    assert steps_logged(trained) == [1, 2, 3, 4]


def test_damaged_newer_checkpoint_is_set_aside_not_overwritten(trained, data, tmp_path, capsys):
    flip_middle(os.path.join(trained, "ckpt_0000004.pt"))  # silent corruption of tensor data
    assert train.main(args(data, str(tmp_path), steps=6, keep_last=2)) == 0
    out = capsys.readouterr().out
    assert "skipping unreadable checkpoint" in out and "tensor data does not match its checksum" in out
    assert "resumed from" in out and "ckpt_0000002.pt at step 2" in out
    assert "ckpt_0000004.pt.damaged" in out
    # keep_last counts checkpoints that load: the two new ones; the damaged file is kept aside.
    assert [n for n in names(trained) if n.startswith("ckpt_")] == \
        ["ckpt_0000004.pt", "ckpt_0000004.pt.damaged", "ckpt_0000006.pt"]
    for path in train.checkpoint_paths(trained):
        train.read_checkpoint(path)  # both load and match their checksums


def test_unreadable_checkpoint_file_stops_with_one_line(trained, data, tmp_path, monkeypatch):
    # Permission denied (or an I/O error) says nothing about the file: never skip it and go on.
    real_open = open

    def open_denied(path, *a, **kw):
        if str(path).endswith("ckpt_0000004.pt"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr("builtins.open", open_denied)
    with pytest.raises(SystemExit, match=r"cannot read checkpoint '.*ckpt_0000004.pt' \(Permission denied\): "
                                         r"fix its permissions"):
        train.main(args(data, str(tmp_path), steps=6))
    monkeypatch.undo()
    assert steps_logged(trained) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="Permission denied"):  # what sample.py and export.py report
        monkeypatch.setattr("builtins.open", open_denied)
        train.find_checkpoint(trained, print)


def test_empty_newest_checkpoint_is_skipped_by_train_sample_and_export(trained, data, tmp_path, capsys):
    open(os.path.join(trained, "ckpt_0000009.pt"), "wb").close()  # 0 bytes, as after a crash of the filesystem
    path, ckpt = train.find_checkpoint(trained, print)  # what sample.py and export.py call
    assert path.endswith("ckpt_0000004.pt") and "empty file" in capsys.readouterr().out
    assert train.main(args(data, str(tmp_path), steps=12, save_every=6)) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "ckpt_0000004.pt at step 4" in out and "ckpt_0000009.pt.damaged" in out


def test_resume_refuses_a_changed_config_when_config_yaml_is_gone(trained, data, tmp_path):
    os.remove(os.path.join(trained, "config.yaml"))
    with pytest.raises(SystemExit, match=r"trained with another config \(lr: 0.001 -> 0.01\).*--init_from="):
        train.main(args(data, str(tmp_path), steps=6, lr=1e-2))
    assert train.main(args(data, str(tmp_path), steps=6)) == 0  # the same config resumes


def test_resume_refuses_data_rebuilt_from_another_corpus(data, tmp_path):
    own = write_char_data(str(tmp_path / "data"), shakespeare_play("hamlet")[:60000])
    assert train.main(args(own, str(tmp_path))) == 0
    write_char_data(own, shakespeare_play("macbeth")[:50000])  # same folder, another corpus
    with pytest.raises(SystemExit, match=r"the data in '.*' is not the data .*ckpt_0000004.pt was trained on "
                                         r"\((vocab_size|chars|splits)"):
        train.main(args(own, str(tmp_path), steps=6))


def test_truncated_or_odd_sized_token_file_is_one_line(tmp_path):
    own = write_char_data(str(tmp_path / "data"), shakespeare_play("hamlet")[:60000])
    train_bin = os.path.join(own, "train.bin")
    with open(train_bin, "r+b") as f:
        f.truncate(os.path.getsize(train_bin) - 2000)
    with pytest.raises(SystemExit, match=r"train.bin' holds 53000 tokens but meta.json says 54000: .*prepare.py"):
        train.main(args(own, str(tmp_path)))
    with open(train_bin, "ab") as f:
        f.write(b"x")
    with pytest.raises(SystemExit, match=r"train.bin' is 106001 bytes, not a whole number of uint16 tokens"):
        train.main(args(own, str(tmp_path)))


def test_deleting_checkpoints_keeps_the_old_metrics_aside(trained, data, tmp_path, capsys):
    for path in train.checkpoint_paths(trained):
        os.remove(path)
    assert train.main(args(data, str(tmp_path), steps=2)) == 0
    assert "4 records of metrics.jsonl" in capsys.readouterr().out
    (old,) = glob.glob(os.path.join(trained, "metrics.jsonl.old-*"))
    with open(old) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]
    assert steps_logged(trained) == [1, 2]


# -----------------------------------------------------------------------------
# The run lock: one trainer per run folder

def write_lock(run_dir, **holder):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, train.LOCK_NAME), "w") as f:
        json.dump(dict({"host": socket.gethostname(), "pid": 1, "token": "theirs"}, **holder), f)


def test_live_trainer_on_this_host_keeps_the_run(data, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "LOCK_STALE_S", 0.5)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path / "run", pid=sleeper.pid)
        with pytest.raises(SystemExit, match=rf"run folder '.*run' is in use by pid {sleeper.pid} on "):
            train.main(args(data, str(tmp_path)))
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not os.path.exists(tmp_path / "run" / "config.yaml")  # nothing of it was touched


def test_stale_locks_are_taken_over_with_a_message(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "LOCK_STALE_S", 0.5)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(tmp_path / "run", pid=dead.pid)  # this host, a process that has exited (kill -9, a crash)
    open(tmp_path / "run" / f"ckpt_0000002.pt.tmp-{dead.pid}@{socket.gethostname()}", "wb").close()
    assert train.main(args(data, str(tmp_path))) == 0
    out = capsys.readouterr().out
    assert f"taking over the run lock of pid {dead.pid}" in out and "no longer running" in out
    assert "removed an unfinished checkpoint" in out
    # Another host (a SLURM requeue after a node died): its lock is not refreshed, so it is taken over.
    write_lock(tmp_path / "run", host="node-that-died", pid=123, job="4242")
    assert train.main(args(data, str(tmp_path), steps=6)) == 0
    out = capsys.readouterr().out
    assert "taking over the run lock of pid 123 on node-that-died (SLURM job 4242)" in out
    assert "not refreshed for" in out
    assert not os.path.exists(tmp_path / "run" / train.LOCK_NAME)  # released at the end
    assert [n for n in names(tmp_path / "run") if ".tmp" in n] == []


def test_trainer_that_lost_its_lock_stops_without_saving(data, tmp_path, monkeypatch):
    real_step, calls = train.train_step, []

    def step_then_someone_takes_over(*a):
        calls.append(1)
        if len(calls) == 3:  # another trainer decided this one was dead and took the run folder
            write_lock(tmp_path / "run", host="other-node", pid=7)
        return real_step(*a)

    monkeypatch.setattr(train, "train_step", step_then_someone_takes_over)
    with pytest.raises(SystemExit, match="lost the run lock .* to pid 7 on other-node: .*stopping without saving"):
        train.main(args(data, str(tmp_path)))
    assert [n for n in names(tmp_path / "run") if n.startswith("ckpt_")] == ["ckpt_0000002.pt"]
    assert json.load(open(tmp_path / "run" / train.LOCK_NAME))["pid"] == 7  # theirs, left alone


# -----------------------------------------------------------------------------
# Checksums

def test_old_checkpoint_without_checksum_loads_with_a_note(trained, capsys):
    path = os.path.join(trained, "ckpt_0000004.pt")
    ckpt = torch.load(path, weights_only=True)
    del ckpt["checksum"]
    torch.save(ckpt, path)
    found, loaded = train.find_checkpoint(trained, print)
    assert found == path and loaded["step"] == 4
    assert "has no checksum (written before plainLM recorded one)" in capsys.readouterr().out


def test_sample_skips_a_silently_corrupted_checkpoint(trained, capsys):
    flip_middle(os.path.join(trained, "ckpt_0000004.pt"))
    assert sample.main([trained, "--max_new_tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert "ckpt_0000004.pt (tensor data does not match its checksum)" in err and "step 2" in err


# -----------------------------------------------------------------------------
# One clear line instead of a traceback

def test_disk_full_during_a_checkpoint_save(data, tmp_path):
    with small_disk(tmp_path / "disk", size="200k") as disk:
        with pytest.raises(SystemExit, match=r"cannot write checkpoint '.*ckpt_0000002.pt' \(No space left on device\)"):
            train.main(args(data, disk))
        assert [n for n in names(os.path.join(disk, "run")) if "ckpt" in n] == []  # no half file left


def test_disk_full_during_a_sharded_checkpoint_save(data, tmp_path):
    with small_disk(tmp_path / "disk", size="200k") as disk:
        with pytest.raises(SystemExit, match=r"cannot write checkpoint '.*ckpt_0000002.dcp' \(No space left on device\)"):
            train.main(args(data, disk, checkpoint_format="sharded"))
        assert [n for n in names(os.path.join(disk, "run")) if "ckpt" in n] == []  # no half folder left


def test_read_only_out_dir(data, tmp_path):
    with small_disk(tmp_path / "ro", readonly=True) as ro:
        with pytest.raises(SystemExit, match=r"cannot create run folder '.*' \(Read-only file system\)"):
            train.main(args(data, ro))


def test_half_written_metrics_line_is_skipped(trained, data, tmp_path, capsys):
    with open(os.path.join(trained, "metrics.jsonl"), "a") as f:
        f.write('{"step": 5, "train_lo')  # a hard stop in the middle of a write
    assert train.main(args(data, str(tmp_path), steps=6)) == 0
    assert "skipped 1 unreadable line" in capsys.readouterr().out
    assert steps_logged(trained) == [1, 2, 3, 4, 5, 6]


def test_corrupt_run_config_yaml_is_rewritten_from_the_command(trained, data, tmp_path, capsys):
    with open(os.path.join(trained, "config.yaml"), "w") as f:
        f.write("lr: [0.01\n")
    assert train.main(args(data, str(tmp_path), steps=6)) == 0
    assert "config.yaml is not valid YAML" in capsys.readouterr().out
    with open(os.path.join(trained, "config.yaml")) as f:
        assert yaml.safe_load(f)["steps"] == 6


def test_bad_meta_json_is_one_line(tmp_path):
    own = write_char_data(str(tmp_path / "data"), shakespeare_play("hamlet")[:60000])
    meta_path = os.path.join(own, "meta.json")
    meta = json.load(open(meta_path))
    with open(meta_path, "w") as f:
        f.write(json.dumps(meta)[:50])
    with pytest.raises(SystemExit, match=r"meta.json' is not valid JSON.*prepare.py"):
        train.main(args(own, str(tmp_path)))
    del meta["dtype"]
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(SystemExit, match=r"meta.json' lacks dtype.*prepare.py"):
        train.main(args(own, str(tmp_path)))


def test_space_instead_of_equals_says_how_overrides_are_written():
    for argv in (["--lr", "1e-3"], ["configs/shakespeare_char.yaml", "--lr", "1e-3"]):
        result = subprocess.run([sys.executable, "train.py", *argv], capture_output=True, text=True, cwd=ROOT)
        assert result.returncode != 0 and result.stderr.count("\n") == 1, result.stderr
        assert "'--lr' has no value: overrides are written --lr=VALUE" in result.stderr


def test_failed_start_does_not_lock_out_the_corrected_command(trained, data, tmp_path):
    good = os.path.join(trained, "ckpt_0000004.pt")
    with pytest.raises(SystemExit, match="different model shape"):
        train.main(args(data, str(tmp_path), "branch", d_model=64, init_from=good, steps=6))
    assert train.main(args(data, str(tmp_path), "branch", init_from=good, steps=6)) == 0


@pytest.mark.parametrize("content, message", [
    (b"caf\xe9\n", "is not UTF-8 text"),
    (b"\x00" * 64, "is not text (it holds NUL bytes)"),
], ids=["latin1", "nul"])
def test_prompt_file_that_is_not_text(trained, tmp_path, content, message):
    (tmp_path / "prompt").write_bytes(content)
    with pytest.raises(SystemExit, match=r"sample.py: error: prompt file '.*prompt' " + re.escape(message)):
        sample.main([trained, "--prompt_file", str(tmp_path / "prompt")])


# Sharded checkpoints (checkpoint_format: sharded): a folder written with torch.distributed.checkpoint.
# The 2-rank cases (FSDP <-> DDP <-> one process) are in test_distributed.py.

def test_sharded_checkpoints_resume_exactly_in_either_direction_and_serve_sample_and_export(data, tmp_path, capsys):
    import export
    out = str(tmp_path)
    assert train.main(args(data, out, "full", steps=8)) == 0
    assert train.main(args(data, out, "sharded", steps=8, checkpoint_format="sharded", keep_last=3)) == 0
    assert [n for n in names(tmp_path / "sharded") if n.startswith("ckpt_")] == \
        ["ckpt_0000004.dcp", "ckpt_0000006.dcp", "ckpt_0000008.dcp"]  # keep_last counts folders too
    assert {".metadata", "__0_0.distcp", "plainlm.pt"} == set(os.listdir(tmp_path / "sharded" / "ckpt_0000008.dcp"))
    # The format may change on resume: from the middle sharded checkpoint on in full files, and back.
    for run, source, fmt in (("from_sharded", "sharded/ckpt_0000004.dcp", "full"), ("to_sharded", "full/ckpt_0000004.pt", "sharded")):
        os.makedirs(tmp_path / run)
        (shutil.copytree if fmt == "full" else shutil.copy)(tmp_path / source, tmp_path / run / os.path.basename(source))
        capsys.readouterr()
        assert train.main(args(data, out, run, steps=8, checkpoint_format=fmt)) == 0
        assert f"resumed from {tmp_path / run / os.path.basename(source)} at step 4" in capsys.readouterr().out
    full = torch.load(tmp_path / "full" / "ckpt_0000008.pt", weights_only=True)
    ours = torch.load(tmp_path / "from_sharded" / "ckpt_0000008.pt", weights_only=True)
    for key, value in full["model"].items():
        assert torch.equal(ours["model"][key], value), key
    for key, state in full["optimizer"]["state"].items():
        assert all(torch.equal(ours["optimizer"]["state"][key][k], v) for k, v in state.items()), key
    for run in ("sharded", "to_sharded"):  # model_weights reads a sharded folder's model (as sample.py / export.py do)
        sharded = train.read_checkpoint(str(tmp_path / run / "ckpt_0000008.dcp"))
        assert "model" not in sharded and "optimizer" not in sharded  # plainlm.pt holds none of the big tensors
        weights = train.model_weights(sharded)
        assert weights.keys() == full["model"].keys() and all(torch.equal(weights[k], v) for k, v in full["model"].items())
    assert sample.main([str(tmp_path / "sharded" / "ckpt_0000008.dcp"), "--max_new_tokens", "5"]) == 0
    assert export.main([str(tmp_path / "sharded"), str(tmp_path / "hf")]) == 0  # its newest checkpoint: the folder
    assert "model.safetensors" in os.listdir(tmp_path / "hf")


def test_damaged_sharded_checkpoint_is_skipped_and_set_aside(data, tmp_path, capsys):
    run = str(tmp_path / "run")
    assert train.main(args(data, str(tmp_path), checkpoint_format="sharded")) == 0
    shard = next(n for n in os.listdir(os.path.join(run, "ckpt_0000004.dcp")) if n.endswith(".distcp"))
    flip_middle(os.path.join(run, "ckpt_0000004.dcp", shard))  # silent corruption of tensor data
    capsys.readouterr()
    assert train.main(args(data, str(tmp_path), steps=6, checkpoint_format="sharded")) == 0
    out = capsys.readouterr().out
    assert f"skipping unreadable checkpoint {run}/ckpt_0000004.dcp (its file {shard} does not match its checksum)" in out
    assert "ckpt_0000002.dcp at step 2" in out
    assert [n for n in names(run) if n.startswith("ckpt_")] == \
        ["ckpt_0000002.dcp", "ckpt_0000004.dcp", "ckpt_0000004.dcp.damaged", "ckpt_0000006.dcp"]
    # A folder that lost its plainlm.pt (or a file) is damaged too, and never read as a run folder.
    os.remove(os.path.join(run, "ckpt_0000006.dcp", "plainlm.pt"))
    with pytest.raises(train.DamagedCheckpoint, match="no plainlm.pt"):
        train.read_checkpoint(os.path.join(run, "ckpt_0000006.dcp"))
    assert train.find_checkpoint(run, print)[0].endswith("ckpt_0000004.dcp")


def test_unfinished_sharded_checkpoint_of_a_killed_trainer_is_removed(data, tmp_path, capsys):
    leftover = tmp_path / "run" / "ckpt_0000002.dcp.tmp-123@elsewhere"
    os.makedirs(leftover)
    (leftover / "__0_0.distcp").write_bytes(b"half")
    assert train.main(args(data, str(tmp_path), checkpoint_format="sharded")) == 0
    assert f"removed an unfinished checkpoint of a stopped trainer: {leftover}" in capsys.readouterr().out
    assert [n for n in names(tmp_path / "run") if n.startswith("ckpt_")] == ["ckpt_0000002.dcp", "ckpt_0000004.dcp"]


@pytest.mark.parametrize("fmt, world, params, sharded", [
    ("auto", 1, 10**9, False), ("auto", 8, 10**8 - 1, False), ("auto", 2, 10**8, True),
    ("full", 8, 10**9, False), ("sharded", 1, 10**3, True)])
def test_checkpoint_format_auto_shards_large_models_on_several_processes(fmt, world, params, sharded):
    raw = type("Model", (), {"num_params": lambda self: params})()
    assert train.sharded_format({"checkpoint_format": fmt}, raw, world) == sharded
