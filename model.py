"""The whole model: a decoder-only, pre-norm Transformer in the Llama style, without biases or dropout.

    tokens -> embedding -> n_layers x [x + attention(RMSNorm(x)), x + feed-forward(RMSNorm(x))] -> RMSNorm -> LM head

Attention turns queries and keys by position (RoPE) and runs F.scaled_dot_product_attention (flash kernels on
CUDA). Parameter names and the rotate-half RoPE layout match Hugging Face's Llama, so export.py copies weights
as they are. This file is the plain reference to edit; fast_ops.py swaps in faster versions of a few modules.
"""
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


def option(default, help):
    """A ModelConfig field. train.py's config table takes its keys, defaults, types and help from here."""
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    vocab_size: int = option(50257, "set by train.py from the data's meta.json")
    d_model: int = option(384, "width of the residual stream")
    n_layers: int = option(6, "number of Transformer blocks")
    n_heads: int = option(6, "attention heads")
    n_kv_heads: int | None = option(None, "key/value heads for grouped-query attention (null: n_heads)")
    d_ff: int | None = option(None, "feed-forward width (null: 8/3 d_model for glu, 4 d_model for relu2, rounded up to 64)")
    mlp: str = option("glu", "feed-forward type: glu (SwiGLU) or relu2 (squared ReLU)")
    tie_embeddings: bool = option(False, "share the token embedding with the LM head")
    qk_norm: bool = option(False, "RMSNorm on queries and keys per head")
    rope_theta: float = option(10000.0, "RoPE base")
    norm_eps: float = option(1e-5, "RMSNorm epsilon")
    max_seq_len: int = option(1024, "set by train.py to seq_len: the length of the RoPE tables")

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.mlp not in ("glu", "relu2"):
            raise ValueError(f"mlp must be 'glu' or 'relu2', got {self.mlp!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head size d_model/n_heads={self.d_model // self.n_heads} must be even for RoPE")
        if self.d_ff is None:
            # A GLU has three matrices, so 8/3*d matches a 4*d two-matrix MLP's parameters. Rounded up to 64
            # so GPU matmuls tile evenly (Llama's 256 would grow small models for nothing).
            hidden = 8 * self.d_model / 3 if self.mlp == "glu" else 4 * self.d_model
            self.d_ff = 64 * math.ceil(hidden / 64)

    @property
    def head_dim(self):
        return self.d_model // self.n_heads

    @property
    def padded_vocab(self):
        # Embedding/head rows rounded up to a multiple of 64: odd sizes like 50257 make slow matmuls.
        return 64 * math.ceil(self.vocab_size / 64)


def rope_tables(head_dim, max_seq_len, theta):
    """cos/sin of every (position, frequency) pair, in fp32, laid out for rotate-half."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)  # (T, head_dim): both halves of a pair share an angle
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotary position embedding of x (B, H, T, head_dim): each pair (i, i + head_dim/2) of the
    last dimension is turned by its position's angle. Computed in fp32 whatever the autocast."""
    x_up = x.float()
    x1, x2 = x_up.chunk(2, dim=-1)
    return (x_up * cos + torch.cat((-x2, x1), dim=-1) * sin).type_as(x)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in fp32 whatever the autocast."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


