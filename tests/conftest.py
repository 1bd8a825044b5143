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
