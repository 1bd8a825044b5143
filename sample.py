"""Generate text from a trained model, streaming it as it is written.

    python sample.py runs/shakespeare_char --prompt "ROMEO:" --max_new_tokens 300
    python sample.py runs/gpt2_small/ckpt_0010000.pt --prompt_file prompt.txt --temperature 0

Everything needed comes from the checkpoint: the model's shape ("model_config") and the
tokenizer of the data it was trained on ("meta", the data's meta.json).
"""
import argparse
import contextlib
import functools
import os
import sys

import torch

import train
from model import ModelConfig, Transformer
from prepare import tokenizer_from_meta


def fail(msg, prog="sample.py"):
    raise SystemExit(f"{prog}: error: {msg}")


def load_checkpoint(path, prog="sample.py"):
    """(path, checkpoint dict) of a checkpoint file, or of the newest readable one in a run folder
    (train.find_checkpoint). export.py uses it too, hence prog (the name its errors start with)."""
    try:
        return train.find_checkpoint(path, lambda msg: print(f"{prog}: {msg}", file=sys.stderr))
    except ValueError as e:
        fail(str(e), prog)


def load_model(ckpt, device="cpu"):
    model = Transformer(ModelConfig(**ckpt["model_config"]))
    model.load_state_dict(train.model_weights(ckpt))
    return model.to(device).eval()


def prompt_ids(text, tokenizer, meta):
    """Token ids of the prompt; an empty prompt starts from the end-of-text token."""
    if meta["tokenizer"] == "char":  # say which characters are missing rather than fail inside encode
        missing = sorted(set(text) - set(meta["chars"]))
        if missing:
            fail(f"the prompt has characters that are not in this model's char vocabulary: "
                 f"{''.join(missing)!r}; remove or replace them")
    try:
        ids = tokenizer.encode(text) if text else []
    except ValueError as e:
        fail(f"cannot encode the prompt with the '{meta['tokenizer']}' tokenizer: {e}")
    if not ids:
        if tokenizer.eot_id is None:
            fail("the prompt is empty and this tokenizer has no end-of-text token to start from: pass --prompt TEXT")
        ids = [tokenizer.eot_id]
    return ids


def generate_streaming(model, tokenizer, ids, max_new_tokens, temperature, top_k, write):
    """Generate one sample, calling write(text) with each new piece of text; returns the new ids."""
    new_ids, shown = [], ""

    def on_token(token):
        nonlocal shown
        new_ids.append(token.item())
        text = tokenizer.decode(new_ids)
        # A byte-level token can end in the middle of a UTF-8 character: wait for the rest of it.
        if not text.endswith("\ufffd"):
            write(text[len(shown):])
            shown = text

    idx = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
    model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, on_token=on_token)
    write(tokenizer.decode(new_ids)[len(shown):])  # whatever was still held back
    return new_ids


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Generate text from a trained plainLM model (streamed to stdout).")
    parser.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT",
                        help="run folder (its newest readable checkpoint is used), a checkpoint file or a sharded checkpoint folder (ckpt_*.dcp)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", default="", help="text to continue (default: start from the end-of-text token)")
    source.add_argument("--prompt_file", help="read the prompt from this file (UTF-8)")
    parser.add_argument("--num_samples", type=int, default=1, help="how many samples to generate (default 1)")
    parser.add_argument("--max_new_tokens", type=int, default=500, help="tokens to generate per sample (default 500)")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="sampling temperature; 0 = greedy, always the most likely token (default 0.8)")
    parser.add_argument("--top_k", type=int, default=200,
                        help="sample only among the k most likely tokens; 0 = all (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="random seed, for reproducible samples (default 0)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    if args.num_samples < 1:
        parser.error(f"--num_samples must be at least 1, got {args.num_samples}")
    for name in ("max_new_tokens", "temperature", "top_k"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must not be negative, got {getattr(args, name)}")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.prompt_file:
        if not os.path.isfile(args.prompt_file):
            fail(f"prompt file '{args.prompt_file}' not found")
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                args.prompt = f.read()
        except UnicodeDecodeError as e:
            fail(f"prompt file '{args.prompt_file}' is not UTF-8 text ({e.reason}); convert it, e.g. with iconv")
        if "\x00" in args.prompt:
            fail(f"prompt file '{args.prompt_file}' is not text (it holds NUL bytes); pass a text file")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if not device.startswith(("cpu", "cuda")):
        fail(f"unknown --device '{device}': use auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {device} but no CUDA GPU is visible: use --device cpu")
    path, ckpt = load_checkpoint(args.checkpoint)
    model = load_model(ckpt, device)
    tokenizer = tokenizer_from_meta(ckpt["meta"])
    ids = prompt_ids(args.prompt, tokenizer, ckpt["meta"])
    print(f"sample.py: {path} (step {ckpt.get('step')}, {model.num_params() / 1e6:.2f}M parameters) on {device}",
          file=sys.stderr)
    write = functools.partial(print, end="", flush=True)
    torch.manual_seed(args.seed)
    # On a GPU, generate in bf16 as training did (fp32 matmuls there are many times slower).
    bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported(including_emulation=False)
    with torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
        for i in range(args.num_samples):
            if i:
                write("\n---------------\n")
            write(args.prompt)
            generate_streaming(model, tokenizer, ids, args.max_new_tokens, args.temperature, args.top_k or None, write)
    write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
