"""Tests for bench.py: it runs end to end and reports sane numbers; --compare hf measures the
same architecture. Tiny shapes only: the numbers are checked for consistency, never for speed."""
import json
import os

import pytest
import torch

import bench
from model import ModelConfig, Transformer

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "bench_cpu.yaml")
TINY = [CONFIG, "--data", "dummy", "--vocab_size", "65", "--d_model=32", "--n_layers=2",
        "--n_heads=2", "--seq_len=32", "--batch_size=4", "--micro_batch_size=2", "--steps", "2", "--warmup", "1"]


def run_bench(capsys, argv):
    assert bench.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    return json.loads(lines[-1]), lines


def test_bench_end_to_end(capsys, monkeypatch):
    monkeypatch.setitem(bench.PEAK_MATMUL_SIZE, "cpu", 512)  # keep the peak probe quick
    res, lines = run_bench(capsys, TINY + ["--rounds", "2", "--measure_peak"])
    for key in ("tokens_per_s", "step_ms", "flops_per_token", "achieved_tflops", "mfu", "peak_mem_mb",
                "first_step_s", "data_ms", "device", "dtype", "compile"):
        assert key in res, key
    assert res["device"].startswith("cpu") and res["dtype"] == "fp32" and res["compile"] is False
    assert res["tokens_per_step"] == 4 * 32 and len(res["tokens_per_s_rounds"]) == 2
    # The numbers agree with each other and with the model's own FLOP count.
    expected_flops = Transformer(ModelConfig(vocab_size=65, d_model=32, n_layers=2, n_heads=2,
                                             max_seq_len=32)).flops_per_token(32)
    assert res["flops_per_token"] == expected_flops
    assert res["tokens_per_s"] > 0
    assert res["step_ms"] == pytest.approx(1000 * 4 * 32 / res["tokens_per_s"], rel=1e-3)
    assert res["achieved_tflops"] == pytest.approx(expected_flops * res["tokens_per_s"] / 1e12, abs=1e-4)
    assert 0 < res["mfu"] < 1.5 and res["peak_tflops"] > 0
    assert res["peak_mem_mb"] > 50 and res["first_step_s"] > 0
    assert 0 <= res["data_ms"] < res["step_ms"]
    assert any(line.startswith("tokens/s") for line in lines)  # the human-readable table came first
    # What it is doing shows as it goes: the header before any model is built, then a line per round.
    assert lines[0].startswith("bench: ") and "then 2 round(s) of 2 step(s)" in lines[0]
    assert lines[1].startswith("ours: ") and "first step" in lines[1]
    assert [line.split(":")[0] for line in lines if line.startswith("round ")] == ["round 1/2", "round 2/2"]


def test_dummy_data_needs_a_vocabulary(tmp_path):
    argv = [CONFIG, "--data", "dummy", f"--data_dir={tmp_path}"]
    with pytest.raises(SystemExit, match="--vocab_size"):
        bench.main(argv)


def hf_name(name):
    """Our parameter name -> LlamaForCausalLM's (the layouts are the same; only names differ)."""
    name = name.replace("tok_emb.", "model.embed_tokens.").replace("blocks.", "model.layers.")
    for ours, theirs in (("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm"),
                         ("attn.wq", "self_attn.q_proj"), ("attn.wk", "self_attn.k_proj"),
                         ("attn.wv", "self_attn.v_proj"), ("attn.wo", "self_attn.o_proj"),
                         ("mlp.w_gate", "mlp.gate_proj"), ("mlp.w_up", "mlp.up_proj"), ("mlp.w_down", "mlp.down_proj")):
        name = name.replace(ours, theirs)
    return "model.norm.weight" if name == "norm.weight" else name


@pytest.mark.parametrize("overrides", [[], ["--n_kv_heads=1", "--tie_embeddings=false", "--rope_theta=500000"]])
def test_hf_model_is_the_same_architecture(overrides):
    """With our weights copied in, bench's HF model computes our logits: the comparison is fair."""
    pytest.importorskip("transformers")
    from train import load_config
    cfg = load_config(CONFIG, ["--d_model=32", "--n_layers=2", "--n_heads=2", "--seq_len=16"] + overrides)
    ours = Transformer(bench.model_config(cfg, 65))
    hf, _ = bench.build_hf(cfg, 65, torch.device("cpu"))
    hf.hf.load_state_dict({hf_name(k): v for k, v in ours.state_dict().items()}, strict=True)
    x = torch.randint(0, 65, (2, 16), generator=torch.Generator().manual_seed(0))
    our_logits, _ = ours(x)
    hf_logits = hf.hf(input_ids=x).logits  # all padded_vocab columns; ours keeps the first 65
    torch.testing.assert_close(hf_logits[..., :65], our_logits, atol=1e-5, rtol=1e-4)


def test_compare_hf(capsys):
    pytest.importorskip("transformers")
    res, lines = run_bench(capsys, TINY + ["--rounds", "1", "--compare", "hf"])
    for key in ("hf_tokens_per_s", "hf_step_ms", "hf_mfu", "hf_peak_mem_mb", "hf_first_step_s", "speedup_vs_hf"):
        assert key in res, key
    assert res["hf_tokens_per_s"] > 0 and res["hf_peak_mem_mb"] > 50  # measured in a child process
    assert res["speedup_vs_hf"] == pytest.approx(res["tokens_per_s"] / res["hf_tokens_per_s"], rel=1e-2)
    assert res["mfu"] is None  # no peak on a CPU without --measure_peak
    (round_line,) = [line for line in lines if line.startswith("round ")]
    assert round_line.startswith("round 1/1: ours ") and " | hf " in round_line


