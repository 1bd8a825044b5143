"""Quick end-to-end check on CPU: prepare the default corpus, train a tiny model, stop it with a
signal, resume it, sample from it, summarize it. Runs as `python test_smoke.py` or under pytest; about a minute.
The focused tests live in tests/."""
import json
import os
import signal
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.abspath(__file__))
TINY = ["--d_model=64", "--n_layers=2", "--n_heads=4", "--seq_len=64", "--batch_size=16", "--micro_batch_size=16",
        "--steps=40", "--warmup_steps=4", "--lr=1e-2", "--lr_min=1e-3", "--eval_every=20", "--eval_tokens=8192",
        "--log_every=5", "--save_every=20", "--sample_tokens=40"]


def run(*args, **kwargs):
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_prepare_train_resume_sample(tmp_path):
    data, runs = str(tmp_path / "shakespeare_char"), str(tmp_path / "runs")
    run("prepare.py", "--source", "shakespeare", "--tokenizer", "char", "--out", data)
    with open(os.path.join(data, "meta.json")) as f:
        meta = json.load(f)
    assert meta["complete"] and meta["splits"]["train"]["tokens"] > 4_000_000

    # Start training and interrupt it with SIGTERM as soon as it has logged a step.
    cmd = [sys.executable, "train.py", "configs/shakespeare_char.yaml", f"--data_dir={data}", f"--out_dir={runs}", *TINY]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("step 5/"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=300) == 75, rest  # checkpoint saved, run again to continue

    out = run(*cmd[1:])  # the same command resumes and finishes
    assert "resumed from" in out and "---- sample ----" in out and "done: 40 steps" in out
    with open(os.path.join(runs, "shakespeare_char", "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    losses = [r["val_loss"] for r in records if "val_loss" in r]
    assert [r["step"] for r in records if "train_loss" in r] == list(range(5, 41, 5))
    assert len(losses) == 2 and losses[1] < losses[0] < 3.5, losses

    text = run("sample.py", os.path.join(runs, "shakespeare_char"), "--prompt", "ROMEO:", "--max_new_tokens", "30",
               "--temperature", "0")
    assert text.startswith("ROMEO:") and len(text.strip()) >= 30

    # The last line of training names the command that summarizes the run; it works as printed.
    plot_command = out.split("curves and summary: ")[1].splitlines()[0].split()
    assert plot_command[:2] == ["python", "plot.py"]
    table = run(*plot_command[1:], "--no_plot")
    assert "finished" in table and "40/40" in table


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        import pathlib
        test_prepare_train_resume_sample(pathlib.Path(tmp))
    print("test_smoke.py: ok")