class KVCache:
    """Keys and values of the tokens seen so far, for fast generation (one slot per layer)."""

    def __init__(self, cfg, batch_size, max_len, device, dtype):
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # number of positions filled; advanced by Transformer.forward

    def update(self, layer, k, v):
        end = self.pos + k.shape[2]
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads, self.head_dim = layer, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:  # normalizing q and k per head keeps attention logits bounded
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def rope(self, x, cos, sin):
        return apply_rope(x, cos, sin)

    def forward(self, x, cos, sin, cache=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        # With a cache, a prompt starts at position 0 (causal); each later token may see all before it (no mask).
        causal = cache is None or cache.pos == 0
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal and T > 1,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w_down(silu(w_gate x) * w_up x), or squared ReLU: w_down(relu(w_up x)^2)."""

    def __init__(self, cfg):
        super().__init__()
        self.glu = cfg.mlp == "glu"
        if self.glu:
            self.w_gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w_up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w_down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        if self.glu:
            return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))
        r = F.relu(self.w_up(x))
        return self.w_down(r * r)  # not r.square(): CUDA autocast runs pow in fp32, a mul stays in bf16


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = FeedForward(cfg)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, fast_ops=True):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.padded_vocab, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # derived from the config: not in checkpoints
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()
        self.checkpoint_every = 0  # recompute every k-th block in backward (train.py's activation_checkpointing)
        if use_fast_ops(fast_ops):  # the same math, faster on CPUs: see fast_ops.py
            import fast_ops as fast
            fast.install(self)

    def reset_parameters(self):
        for name, p in self.named_parameters():
            self.init_parameter(name, p)

    def init_parameter(self, name, p):
        """Matrices N(0, 0.02); each block's two residual output projections scaled by 1/sqrt(2 n_layers) so
        the residual stream does not grow with depth. Embedding and LM head std 0.25/sqrt(d_model): the first
        logits have std 0.25 at any width, so the first loss is ln(vocab) + ~0.03 (a flat 0.02 measured +0.13
        nats at GPT-2-small width). One parameter at a time: train.py initialises sharded models piecewise."""
        c = self.cfg
        if p.dim() == 1:
            nn.init.ones_(p)  # RMSNorm gains
        elif name in ("tok_emb.weight", "lm_head.weight"):
            nn.init.normal_(p, mean=0.0, std=0.25 / math.sqrt(c.d_model))
        elif name.endswith(("wo.weight", "w_down.weight")):
            nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layers))
        else:
            nn.init.normal_(p, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, cache=None, reduction="mean"):
        """idx (B, T) token ids -> (logits (B, T, vocab_size), None), or with targets (None, loss): the fp32
        cross-entropy ("mean" or "sum" over targets that are not -1); fast_ops.py computes it in chunks of logits."""
        T = idx.shape[1]
        pos = cache.pos if cache is not None else 0
        if pos + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {pos + T} tokens is longer than max_seq_len={self.cfg.max_seq_len}")
        if pos > 0 and T > 1:  # the attention mask below only covers a prompt or single tokens
            raise ValueError("after the prompt, a cached forward takes one token at a time")
        cos, sin = self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T]
        x = self.tok_emb(idx)
        if torch.is_autocast_enabled(x.device.type):  # keep the residual stream in fp32 (FSDP's bf16 weights)
            x = x.float()
        for i, block in enumerate(self.blocks):
            if self.training and self.checkpoint_every and i % self.checkpoint_every == 0:
                # Activation checkpointing: keep only the block's input; backward runs it again.
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, cache, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache)
        if cache is not None:
            cache.pos += T
        x = self.norm(x)
        if targets is None:
            return self.logits(x), None
        return None, self.loss(x, targets, reduction)

    def logits(self, x):
        # The matmul runs over the padded rows (fast shapes); their columns are dropped: never predicted.
        return self.lm_head(x)[..., :self.cfg.vocab_size]

    def loss(self, x, targets, reduction="mean"):
        return F.cross_entropy(self.logits(x).flatten(0, 1).float(), targets.flatten(), ignore_index=-1,
                               reduction=reduction)

    def num_params(self, non_embedding=False):
        """Parameters counted once each (a tied head is the embedding); non_embedding leaves both out."""
        skip = {id(self.tok_emb.weight), id(self.lm_head.weight)} if non_embedding else set()
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)

    def flops_per_token(self, seq_len):
        """Matmul FLOPs of one token through forward and backward (2x forward), attention scores over the full
        seq_len x seq_len product (as PaLM and nanoGPT count for MFU); lookups and elementwise ops left out."""
        c = self.cfg
        proj = 2 * c.d_model * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)  # q, k, v, o
        scores = 2 * 2 * seq_len * c.n_heads * c.head_dim  # q @ k^T and probs @ v
        mlp = 2 * c.d_model * c.d_ff * (3 if c.mlp == "glu" else 2)
        head = 2 * c.d_model * c.padded_vocab
        return 3 * (c.n_layers * (proj + scores + mlp) + head)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, on_token=None):
        """Continue each row of idx (B, T) by max_new_tokens tokens (temperature 0: greedy) with a KV cache; a full
        context re-encodes its newest half. on_token(token (B, 1)) sees each token as it is chosen (sample.py)."""
        window = self.cfg.max_seq_len
        device = idx.device.type  # under autocast (sampling on a GPU) keys and values are in its dtype
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.tok_emb.weight.dtype
        cache = KVCache(self.cfg, idx.shape[0], window, idx.device, dtype)
        new = idx[:, -window:]  # the tokens the cache has not seen yet
        for _ in range(max_new_tokens):
            if cache.pos + new.shape[1] > window:  # full: start over from the newest half
                cache.pos, new = 0, idx[:, -max(1, window // 2):]
            logits = self(new, cache=cache)[0][:, -1, :].float()
            if temperature == 0:
                next_tok = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, -float("inf"))
                next_tok = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx, new = torch.cat((idx, next_tok), dim=1), next_tok
            if on_token is not None:
                on_token(next_tok)
        return idx


def use_fast_ops(requested=True):
    """fast_ops.py's switch: off with Transformer(cfg, fast_ops=False), `fast_ops: false` or PLAINLM_FAST_OPS=0."""
    return bool(requested) and os.environ.get("PLAINLM_FAST_OPS", "1") != "0"