@pytest.mark.skipif(not __import__("fast_ops").ONEDNN, reason="fast_ops.py is used on x86 CPUs only")
def test_ops_table_times_every_fast_op_and_names_the_one_used(capsys):
    """--ops: one row per fast_ops piece with both timings; which one is used follows fast_ops's
    size threshold (a tiny shape: plain matmuls, fast norm and RoPE)."""
    res, lines = run_bench(capsys, [CONFIG, "--ops", "--rounds", "1", "--d_model=32", "--n_heads=2", "--seq_len=16",
                                    "--batch_size=2", "--micro_batch_size=2"])
    assert len(res["ops"]) == 5 and res["tokens"] == 32
    assert all(row["plain_ms"] > 0 and row["fast_ms"] > 0 for row in res["ops"])
    assert [row["fast_used"] for row in res["ops"]] == [False, False, True, True, False]
    assert any("fast_ops uses" in line for line in lines) and lines[0].startswith("bench --ops:")


def test_checkpoint_cost(capsys, tmp_path):
    res, lines = run_bench(capsys, [CONFIG, "--checkpoint", "--vocab_size", "65", "--d_model=32", "--n_layers=2",
                                    "--n_heads=2", "--rounds", "1", f"--out_dir={tmp_path}"])
    # model + AdamW's two moments, fp32: about 12 bytes per parameter
    assert res["file_mb"] * 2**20 == pytest.approx(12 * res["params_m"] * 1e6, rel=0.2)
    assert all(res[key] > 0 for key in ("save_s", "load_s", "checksum_s", "finite_check_s"))
    assert os.listdir(tmp_path) == []  # the temporary checkpoint is gone
    assert "checksum" in lines[1] and "verifying the checksum" in lines[2]


def test_time_to_loss_compares_recipes_on_the_same_data(hamlet_data, tmp_path, capsys):
    """Two recipes trained in turn; every number printed is read back from their own metrics.jsonl."""
    shakespeare = os.path.join(os.path.dirname(CONFIG), "shakespeare_char.yaml")
    argv = [shakespeare, "--time_to_loss", "--recipe", "optimizer=adamw lr=1e-2", "--recipe", "optimizer=muon lr=1e-2 muon_lr=0.05",
            f"--data_dir={hamlet_data}", f"--out_dir={tmp_path}", "--d_model=32", "--n_layers=2", "--n_heads=2",
            "--seq_len=32", "--batch_size=8", "--micro_batch_size=8", "--steps", "12", "--eval_every=4", "--eval_tokens=1024"]
    res, lines = run_bench(capsys, argv)
    assert any(line.startswith("optimizer=muon lr=1e-2 muon_lr=0.05") for line in lines)
    curves = [bench.training_curve(os.path.join(res["out_dir"], f"recipe{i}")) for i in (1, 2)]
    assert [[step for step, _, _ in curve] for curve in curves] == [[4, 8, 12]] * 2  # same steps, same evaluations
    for name, curve in zip(("adamw", "muon"), curves):  # each recipe really trained with its own settings
        with open(os.path.join(res["out_dir"], "recipe1" if name == "adamw" else "recipe2", "config.yaml")) as f:
            assert f"optimizer: {name}" in f.read()
    assert res["target"] == curves[0][-1][2]  # default target: the baseline's final val loss
    assert res["equal_time_s"] == min(curve[-1][1] for curve in curves)
    for row, curve in zip(res["recipes"], curves):
        hit = next((p for p in curve if p[2] <= res["target"]), None)
        assert row["steps_to_target"] == (hit and hit[0]) and row["seconds_to_target"] == (hit and hit[1])
        assert row["final_val_loss"] == curve[-1][2] and row["steps"] == 12
        assert row["val_loss_at_equal_time"] == pytest.approx(bench.loss_at_time(curve, res["equal_time_s"]))
    assert res["recipes"][0]["steps_to_target"] == 12 and res["recipes"][0]["fewer_steps_x"] == 1.0
    # the loss at equal time lies between the evaluations around that time
    assert bench.loss_at_time([(1, 1.0, 3.0), (2, 3.0, 2.0)], 2.0) == 2.5


def test_time_to_loss_refuses_a_single_or_malformed_recipe(capsys):
    with pytest.raises(SystemExit, match="give two or more"):
        bench.main([CONFIG, "--time_to_loss", "--recipe", "optimizer=muon"])
    with pytest.raises(SystemExit, match=r"recipe 2 \('muon'\): write its settings as key=value"):
        bench.main([CONFIG, "--time_to_loss", "--recipe", "optimizer=adamw", "--recipe", "muon"])


def test_gpu_check_without_a_gpu_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match=r"^bench.py: error: --gpu_check needs a CUDA GPU \(none is visible\)$"):
        bench.main(["--gpu_check"])


def test_gpu_check_data_is_text_in_prepare_format(tmp_path):
    """The check's data: GPT-2's vocabulary, real (learnable) text, files train.py accepts."""
    import numpy as np
    import train
    bench.check_data(str(tmp_path))
    meta = train.read_meta(str(tmp_path))
    tokens = train.open_tokens(str(tmp_path), "train", meta)
    assert meta["vocab_size"] == 50257 and len(tokens) > 10_000_000 and tokens.max() < meta["eot_id"]
    assert len(np.unique(tokens[:100_000])) < 120  # bytes of source code: a few dozen distinct tokens
